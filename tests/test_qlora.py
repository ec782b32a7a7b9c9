"""4-bit QLoRA (bitsandbytes) on CPU: scoring must not disturb training (spec: the repacking trap)."""

import tempfile

import datasets
import pytest
import torch

from qtuning_plugin import QTuning
from qtuning_plugin.core import score_batch, scoring_mode
from tiny import arithmetic_dataset, padded_batch, tiny_model, tiny_tokenizer

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir():
    # 4-bit blocks need dimensions of 64 and more
    path = tempfile.mkdtemp()
    tiny_model("llama", vocab_size=64, hidden_size=128, intermediate_size=256, head_dim=32).save_pretrained(path)
    return path


def qlora_model(path):
    q = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32,
        quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_compute_dtype=torch.bfloat16))
    q = peft.prepare_model_for_kbit_training(q, use_gradient_checkpointing=False)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                          init_lora_weights=False, lora_dropout=0.1)
    return peft.get_peft_model(q, cfg)


def lora_grads(model, batch):
    model.train()
    model.zero_grad()
    torch.manual_seed(0)  # same LoRA dropout masks
    model(**batch).loss.backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_scoring_pass_leaves_the_next_gradients_identical(model_dir):
    model = qlora_model(model_dir)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    trap_possible = bool(layers[0].support_avx512bf16_for_cpu)
    batch = padded_batch([12, 7, 9], [3, 2, 4], vocab_size=64)
    before = lora_grads(model, batch)
    with scoring_mode(model):
        scores = score_batch(model, batch)
    assert torch.isfinite(scores.ppl).all()
    after = lora_grads(model, batch)
    for name, g in before.items():
        assert g is not None and after[name] is not None, name
        assert torch.equal(after[name], g), name
    assert model.training

    if trap_possible:  # and this is what the guard prevents: a plain eval-mode no-grad forward
        fresh = qlora_model(model_dir)
        fresh.eval()
        with torch.no_grad():
            fresh(**batch)
        broken = lora_grads(fresh, batch)
        assert any(g is None or not torch.equal(g, before[n]) for n, g in broken.items())


def test_sft_trainer_with_qlora_trains_every_lora_parameter(model_dir):
    trl = pytest.importorskip("trl")
    tok = tiny_tokenizer()
    model = qlora_model(model_dir)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cb = QTuning(sample_ratio=0.5, token_ratio=0.5)
    args = trl.SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         max_steps=3, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                         logging_steps=1, bf16=False)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=tok, callbacks=[cb],
                             train_dataset=datasets.Dataset.from_list(arithmetic_dataset(48)))
    trainer.train()
    assert cb.totals["steps"] == 3 and cb.totals["kept_samples"] == 12
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), start[name]), f"{name} did not change"
    assert all("qtuning/kept_samples" in h for h in trainer.state.log_history if "loss" in h)
