"""TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, installed by TRL >= 1.16's
SFTTrainer): it gives the scores our own head gives; scoring goes through it where its kernel is
compact (Triton on CUDA / XPU) or where our head does not reproduce the model's logits. On CPU it
projects every position, so our head is chosen there. Collected only where TRL has it
(tests/conftest.py)."""

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from qtuning_plugin.core import score_batch, scoring_mode
from qtuning_plugin.core import heads
from qtuning_plugin.core.fused import fused_head_installed
from test_scoring import LENGTHS, PROMPTS, naive_reference
from tiny import padded_batch, tiny_model

OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks for


def assert_matches(scores, ref):
    """Against the full-logits reference: per sample 1e-5 relative; per token 1e-5 absolute (near-zero
    entropies differ by fp32 rounding: TRL computes logsumexp - E[z], the reference -sum p log p)."""
    torch.testing.assert_close(scores.ppl, ref["ppl"], rtol=1e-5, atol=0, equal_nan=True)
    torch.testing.assert_close(scores.entropy, ref["entropy"], rtol=1e-5, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(scores.nll.double(), ref["nll"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores.token_entropy.double(), ref["ent"], rtol=1e-5, atol=1e-5)


def scores_on(path, model, batch):
    """``model``'s scores on ``path``, forced; the path chosen before is restored."""
    saved = heads.scoring_path(model)
    assert saved is not None
    heads.choose_scoring_path(model, path=path)
    try:
        return score_batch(model, batch)
    finally:
        heads.choose_scoring_path(model, path=saved)


@pytest.fixture
def compact(monkeypatch):
    """As on a CUDA device with Triton, where TRL's kernel projects only the labelled positions."""
    monkeypatch.setattr(heads, "fused_head_is_compact", lambda device: True)


@pytest.mark.parametrize("kind", ["llama", "gemma2", "granite"])  # plain, softcapped, scaled logits
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_fused_head_is_chosen_where_compact_and_equals_our_head(kind, padding_side, compact):
    model = tiny_model(kind)
    batch = padded_batch(LENGTHS, PROMPTS, padding_side=padding_side)
    add_fused_lm_head(model, outputs=OUTPUTS)
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: calls.append(tuple(out.shape)))
    with scoring_mode(model):
        assert heads.choose_scoring_path(model) == "fused"
        calls.clear()
        fused = score_batch(model, batch)
        assert calls == []  # TRL's kernel projects the weight itself: no logits from the head module
        ours = scores_on("head", model, batch)
    for a, b in ((fused.ppl, ours.ppl), (fused.entropy, ours.entropy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0, equal_nan=True)
    # per token, near-zero entropies differ by fp32 rounding (TRL: logsumexp - E[z]; ours: -sum p log p)
    torch.testing.assert_close(fused.nll, ours.nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.token_entropy, ours.token_entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.trainable, ours.trainable)
    assert_matches(fused, naive_reference(model, batch))


def test_on_cpu_our_head_is_chosen_unless_only_the_fused_head_reproduces_the_logits():
    """TRL knows logit multipliers ours does not (Falcon-H1's lm_head_multiplier): for such a model
    the fused head is chosen even where it is not compact, rather than the full logits."""
    import transformers

    class MultipliedLlama(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * self.config.lm_head_multiplier
            return out

    plain = tiny_model("llama")
    add_fused_lm_head(plain, outputs=OUTPUTS)
    base = tiny_model("llama")
    base.config.lm_head_multiplier = 2.5
    multiplied = MultipliedLlama(base.config).eval()
    multiplied.load_state_dict(base.state_dict())
    add_fused_lm_head(multiplied, outputs=OUTPUTS)
    batch = padded_batch(LENGTHS, PROMPTS)
    with scoring_mode(plain), scoring_mode(multiplied):
        assert heads.choose_scoring_path(plain) == "head"
        assert heads.choose_scoring_path(multiplied) == "fused"
        assert_matches(score_batch(multiplied, batch), naive_reference(multiplied, batch))


def test_fused_head_through_peft_as_sft_trainer_installs_it(compact):
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    add_fused_lm_head(model, outputs=OUTPUTS)  # on the base model, before PEFT wraps it (as SFTTrainer does)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False, lora_dropout=0.0))
    batch = padded_batch(LENGTHS, PROMPTS)
    with scoring_mode(wrapped):
        assert heads.choose_scoring_path(wrapped) == "fused"
        fused = score_batch(wrapped, batch)
        assert_matches(fused, naive_reference(wrapped, batch))  # adapters active
        with wrapped.disable_adapter():
            base = score_batch(wrapped, batch)
    assert not torch.allclose(base.entropy[:3], fused.entropy[:3])


def test_a_fused_head_without_entropy_is_not_used(compact):
    model = tiny_model("llama")
    add_fused_lm_head(model, outputs=("log_probs",))
    batch = padded_batch(LENGTHS, PROMPTS)
    with scoring_mode(model), pytest.warns(UserWarning, match="fused LM head could not score"):
        assert heads.choose_scoring_path(model) == "head"
    with scoring_mode(model):
        assert_matches(score_batch(model, batch), naive_reference(model, batch))


@pytest.mark.parametrize("where", ["cpu", "compact"])
def test_sft_trainer_installs_it_and_qtuning_scores_through_it_where_compact(tmp_path, monkeypatch, where):
    import datasets
    from tiny import arithmetic_dataset, tiny_tokenizer
    from trl import SFTConfig, SFTTrainer

    from qtuning_plugin import QTuning

    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                     use_cpu=True, logging_steps=1, save_strategy="no")
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(arithmetic_dataset(8)), processing_class=tok,
                         callbacks=[QTuning(sample_ratio=0.5, token_ratio=0.5)])
    assert fused_head_installed(model)
    if where == "compact":
        monkeypatch.setattr(heads, "fused_head_is_compact", lambda device: True)
    trainer.train()
    assert heads.scoring_path(model) == ("fused" if where == "compact" else "head")
