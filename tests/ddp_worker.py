"""One rank of a 2-process CPU (gloo) run, launched by tests/test_distributed.py with
``accelerate launch --cpu --num_processes 2 tests/ddp_worker.py OUT MODE``.

MODE: ``step`` or ``global`` (the pool option), ``degenerate`` (rank 1's data all identical),
``packed`` (padding-free batches from transformers' DataCollatorWithFlattening; rank 1's samples
longer, so the ranks re-pack into different shapes), ``unlabelled`` / ``unlabelled-global``
(3 of 4 of rank 1's samples without any label token, as truncation leaves them; pool step /
global), ``unlabelled-all`` (no label token at all on rank 1), ``mismatch`` (rank 1's model
rescales its logits, so only rank 1 would need the scorer's full-logits path), ``guard`` (LoRA with
``reference: base``, sticky flags at a margin of ~0; rank 1's data all identical, so after its first
micro-batch only rank 0 needs base-model forwards).
Each rank saves, for the first optimizer step: the micro-batches it fetched (before pruning),
the kept micro-batches it trained, the label-token count the Trainer divided by, the gradient
after the step's backward passes (all-reduced by DDP), and, with ``pool: global``, the whole pool
and the level it decided at.
"""

import os
import sys
import tempfile
from pathlib import Path

import datasets
import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import arithmetic_dataset, tiny_model, tiny_tokenizer  # noqa: E402

from qtuning_plugin import QTuning  # noqa: E402
from qtuning_plugin.callback import SkippedMicroBatch  # noqa: E402

BATCH, GA = 4, 2


class FirstStepGradient(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class TrainingForwards(TrainerCallback):
    """Training forwards (grad enabled) per optimizer step: every rank must run as many."""

    def __init__(self, model):
        self.per_step, self._n = [], 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self._n += torch.is_grad_enabled()

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append(self._n)
        self._n = 0


class ScaledLogitsLlama(transformers.LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        out.logits = out.logits / 0.3
        return out


def main(out: str, mode: str) -> None:
    tok = tiny_tokenizer()
    rank_hint = int(__import__("os").environ.get("RANK", "0"))
    rows = []
    for i, r in enumerate(arithmetic_dataset(64)):
        if mode in ("degenerate", "guard") and rank_hint == 1:
            r = {"prompt": "what is 1+1?", "completion": " 2. so 1+1=2"}  # every sample the same
        if mode == "packed" and rank_hint == 1:
            r = {**r, "completion": r["completion"] * 3}
        p, c = tok(r["prompt"])["input_ids"], tok(r["completion"])["input_ids"] + [tok.eos_token_id]
        unlabelled = rank_hint == 1 and (mode == "unlabelled-all" or (mode.startswith("unlabelled") and i % 4))
        labels = [-100] * (len(p) + len(c)) if unlabelled else [-100] * len(p) + c
        rows.append({"input_ids": p + c, "attention_mask": [1] * (len(p) + len(c)), "labels": labels})
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, gradient_accumulation_steps=GA,
        max_steps=2, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0, bf16=False,
        dataloader_drop_last=True, max_grad_norm=0.0, learning_rate=5e-3, lr_scheduler_type="constant",
        ddp_backend="gloo",
    )
    grads = FirstStepGradient()
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5, pool="global" if mode.endswith("global") else "step",
                 reference="base" if mode == "guard" else "none",
                 reference_margin=1e-6 if mode == "guard" else 0.5)
    collator = (transformers.DataCollatorWithFlattening(return_position_ids=True) if mode == "packed"
                else transformers.DataCollatorForSeq2Seq(tok, padding=True))
    if mode == "packed":
        rows = [{k: v for k, v in r.items() if k != "attention_mask"} for r in rows]
    model = tiny_model("llama", vocab_size=len(tok))
    if mode == "mismatch" and rank_hint == 1:
        scaled = ScaledLogitsLlama(model.config)
        scaled.load_state_dict(model.state_dict())
        model = scaled
    if mode == "guard":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    forwards = TrainingForwards(model)
    base_forwards = []  # forwards with the adapters off: the reference guard's (mode guard)
    lora = next((m for m in model.modules() if hasattr(m, "lora_A")), None)
    if lora is not None:
        model.get_input_embeddings().register_forward_pre_hook(
            lambda module, args: base_forwards.append(1) if lora.disable_adapters else None)
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), data_collator=collator,
                      callbacks=[grads, cb, forwards])
    cb.attach(trainer)
    fetch, pruned_fetch = trainer._qtuning_originals["get_batch_samples"], trainer.get_batch_samples
    record = {"fetched": [], "trained": [], "num_items": [], "global": []}

    def spy_fetch(it, n, device):
        batches, num = fetch(it, n, device)
        record["fetched"].append([{k: v.cpu() for k, v in b.items()} for b in batches])
        return batches, num

    def spy_pruned(it, n, device):
        batches, num = pruned_fetch(it, n, device)
        record["trained"].append([{k: v.cpu() for k, v in b.items()} for b in batches
                                  if not isinstance(b, SkippedMicroBatch)])
        record["num_items"].append(int(num))
        gp = cb.last_step.decision.global_pool if cb.last_step is not None else None
        record["global"].append(None if gp is None else (gp.ppl.clone(), gp.entropy.clone(), gp.groups.clone()))
        return batches, num

    trainer._qtuning_originals["get_batch_samples"] = spy_fetch
    trainer.get_batch_samples = spy_pruned
    trainer.train()
    record["grads"] = grads.grads
    record["world_size"] = trainer.args.world_size
    record["totals"] = dict(cb.totals)
    record["forwards"] = forwards.per_step
    record["steps"] = trainer.state.global_step
    from qtuning_plugin.core import scoring

    record["full_logits"] = scoring.scoring_path(model) == "logits"
    guard = next((r for r in cb.rules if hasattr(r, "cache")), None)  # reference: base
    if guard is not None:
        record["reference"] = {"forwards": len(base_forwards), "cached": len(guard.cache),
                               "keys": sorted(guard.cache.nll), "suspected": cb.totals["suspected_samples"]}
    torch.save(record, Path(out) / f"rank{trainer.args.process_index}.pt")
    # Leave the process group before the interpreter exits (the Trainer does not destroy it).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Everything the test reads is saved: skip the interpreter's teardown. gloo's threads and the
    # work objects they hold, destroyed at finalization, abort a finished rank now and then
    # ("terminate called without an active exception", SIGABRT; pytorch/pytorch#179291), even
    # after destroy_process_group (it aborted a local run of this worker once, and CI's run of
    # fsdp_worker.py once).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
