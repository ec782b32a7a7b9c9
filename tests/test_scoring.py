"""score_batch against a naive full-vocabulary reference, on several architectures."""

import uuid
import warnings

import pytest
import torch

from qtuning_plugin.core import score_batch, scoring_mode, trainable_positions
from qtuning_plugin.core import heads
from tiny import padded_batch, tiny_model

LENGTHS, PROMPTS = [12, 7, 20, 3], [4, 2, 5, 3]  # the last row has no trainable token


def naive_reference(model, batch, dtype=torch.float64):
    """Full logits, log_softmax over the whole vocabulary (what score_batch must equal)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits.to(dtype)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    labels = batch["labels"][:, 1:]
    trainable = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * trainable
    ent = -(logp.exp() * logp).sum(-1) * trainable
    count = trainable.sum(1)
    return {
        "nll": torch.nn.functional.pad(nll, (1, 0)),
        "ent": torch.nn.functional.pad(ent, (1, 0)),
        "ppl": torch.exp(nll.sum(1) / count),
        "entropy": ent.sum(1) / count,
    }


def assert_matches(scores, ref):
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.nll.double(), ref["nll"], **close)
    torch.testing.assert_close(scores.token_entropy.double(), ref["ent"], **close)
    torch.testing.assert_close(scores.ppl, ref["ppl"], equal_nan=True, **close)
    torch.testing.assert_close(scores.entropy, ref["entropy"], equal_nan=True, **close)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "gemma3", "cohere", "granite"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_matches_full_logits_reference(kind, padding_side):
    model = tiny_model(kind)
    batch = padded_batch(LENGTHS, PROMPTS, padding_side=padding_side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the known post-processing must not need the fallback
        scores = score_batch(model, batch, chunk_size=5)  # several chunks, one partial
    assert heads.scoring_path(model) == "head"
    assert_matches(scores, naive_reference(model, batch))
    assert torch.equal(scores.trainable, trainable_positions(batch["labels"]))
    assert scores.n_tokens.tolist() == [8, 5, 15, 0]
    assert scores.input_tokens.tolist() == LENGTHS
    assert torch.isnan(scores.ppl[3]) and torch.isnan(scores.entropy[3])


def test_postprocessing_matters_for_these_models():
    # Guard for the test above: without the softcap the numbers would differ.
    model = tiny_model("gemma2")
    batch = padded_batch(LENGTHS, PROMPTS)
    ref = naive_reference(model, batch)
    model.config.final_logit_softcapping = None
    plain = naive_reference(model, batch)
    assert not torch.allclose(ref["entropy"][:3], plain["entropy"][:3], rtol=1e-3)


def test_unknown_postprocessing_falls_back_to_the_models_logits_with_one_warning():
    import transformers

    def forward(self, *args, **kwargs):
        out = transformers.LlamaForCausalLM.forward(self, *args, **kwargs)
        out.logits = out.logits / 0.3
        return out

    # the warning is once per class name: a name no earlier test (or rerun) has used
    name = f"TemperatureLlama{uuid.uuid4().hex[:8]}"
    base = tiny_model("llama")
    model = type(name, (transformers.LlamaForCausalLM,), {"forward": forward})(base.config).eval()
    model.load_state_dict(base.state_dict())
    batch = padded_batch(LENGTHS, PROMPTS)
    with pytest.warns(UserWarning, match=f"{name}'s forward post-processes its logits"):
        scores = score_batch(model, batch)
    assert_matches(scores, naive_reference(model, batch))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert_matches(score_batch(model, batch), naive_reference(model, batch))


def test_a_scoring_path_can_be_forced_and_is_checked():
    """choose_scoring_path(path=...) is the public way for benchmarks and tests to pick a path: no
    probe, validated; on a model both paths reproduce, they give the same scores."""
    model = tiny_model("llama")
    batch = padded_batch(LENGTHS, PROMPTS)
    with scoring_mode(model):
        assert heads.choose_scoring_path(model) == "head"
        chosen = score_batch(model, batch)
        assert heads.choose_scoring_path(model, path="logits") == "logits"
        assert heads.scoring_path(model) == "logits"
        forced = score_batch(model, batch)
        with pytest.raises(ValueError, match=r"path must be one of \['fused', 'head', 'logits'\], got 'Head'"):
            heads.choose_scoring_path(model, path="Head")
        with pytest.raises(ValueError, match="path='fused' needs TRL's fused LM head"):
            heads.choose_scoring_path(model, path="fused")
        assert heads.scoring_path(model) == "logits"  # a refused path changes nothing
    assert_matches(forced, naive_reference(model, batch))
    for a, b in ((chosen.ppl, forced.ppl), (chosen.entropy, forced.entropy), (chosen.nll, forced.nll)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_peft_wrapped_model_scores_with_adapters_active():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                          init_lora_weights=False, lora_dropout=0.0)
    wrapped = peft.get_peft_model(model, cfg).eval()
    batch = padded_batch(LENGTHS, PROMPTS)
    scores = score_batch(wrapped, batch)
    assert_matches(scores, naive_reference(wrapped, batch))
    with wrapped.disable_adapter():
        assert not torch.allclose(score_batch(wrapped, batch).entropy[:3], scores.entropy[:3])


def test_no_grad_and_no_cache_and_modes_restored():
    model = tiny_model("llama").train()
    model.model.layers[0].eval()  # a module with its own mode must get it back
    seen = {}

    def spy(module, args, kwargs):
        seen["grad"] = torch.is_grad_enabled()
        seen["use_cache"] = kwargs.get("use_cache")
        seen["training"] = module.training

    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    batch = padded_batch(LENGTHS, PROMPTS)
    with scoring_mode(model):
        score_batch(model, batch)
    handle.remove()
    assert seen == {"grad": False, "use_cache": False, "training": False}
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training


def test_dropout_is_off_in_scoring_mode():
    model = tiny_model("llama", attention_dropout=0.5).train()
    batch = padded_batch(LENGTHS, PROMPTS)
    with scoring_mode(model):
        a, b = score_batch(model, batch), score_batch(model, batch)
    assert torch.equal(a.nll, b.nll)


def test_bf16_autocast_runs_and_is_close():
    model = tiny_model("llama")
    batch = padded_batch(LENGTHS, PROMPTS)
    ref = naive_reference(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = score_batch(model, batch)
    assert heads.scoring_path(model) == "head"
    torch.testing.assert_close(scores.entropy[:3], ref["entropy"][:3], rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------- memory

def peak_bytes(fn):
    """Peak of live CPU allocations during fn(), from the profiler's allocation records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    assert events, "the profiler recorded no allocation"
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_peak_memory_is_a_fraction_of_the_naive_logits():
    model = tiny_model("llama", vocab_size=32000)
    batch = padded_batch([512] * 4, [128] * 4, vocab_size=32000)
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

    def backbone():
        with torch.no_grad():
            model.model(**kwargs)

    def naive():  # in float32, as a plain forward returns it
        naive_reference(model, batch, dtype=torch.float32)

    def ours():
        score_batch(model, batch)

    base = peak_bytes(backbone)
    naive_extra = peak_bytes(naive) - base
    ours_extra = peak_bytes(ours) - base
    logits_bytes = 4 * 512 * 32000 * 4
    assert naive_extra >= logits_bytes  # the reference does build the [B, T, V] logits
    assert ours_extra < naive_extra / 4, (ours_extra, naive_extra)
    # and the chunk size is the knob: a smaller chunk, a smaller peak
    small = peak_bytes(lambda: score_batch(model, batch, chunk_size=32)) - base
    assert small < ours_extra


def test_a_forward_wrapped_in_autocast_like_accelerate_does_is_scored_in_its_precision():
    """accelerate's mixed precision wraps model.forward in autocast and returns fp32 logits: the
    residual stream (hidden state) stays fp32 while lm_head ran in bf16. The scorer must run its
    head under the same autocast (not fall back, not silently switch to fp32)."""
    from accelerate.utils import convert_outputs_to_fp32

    model = tiny_model("llama")
    ref = naive_reference(model, padded_batch(LENGTHS, PROMPTS))
    model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    batch = padded_batch(LENGTHS, PROMPTS)
    seen = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = score_batch(model, batch)
    hook.remove()
    assert heads.scoring_path(model) == "head"
    assert seen and all(d == torch.bfloat16 for d in seen)  # the scorer's head ran in bf16 too
    torch.testing.assert_close(scores.entropy[:3], ref["entropy"][:3], rtol=5e-2, atol=5e-2)
