"""One rank of a 2-process FSDP2 run on CPU (gloo), launched by tests/test_distributed.py with
``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT``.

Accelerate does not enable FSDP on CPU (its state switches to FSDP for GPU-like distributed types
only; on CPU the Trainer silently gets DDP), so this run shards the model with torch's own
``fully_shard`` (FSDP version 2, what Accelerate applies with ``fsdp_version: 2``) and trains one
step the way ``recipes/custom_loop.py`` does: ``select_step``, then the kept micro-batches' summed
CE divided by the kept label tokens of both ranks. Every parameter, the LM head's included, is a
DTensor shard outside the forward (the LM head's, in a unit of its own, also right after one). Each rank saves its fetched and trained micro-batches, the
global label-token count and the full (gathered) gradient.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import arithmetic_dataset, tiny_model, tiny_tokenizer  # noqa: E402

from qtuning_plugin.core import QTuningConfig, scoring, select_step  # noqa: E402

BATCH, GA = 4, 2


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.fsdp import fully_shard

    tok = tiny_tokenizer()
    rows = []
    for r in arithmetic_dataset(BATCH * GA, seed=rank):  # each rank its own samples
        p, c = tok(r["prompt"])["input_ids"], tok(r["completion"])["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": p + c, "attention_mask": [1] * (len(p) + len(c)), "labels": [-100] * len(p) + c})
    collate = transformers.DataCollatorForSeq2Seq(tok, padding=True)
    fetched = [dict(collate(rows[i:i + BATCH])) for i in range(0, len(rows), BATCH)]

    model = tiny_model("llama", vocab_size=len(tok))  # same seed, same weights on both ranks
    # Every decoder layer and, as a size-based wrap policy does for a large vocabulary, the LM head
    # in units of their own, resharded after their forward; the root's own parameters (embeddings,
    # norm) stay gathered after its forward (FSDP2 never reshards the root after forward).
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.lm_head)
    fully_shard(model)
    head_weight = type(model.get_output_embeddings().weight).__name__
    with torch.no_grad():  # and after a forward: a shard again
        model(input_ids=fetched[0]["input_ids"][:1], use_cache=False)
    head_weight_after_forward = type(model.get_output_embeddings().weight).__name__

    result = select_step(model, fetched, QTuningConfig(sample_ratio=0.25, token_ratio=0.5))
    total = torch.tensor([result.num_label_tokens])
    dist.all_reduce(total)
    model.train()
    for batch in result.micro_batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                               reduction="sum", ignore_index=-100)
        (ce / total * world).backward()  # FSDP averages gradients over ranks; the Trainer scales alike
    grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters() if p.grad is not None}
    record = {"fetched": [[{k: v for k, v in b.items()} for b in fetched]],
              "trained": [[{k: v for k, v in b.items()} for b in result.micro_batches]],
              "num_items": [int(total)], "grads": grads, "head_weight": head_weight,
              "head_weight_after_forward": head_weight_after_forward,
              "path": scoring.scoring_path(model), "pruned": result.pruned}
    torch.save(record, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Skip the interpreter's teardown, as tests/ddp_worker.py does (a finished rank of this worker
    # aborted there once in CI, after destroy_process_group: "terminate called without an active
    # exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
