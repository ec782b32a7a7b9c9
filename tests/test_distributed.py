"""Two-process DDP on CPU (gloo) through `accelerate launch`: the first optimizer step's gradient is
the mean cross-entropy over the kept tokens of both ranks, as one process computes it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtuning_plugin.core.packing import split_to_count
from qtuning_plugin.core import GlobalPool, QTuningConfig, decide, score_batch, scoring_mode
from qtuning_plugin.core.packing import packed_layout, segments, unpack
from tiny import tiny_model, tiny_tokenizer

HERE = Path(__file__).resolve().parent
WORLD = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def run(mode):
        if mode not in cache:
            out = tmp_path_factory.mktemp(f"ddp-{mode}")
            exe = Path(sys.executable).with_name("accelerate")
            env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
            proc = subprocess.run(
                [str(exe), "launch", "--multi_gpu", "--num_processes", str(WORLD), "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + len(cache)),
                 str(HERE / "ddp_worker.py"), str(out), mode],
                capture_output=True, text=True, env=env, timeout=600)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
            cache[mode] = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
        return cache[mode]

    return run


def reference_gradient(records, config, global_pools=None):
    """Score each rank's first-step micro-batches with the initial weights, decide with the core,
    and take the mean CE over all kept tokens of all ranks, sample by sample (unpadded)."""
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer()))
    terms, count, kept_rows = [], 0, []
    for rank, rec in enumerate(records):
        batches = rec["fetched"][0]
        if packed_layout(batches[0]):  # segments are the samples
            batches = [unpack(b, packed_layout(b)).batch for b in batches]
        with scoring_mode(model):
            scores = [score_batch(model, b) for b in batches]
        gp = None
        if global_pools is not None:
            ppl, ent, groups = global_pools
            gp = GlobalPool(ppl=ppl, entropy=ent, groups=groups, rank=rank)
        d = decide(scores, config, gp)
        rows = []
        for b, keep, token_keep in zip(batches, d.keep, d.token_keep):
            for row in keep.nonzero().squeeze(1).tolist():
                cols = b["attention_mask"][row].nonzero().squeeze(1)
                labels = torch.where(token_keep[row, cols], b["labels"][row, cols], -100)
                terms.append((b["input_ids"][row, cols][None], labels[None]))
                count += int((labels[1:] != -100).sum())
                rows.append(labels[labels != -100].tolist())
        kept_rows.append(rows)
    model.train()
    model.zero_grad()
    loss = sum(torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], lab[0, 1:], reduction="sum",
                                                 ignore_index=-100) for ids, lab in terms) / count
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, count, kept_rows


def trained_rows(rec):
    """The label tokens of each sample (row, or segment of a packed row) the rank trained at step 1."""
    out = []
    for b in rec["trained"][0]:
        layout = packed_layout(b)
        spans = segments(b, layout) if layout else [(r, 0, b["labels"].shape[1]) for r in range(b["labels"].shape[0])]
        for r, s, e in spans:
            row = b["labels"][r, s:e]
            out.append(row[row != -100].tolist())
    return out


def relative_error(got, want):
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


@pytest.mark.parametrize("pool", ["step", "global", "packed"])
def test_first_step_gradient_is_the_mean_ce_over_all_ranks_kept_tokens(runs, pool):
    """`packed`: padding-free batches (one row per micro-batch, position_ids), pool step."""
    records = runs(pool)
    if pool == "packed":
        assert all(packed_layout(b) == "position_ids" for r in records for b in r["fetched"][0])
    assert [r["world_size"] for r in records] == [WORLD, WORLD]
    global_pools = None
    if pool == "global":
        gps = [r["global"][0] for r in records]
        for a, b in zip(gps[0], gps[1]):  # both ranks hold the same whole pool, so the same thresholds
            assert torch.equal(a, b)
        assert gps[0][0].numel() == 2 * 8 and gps[0][2].tolist() == [0] * 8 + [1] * 8
        global_pools = gps[0]
    else:
        assert all(r["global"][0] is None for r in records)
    config = QTuningConfig(sample_ratio=0.25, token_ratio=0.5, pool="step" if pool == "packed" else pool)
    want, count, kept_rows = reference_gradient(records, config, global_pools)
    for rank, rec in enumerate(records):
        assert sorted(trained_rows(rec)) == sorted(kept_rows[rank])  # exactly K = 2 of its 8, its tokens
        assert len(kept_rows[rank]) == 2
        assert rec["num_items"][0] == count  # the label-token count is global (all-gathered)
    for name, g in want.items():
        got = records[0]["grads"][name]
        assert relative_error(got, g) < 1e-5, name
        torch.testing.assert_close(records[1]["grads"][name], got, rtol=0, atol=0)  # DDP: same on both ranks


def test_fsdp2_scores_inside_the_forward_and_the_gradient_is_the_mean_ce_over_the_kept_tokens(tmp_path):
    """FSDP version 2 (torch's fully_shard; Accelerate does not enable FSDP on CPU, see
    tests/fsdp_worker.py), two CPU processes on gloo, one step as recipes/custom_loop.py runs it: the
    LM head's weight is a shard outside the forward, so the scorer computes its statistics inside
    the wrapped model's forward (a pre-hook on the head), where FSDP has gathered it. Same rows kept,
    same first gradient as one process's mean CE over the kept tokens of both ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                           "--master_port", "29590", str(HERE / "fsdp_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [r["head_weight"] for r in records] == ["DTensor"] * 2  # sharded outside the forward
    assert [r["head_weight_after_forward"] for r in records] == ["DTensor"] * 2
    assert [r["path"] for r in records] == ["head"] * 2 and all(r["pruned"] for r in records)
    want, count, kept_rows = reference_gradient(records, QTuningConfig(sample_ratio=0.25, token_ratio=0.5))
    for rank, rec in enumerate(records):
        assert sorted(trained_rows(rec)) == sorted(kept_rows[rank]) and len(kept_rows[rank]) == 2
        assert rec["num_items"][0] == count
    for name, g in want.items():
        assert relative_error(records[0]["grads"][name], g) < 1e-5, name
        torch.testing.assert_close(records[1]["grads"][name], records[0]["grads"][name], rtol=0, atol=0)


def test_global_pool_ranks_against_the_other_rank():
    """What `pool: global` changes, on hand-made scores: a rank whose samples all have a higher
    error than the other rank's is no longer judged against itself alone."""
    from qtuning_plugin.core import triage

    ppl = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0], dtype=torch.float64)
    ent = torch.tensor([4.0, 3.0, 2.0, 1.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    whole = triage(ppl, ent, 0.5, groups=groups)
    alone = triage(ppl[4:], ent[4:], 0.5)
    # Alone, rank 1 keeps its own calibration-like (PPL 10, Ent 4) and misconception-like
    # (PPL 40, Ent 1) samples. Against both ranks all its samples have high error: it keeps its two
    # most confident ones as misconceptions (tokens pruned), and rank 0 its two most uncertain
    # ones as calibration (kept whole). Each rank still keeps exactly 2 of its 4.
    assert alone.keep.tolist() == [True, False, False, True] and alone.prune_tokens.tolist() == [False, False, False, True]
    assert whole.keep.tolist() == [True, True, False, False, False, False, True, True]
    assert whole.prune_tokens.tolist() == [False] * 6 + [True, True] and whole.level == 0.5


def test_degenerate_rank_neither_hangs_nor_crashes(runs):
    records = runs("degenerate")
    for rec in records:
        assert rec["totals"]["steps"] == 2 and rec["totals"]["kept_samples"] == 4
    rows = trained_rows(records[1])
    assert len(rows) == 2 and rows[0] == rows[1]  # identical samples, identical scores: still exactly K


def test_split_to_count_aligns_the_number_of_training_forwards():
    """Packed steps on several ranks: a rank whose kept segments re-packed into fewer micro-batches
    splits them (or, with a single segment, repeats one with every label masked)."""
    from qtuning_plugin.core.packing import repack

    pieces = [(torch.arange(1, n + 1), torch.cat([torch.tensor([-100]), torch.arange(2, n + 1)])) for n in (5, 3, 4)]
    template = {"input_ids": torch.zeros(1, 16, dtype=torch.long), "labels": torch.zeros(1, 16, dtype=torch.long),
                "position_ids": torch.zeros(1, 16, dtype=torch.long)}
    one = repack(pieces, "position_ids", template, 16, 1)
    assert len(one) == 1
    three = split_to_count(one, 3, "position_ids")
    assert len(three) == 3
    got = sorted(tuple(b["input_ids"][0, s:e].tolist()) for b in three for _, s, e in segments(b, "position_ids"))
    assert got == sorted(tuple(x.tolist()) for x, _ in pieces)  # every kept segment once, nothing else
    labels = sum(int((b["labels"] != -100).sum()) for b in three)
    assert labels == sum(int((y != -100).sum()) for _, y in pieces)
    four = split_to_count(three, 4, "position_ids")  # single-segment batches: one all-masked repeat
    assert len(four) == 4 and int((four[0]["labels"] != -100).sum()) == 0


@pytest.mark.parametrize("layout", ["position_ids", "segment_ids"])
def test_a_rank_that_kept_nothing_runs_masked_forwards(layout):
    """The filler micro-batches of a rank that kept no sample while the others did: as many as
    the others run, real tokens, every label masked (a forward and a zero gradient)."""
    from qtuning_plugin.core.batch import fill_to_count
    from qtuning_plugin.core.packing import masked_segment

    if layout == "position_ids":  # TRL padding-free: one row, segments restart position_ids
        batch = {"input_ids": torch.arange(1, 11)[None], "labels": torch.full((1, 10), -100),
                 "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])}
    else:  # Axolotl multipack: segment ids in attention_mask
        batch = {"input_ids": torch.arange(1, 11)[None], "labels": torch.full((1, 10), -100),
                 "attention_mask": torch.tensor([[1, 1, 1, 1, 2, 2, 2, 0, 0, 0]]),
                 "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 0, 0]])}
    out = split_to_count([masked_segment(batch, layout, 0)], 2, layout)
    assert len(out) == 2
    for b in out:
        assert b["input_ids"][0, :4].tolist() == [1, 2, 3, 4] and int((b["labels"] != -100).sum()) == 0
    padded = {"input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]]),
              "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
              "labels": torch.tensor([[-100, 6, 7, -100], [-100, -100, 10, 11]])}
    filled = fill_to_count([], 2, [padded], pad_id=0, side="right")
    assert len(filled) == 2 and all(int((b["labels"] != -100).sum()) == 0 for b in filled)
    assert filled[0]["input_ids"].tolist() == [[5, 6, 7]]
    spread = fill_to_count([padded], 3, [padded], pad_id=0, side="right")  # 2 kept rows, 3 forwards: one row each + a filler
    assert len(spread) == 3 and sum(int((b["labels"] != -100).sum()) for b in spread) == 4
    assert sorted(b["input_ids"].shape[0] for b in spread) == [1, 1, 1]


@pytest.mark.parametrize("mode", ["unlabelled", "unlabelled-global", "unlabelled-all"])
def test_a_rank_with_label_less_samples_neither_hangs_nor_trains_them(runs, mode):
    """Rank 1's samples mostly (or all) lack a label token, as truncation leaves them. Such rows
    are not samples: each rank keeps K of its labelled ones (none where it has none), both ranks
    run the same number of training forwards and steps, and the gradient is still the mean CE over
    every rank's kept tokens. (Before: rank 1 trained its step unpruned alone and the job hung.)"""
    records = runs(mode)
    assert [r["steps"] for r in records] == [2, 2]
    assert records[0]["forwards"] == records[1]["forwards"]
    config = QTuningConfig(sample_ratio=0.25, token_ratio=0.5, pool="global" if mode.endswith("global") else "step")
    gp = records[0]["global"][0] if mode.endswith("global") else None
    if gp is not None:
        for a, b in zip(gp, records[1]["global"][0]):  # the same whole pool on both ranks (NaN: unlabelled)
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    want, count, kept_rows = reference_gradient(records, config, gp)
    labelled = sum(int((b["labels"][:, 1:] != -100).any(1).sum()) for b in records[1]["fetched"][0])
    if mode == "unlabelled-all":
        assert labelled == 0 and kept_rows[1] == [] and trained_rows(records[1]) == [[]]  # one masked row
    else:
        assert 0 < labelled < 8 and len(kept_rows[1]) == max(1, labelled // 4)
        assert sorted(trained_rows(records[1])) == sorted(kept_rows[1])
    assert sorted(trained_rows(records[0])) == sorted(kept_rows[0]) and len(kept_rows[0]) == 2
    assert records[0]["num_items"][0] == records[1]["num_items"][0] == count
    for name, g in want.items():
        assert relative_error(records[0]["grads"][name], g) < 1e-5, name


def test_the_scoring_path_is_chosen_by_all_ranks_together(runs):
    """Only rank 1's model post-processes its logits (so only rank 1 would need the full-logits path,
    a second forward): both ranks take it, and neither hangs."""
    records = runs("mismatch")
    assert [r["full_logits"] for r in records] == [True, True]
    assert [r["steps"] for r in records] == [2, 2] and records[0]["forwards"] == records[1]["forwards"]


def test_reference_forwards_are_aligned_across_ranks(runs):
    """reference: base under DDP: rank 1's samples are all one sample, cached after its first
    micro-batch, yet it runs a base-model forward whenever rank 0 needs one (one all-reduce per
    step), so neither rank waits for the other; the training forwards match too."""
    pytest.importorskip("peft")
    records = runs("guard")
    assert [r["steps"] for r in records] == [2, 2]
    assert [r["reference"]["forwards"] for r in records] == [2 * 2, 2 * 2]  # 2 steps x 2 micro-batches, both ranks
    assert records[0]["reference"]["cached"] == 2 * 2 * 4 and records[1]["reference"]["cached"] == 1
    assert records[0]["forwards"] == records[1]["forwards"]
    # (margin ~0 here) the guard flagged samples on both ranks once their pools improved on the base
    assert [r["reference"]["suspected"] for r in records] == [r["totals"]["suspected_samples"] for r in records]
