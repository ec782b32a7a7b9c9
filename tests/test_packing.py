"""Packed batches (TRL padding-free / BFD, Axolotl multipack): a sample is a segment. The same samples
packed and padded give the same triage, the same kept tokens, the same loss and gradient, and the
packed training forward receives only the kept segments."""

import tempfile

import datasets
import pytest
import torch

from qtuning_plugin import QTuning, QTuningConfig
from qtuning_plugin.core import apply_decision, decide, score_batch, scoring_mode
from qtuning_plugin.core.packing import packed_layout, repack, segments, unpack
from tiny import arithmetic_dataset, tiny_model, tiny_tokenizer

CONFIG = QTuningConfig(sample_ratio=0.5, token_ratio=0.5)


def examples(n=8, seed=0):
    tok = tiny_tokenizer()
    out = []
    for r in arithmetic_dataset(n, seed=seed):
        p, c = tok(r["prompt"])["input_ids"], tok(r["completion"])["input_ids"] + [tok.eos_token_id]
        out.append((p + c, [-100] * len(p) + c))
    return out


def padded(exs):
    t = max(len(i) for i, _ in exs)
    return {"input_ids": torch.tensor([i + [0] * (t - len(i)) for i, _ in exs]),
            "attention_mask": torch.tensor([[1] * len(i) + [0] * (t - len(i)) for i, _ in exs]),
            "labels": torch.tensor([lab + [-100] * (t - len(lab)) for _, lab in exs])}


def packed_trl(exs, pad_to=None):
    """TRL's padding-free layout: one row, position_ids restarting per sample, varlen keys."""
    ids = [x for i, _ in exs for x in i]
    labels = [x for _, lab in exs for x in [-100] + lab[1:]]
    pos = [p for i, _ in exs for p in range(len(i))]
    if pad_to:  # pad_to_multiple_of: padding positions are 0 (one-token "segments" without labels)
        extra = -len(ids) % pad_to
        ids, labels, pos = ids + [0] * extra, labels + [-100] * extra, pos + [0] * extra
    lengths = torch.tensor([len(i) for i, _ in exs])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([pos]),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": int(lengths.max()),
            "max_length_k": int(lengths.max()),
            "seq_idx": torch.repeat_interleave(torch.arange(len(exs), dtype=torch.int32), lengths)[None]}


def packed_axolotl(exs, rows=2):
    """Axolotl's multipack layout: `rows` bins, attention_mask = 1, 2, ... per segment, 0 = padding."""
    bins = [exs[i::rows] for i in range(rows)]
    t = max(sum(len(i) for i, _ in b) for b in bins)
    out = {k: torch.zeros(rows, t, dtype=torch.long) for k in ("input_ids", "attention_mask", "position_ids")}
    out["labels"] = torch.full((rows, t), -100)
    for r, b in enumerate(bins):
        at = 0
        for s, (i, lab) in enumerate(b, 1):
            n = len(i)
            out["input_ids"][r, at:at + n] = torch.tensor(i)
            out["labels"][r, at:at + n] = torch.tensor(lab)
            out["attention_mask"][r, at:at + n] = s
            out["position_ids"][r, at:at + n] = torch.arange(n)
            at += n
    return out, [x for b in bins for x in b]


def test_layouts_are_recognised():
    exs = examples(4)
    assert packed_layout(padded(exs)) is None
    assert packed_layout(packed_trl(exs)) == "position_ids"
    assert packed_layout(packed_axolotl(exs)[0]) == "segment_ids"


@pytest.mark.parametrize("layout", ["trl", "trl-padded-to-64", "axolotl"])
def test_unpack_gives_the_padded_samples(layout):
    exs = examples(6)
    if layout == "axolotl":
        batch, order = packed_axolotl(exs)
    else:
        batch, order = packed_trl(exs, pad_to=64 if layout.endswith("64") else None), exs
    u = unpack(batch, packed_layout(batch))
    want = padded(order)
    want["labels"][:, 0] = -100
    assert len(u.rows) == len(order)  # padding "segments" have no label token: not samples
    t = want["input_ids"].shape[1]
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(u.batch[k][:, :t], want[k]), k


def _loss_and_grad(model, batch):
    model.zero_grad()
    logits = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")},
                   use_cache=False).logits
    labels = batch["labels"]
    loss_sum = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 reduction="sum", ignore_index=-100)
    count = int((labels[:, 1:] != -100).sum())
    (loss_sum / count).backward()
    return float(loss_sum / count), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_and_padded_give_the_same_decision_loss_and_gradient():
    exs = examples(8, seed=3)
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer()))
    pad_batch, pack_batch = padded(exs), packed_trl(exs, pad_to=16)
    u = unpack(pack_batch, "position_ids")
    with scoring_mode(model):
        s_pad, s_pack = score_batch(model, pad_batch), score_batch(model, u.batch)
    torch.testing.assert_close(s_pack.ppl, s_pad.ppl, rtol=1e-5, atol=0)
    torch.testing.assert_close(s_pack.entropy, s_pad.entropy, rtol=1e-5, atol=0)
    d_pad, d_pack = decide([s_pad], CONFIG), decide([s_pack], CONFIG)
    assert torch.equal(d_pad.keep[0], d_pack.keep[0])
    t = pad_batch["input_ids"].shape[1]
    assert torch.equal(d_pad.token_keep[0], d_pack.token_keep[0][:, :t])
    assert int(d_pack.token_keep[0].sum()) > 0 and int(d_pack.keep[0].sum()) == 4

    pieces = [(u.batch["input_ids"][i, :u.lengths[i]],
               torch.where(d_pack.token_keep[0][i, :u.lengths[i]], u.batch["labels"][i, :u.lengths[i]], -100))
              for i in d_pack.keep[0].nonzero().squeeze(1).tolist()]
    out = repack(pieces, "position_ids", pack_batch, row_capacity=pack_batch["input_ids"].shape[1], rows_per_batch=1)
    assert len(out) == 1
    row = out[0]
    kept_lengths = sorted(p[0].numel() for p in pieces)
    assert sorted((row["cu_seq_lens_q"][1:] - row["cu_seq_lens_q"][:-1]).tolist()) == kept_lengths
    assert row["max_length_q"] == max(kept_lengths) and row["input_ids"].shape[1] == sum(kept_lengths)
    assert torch.equal(row["seq_idx"][0].unique_consecutive(), torch.arange(4, dtype=row["seq_idx"].dtype))
    assert int((row["position_ids"] == 0).sum()) == 4  # only the kept segments reach the forward

    model.train()  # (the tiny Llama has no dropout)
    loss_pad, g_pad = _loss_and_grad(model, apply_decision(pad_batch, d_pad.keep[0], d_pad.token_keep[0]))
    loss_pack, g_pack = _loss_and_grad(model, row)
    assert abs(loss_pack - loss_pad) / abs(loss_pad) < 1e-5
    for name, g in g_pad.items():
        assert float((g_pack[name] - g).norm() / g.norm().clamp(min=1e-30)) < 1e-5, name


def test_axolotl_repack_keeps_segment_ids_and_positions():
    exs = examples(8, seed=4)
    batch, order = packed_axolotl(exs, rows=2)
    u = unpack(batch, "segment_ids")
    keep = [0, 3, 5]
    pieces = [(u.batch["input_ids"][i, :u.lengths[i]], u.batch["labels"][i, :u.lengths[i]]) for i in keep]
    out = repack(pieces, "segment_ids", batch, row_capacity=batch["input_ids"].shape[1], rows_per_batch=2)
    assert len(out) == 1 and out[0]["input_ids"].shape[1] <= batch["input_ids"].shape[1]
    got = segments(out[0], "segment_ids")
    assert sorted(e - s for _, s, e in got) == sorted(len(order[i][0]) for i in keep)
    for r, s, e in got:
        assert out[0]["position_ids"][r, s:e].tolist() == list(range(e - s))
        assert len(set(out[0]["attention_mask"][r, s:e].tolist())) == 1
    assert sorted(tuple(out[0]["input_ids"][r, s:e].tolist()) for r, s, e in got) == \
        sorted(tuple(order[i][0]) for i in keep)


class SegmentsReachingForward:
    """Counts the segments (position_ids == 0 with a label after) in training forwards."""

    def __init__(self, model):
        self.segments = []
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if torch.is_grad_enabled() and kwargs.get("position_ids") is not None:
            self.segments.append(int((kwargs["position_ids"] == 0).sum()))


def test_trl_padding_free_training_prunes_segments_and_is_exact():
    trl = pytest.importorskip("trl")
    from transformers import TrainerCallback

    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    reference = tiny_model("llama", vocab_size=len(tok))
    fetched = []

    class Grad(TrainerCallback):
        grads = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if self.grads is None:
                self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    grad = Grad()
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5)
    args = trl.SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         max_steps=2, padding_free=True, max_length=None, report_to=[], use_cpu=True, save_strategy="no", bf16=False,
                         logging_steps=1, dataloader_drop_last=True, max_grad_norm=0.0, learning_rate=5e-3, seed=0)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=tok, callbacks=[grad, cb],
                             train_dataset=datasets.Dataset.from_list(arithmetic_dataset(32)))
    cb.attach(trainer)
    fetch = trainer._qtuning_originals["get_batch_samples"]

    def spy(it, n, device):
        batches, num = fetch(it, n, device)
        fetched.append([{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in batches])
        return batches, num

    trainer._qtuning_originals["get_batch_samples"] = spy
    counter = SegmentsReachingForward(model)
    trainer.train()
    assert all(packed_layout(b) == "position_ids" for b in fetched[0])
    assert [h["qtuning/kept_samples"] for h in trainer.state.log_history if "loss" in h] == [2, 2]
    # one training forward per step (the other micro-batch is a skipped stand-in), holding the
    # 2 kept segments of the step's 8 samples
    assert counter.segments == [2, 2]

    # Reference: the core's decision on the first step's samples (unpacked), mean CE over kept tokens.
    units = [unpack(b, "position_ids") for b in fetched[0]]
    with scoring_mode(reference):
        scores = [score_batch(reference, u.batch) for u in units]
    d = decide(scores, QTuningConfig(sample_ratio=0.25, token_ratio=0.5))
    reference.train()
    total, count = 0.0, 0
    for u, k, t in zip(units, d.keep, d.token_keep):
        for i in k.nonzero().squeeze(1).tolist():
            n = u.lengths[i]
            ids, labels = u.batch["input_ids"][i, :n][None], torch.where(t[i, :n], u.batch["labels"][i, :n], -100)
            total = total + torch.nn.functional.cross_entropy(reference(input_ids=ids, use_cache=False).logits[0, :-1],
                                                              labels[1:], reduction="sum", ignore_index=-100)
            count += int((labels[1:] != -100).sum())
    (total / count).backward()
    for name, p in reference.named_parameters():
        g = grad.grads[name]
        assert float((g - p.grad).norm() / p.grad.norm().clamp(min=1e-30)) < 1e-5, name


def packed_axolotl_v1(exs, rows=2):
    """Axolotl's multipack collator for non-flash attention: all-ones attention_mask (0 on padding),
    position_ids restarting per segment (padding positions 0)."""
    batch, order = packed_axolotl(exs, rows)
    batch["attention_mask"] = (batch["attention_mask"] > 0).long()
    return batch, order


def test_axolotl_v1_layout_and_left_padding_are_told_apart():
    exs = examples(6, seed=5)
    batch, order = packed_axolotl_v1(exs)
    assert packed_layout(batch) == "position_ids"
    u = unpack(batch, "position_ids")
    want = padded(order)
    want["labels"][:, 0] = -100
    t = want["input_ids"].shape[1]
    assert torch.equal(u.batch["input_ids"][:, :t], want["input_ids"])
    assert torch.equal(u.batch["labels"][:, :t], want["labels"])
    out = repack([(u.batch["input_ids"][i, :u.lengths[i]], u.batch["labels"][i, :u.lengths[i]]) for i in (0, 2)],
                 "position_ids", batch, row_capacity=batch["input_ids"].shape[1], rows_per_batch=2)
    assert len(out) == 1 and set(out[0]["attention_mask"].unique().tolist()) <= {0, 1}
    assert sorted(e - s for _, s, e in segments(out[0], "position_ids")) == sorted(u.lengths[i] for i in (0, 2))

    # An ordinary left-padded batch with position_ids is not packed.
    left = padded(exs)
    n = left["attention_mask"].sum(1)
    t = left["input_ids"].shape[1]
    for k in ("input_ids", "attention_mask", "labels"):
        left[k] = torch.stack([row.roll(int(t - m)) for row, m in zip(left[k], n)])
    left["position_ids"] = (left["attention_mask"].cumsum(1) - 1).clamp(min=0)
    assert packed_layout(left) is None


def skewed_examples(lengths, seed=0):
    """Samples of the given total lengths (prompt = a third), random tokens: a length-skewed bin."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tiny_tokenizer())
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        p = n // 3
        out.append((ids, [-100] * p + ids[p:]))
    return out


@pytest.mark.parametrize("layout", ["trl", "trl-padded-to-64", "axolotl"])
def test_packed_scoring_equals_padded_scoring_per_segment_and_costs_the_packed_tokens(layout, monkeypatch):
    """One 300-token segment and ten of 12-30 tokens (lengths spread 25x): scored as the packed rows
    come, each segment's ppl, entropy and per-token scores equal its scores alone, and the scoring
    forward sees the packed tokens, not 11 rows padded to 300. The segments are found once per
    micro-batch (``unpack`` keeps them for ``score_packed``)."""
    import qtuning_plugin.core.packing as packing
    from qtuning_plugin.core.packing import score_packed

    tables = []
    find = packing._segment_table
    monkeypatch.setattr(packing, "_segment_table", lambda *a: tables.append(1) or find(*a))

    exs = skewed_examples([300] + [12 + i for i in range(0, 20, 2)], seed=5)
    if layout == "axolotl":
        batch, _ = packed_axolotl(exs, rows=2)
    else:
        batch = packed_trl(exs, pad_to=64 if layout.endswith("64") else None)
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer()))
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].numel()), with_kwargs=True)
    kind = packed_layout(batch)
    u = unpack(batch, kind)
    with scoring_mode(model):
        alone = score_batch(model, u.batch)
        seen.clear()
        packed = score_packed(model, batch, kind, u)
    assert seen == [batch["input_ids"].numel()]  # one forward, over the packed rows as they are
    assert len(tables) == 1
    assert batch["input_ids"].numel() < u.batch["input_ids"].numel() / 3
    torch.testing.assert_close(packed.ppl, alone.ppl, rtol=1e-5, atol=0)
    torch.testing.assert_close(packed.entropy, alone.entropy, rtol=1e-5, atol=0)
    torch.testing.assert_close(packed.nll, alone.nll, rtol=1e-4, atol=1e-5)
    assert torch.equal(packed.trainable, alone.trainable) and torch.equal(packed.input_tokens, alone.input_tokens)
    # the segments are kept apart: with the packing ignored (one causal row), the scores differ
    with scoring_mode(model):
        leaked = score_batch(model, {"input_ids": batch["input_ids"], "labels": batch["labels"]})
    assert not torch.allclose(leaked.nll[batch["labels"] != -100].sum(), alone.nll.sum(), rtol=1e-3)


@pytest.mark.parametrize("layout", ["trl", "axolotl"])
def test_the_guard_scores_packed_rows_with_the_adapters_off_as_they_come(layout):
    """``reference: base`` on a packed step: the base-model forward, like the scoring forward,
    runs over the packed rows (not the segments padded to the longest), with the adapters off,
    and caches per segment what the padded batch would give."""
    peft = pytest.importorskip("peft")
    from qtuning_plugin.core import build_rules, select_step
    from qtuning_plugin.core.rules.reference import row_keys

    exs = skewed_examples([200] + [12 + i for i in range(0, 14, 2)], seed=7)
    batch = packed_axolotl(exs, rows=2)[0] if layout == "axolotl" else packed_trl(exs)
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_model("llama", vocab_size=len(tiny_tokenizer())),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                init_lora_weights=False, task_type="CAUSAL_LM"))
    seen = []  # (tokens, adapters on) of every forward, at the embedding (whichever scoring path runs)
    lora = next(m for m in model.modules() if hasattr(m, "lora_A"))
    model.get_input_embeddings().register_forward_pre_hook(
        lambda m, a: seen.append((a[0].numel(), not lora.disable_adapters)))
    config = QTuningConfig(sample_ratio=0.5, token_ratio=0.5, reference="base")
    rules = build_rules(config)
    cache = rules[0].cache
    result = select_step(model, [batch], config, rules=rules)
    packed_tokens = batch["input_ids"].numel()
    # after the 8-token probes that choose the scoring path (once per model): the scoring forward,
    # then the base's, both over the packed rows
    assert seen[-2:] == [(packed_tokens, True), (packed_tokens, False)]
    assert all(n == 8 for n, _ in seen[:-2])
    assert sum(not adapters_on for _, adapters_on in seen) == 1 and len(cache) == len(exs)
    unpacked = result.scored[0]
    assert unpacked["input_ids"].numel() > 3 * packed_tokens  # what a padded base forward would have cost
    with scoring_mode(model), model.disable_adapter():
        padded_base = score_batch(model, unpacked)
    for row, key in enumerate(row_keys(unpacked, padded_base.trainable)):
        expected = padded_base.nll[row][padded_base.trainable[row]]
        torch.testing.assert_close(cache.nll[key], expected.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["position_ids", "segment_ids"])
def test_repack_kept_falls_back_to_masking_the_fetched_batches(layout, monkeypatch):
    """When first-fit would need more micro-batches than were fetched, the fetched ones come back
    with only their labels masked: each kept segment's kept tokens, nothing else."""
    from qtuning_plugin.core import packing

    exs = examples(6)
    batches = [packed_trl(exs[:3]), packed_trl(exs[3:])] if layout == "position_ids" else \
        [packed_axolotl(exs[:4])[0], packed_axolotl(exs[4:], rows=1)[0]]
    unpacked = [unpack(b, layout) for b in batches]
    g = torch.Generator().manual_seed(0)
    keep = [torch.rand(len(u.rows), generator=g) < 0.6 for u in unpacked]
    token_keep = [(torch.rand(u.batch["labels"].shape, generator=g) < 0.5) & (u.batch["labels"] != -100)
                  for u in unpacked]
    monkeypatch.setattr(packing, "repack", lambda *a, **k: [None] * (len(batches) + 1))
    out = packing.repack_kept(batches, unpacked, keep, token_keep, layout)
    assert len(out) == len(batches)
    for b, o, u, k, t in zip(batches, out, unpacked, keep, token_keep):
        want = torch.full_like(b["labels"], -100)
        for i in range(len(u.rows)):
            for c in range(u.lengths[i]):
                if k[i] and t[i, c]:
                    want[u.rows[i], u.starts[i] + c] = u.batch["labels"][i, c]
        assert torch.equal(o["labels"], want)
        assert all(torch.equal(o[key], b[key]) if isinstance(b[key], torch.Tensor) else o[key] == b[key]
                   for key in b if key != "labels")
    assert any(bool(k.any()) for k in keep) and any(not bool(k.all()) for k in keep)
