"""The benchmark pipelines run end to end (their numbers are checked by reading them, not here)."""

import dataclasses
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_speed_benchmark_quick_mode(tmp_path):
    """The pipeline end to end on one arm of each kind: plain SFT, nothing to prune (no scoring
    pass), Q-Tuning, a rule with a base forward and its cache, and the packed pair. (The other
    arms differ only in their settings, which the unit and TRL tests cover.)"""
    out = tmp_path / "speed"
    arms = ["full", "qt-100x100", "qt-25x50", "qt-25x50-guard-revisit", "full-packed", "qt-25x50-packed"]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--quick", "--out", str(out),
                           "--arms", *arms], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    table = result["table"]
    assert set(table) == set(arms)
    assert table["full"]["epoch_ratio"] == 1.0
    # batch 4 x GA 2 = pool 8: K = 2 samples per step
    assert table["qt-25x50"]["kept_samples"] == table["qt-25x50-guard-revisit"]["kept_samples"] == 2
    assert table["qt-25x50"]["score_median_s"] > 0 and table["qt-25x50"]["floor"] > 0
    assert table["qt-100x100"]["score_median_s"] == 0  # nothing to prune: no scoring pass
    assert "| qt-25x50 |" in out.with_suffix(".md").read_text()
    # the packed arms: TRL packing, ratios to full-packed
    assert table["full-packed"]["epoch_ratio"] == 1.0
    assert table["qt-25x50-packed"]["score_median_s"] > 0 and table["qt-25x50-packed"]["floor"] > 0


def test_scoring_benchmark_quick_mode(tmp_path):
    out = tmp_path / "scoring"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--scoring", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    calls = set(result["seconds"])
    assert {"packed: no-grad forward", "packed: scoring, packed rows", "padded: scoring, our head"} <= calls
    assert result["agree"]["packed_vs_padded_ppl_max_rel"] < 1e-5
    if "padded: scoring, TRL fused head" in calls:  # where TRL has it
        assert result["agree"]["fused_vs_head_ppl_max_rel"] < 1e-5
    assert result["tokens"]["packed rows"] < result["tokens"]["padded to the longest"] / 3
    assert all(v > 0 for v in result["memory"].values())


def _quality():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    return quality


def test_quality_benchmark_quick_mode(tmp_path):
    """--quick runs each arm once, in one regime per rule family (tiny model); the runs file
    resumes: the same command again runs nothing and reports the same runs."""
    quality = _quality()
    plan = {"paper": {"full", "random-25x50", "qtuning-25x50", "random-25x100", "qtuning-25x100",
                      "qtuning-highest-25x50", "qtuning-batch-25x50"},
            "stress-3ep": {"qtuning-smallloss-25x50", "qtuning-smallloss-highest-25x50",
                           "qtuning-smallloss3-highest-25x50", "qtuning-outliers-highest-25x50"},
            "stress": {"qtuning-guard-25x50", "qtuning-guard-highest-25x50", "qtuning-guard-25x100",
                       "qtuning-observe-25x50", "surprise-random-25x100", "surprise-entropy-25x100",
                       "surprise-entropy-half-25x100", "surprise-entropy-noq1-25x100", "smallloss-entropy-25x100",
                       "filtered-random-25x100", "random-swap1-25x100"},
            "stress-swap-3ep": {"qtuning-auto-25x50"}}
    assert sorted(a for arms in plan.values() for a in arms) == sorted(quality.ARMS)  # each arm exactly once
    out = tmp_path / "quality"
    command = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--tiny", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    runs = result["results"]
    assert sorted((r["regime"], r["arm"]) for r in runs) == sorted((g, a) for g, arms in plan.items() for a in arms)
    runs_file = tmp_path / "quality.runs.jsonl"
    assert len(runs_file.read_text().splitlines()) == len(runs)
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "seed 0" not in again.stdout  # nothing ran again
    assert len(runs_file.read_text().splitlines()) == len(runs)
    assert json.loads(out.with_suffix(".json").read_text())["results"] == runs
    for r in runs:
        assert 0 <= r["accuracy"] <= 1 and r["nll"] > 0
        assert " bf16); torch " in r["machine"] and ", trl " in r["machine"]  # where it ran, recorded
        if r["arm"] == "full":
            assert r["decisions"] is None and r["kept_tokens_ratio"] == 1.0
            continue
        assert len(r["decisions"]) == 3  # one record per step, pruned from the first
        assert all(sum(s["keep"]) == 4 for s in r["decisions"])  # 25 % of a pool of 16
        assert all(len(s["kind"]) == len(s["ppl"]) == 16 for s in r["decisions"])
        if r["regime"].startswith("stress"):  # each sample's kind found (the paper's long answers are
            assert all("?" not in s["kind"] for s in r["decisions"])  # cut at 256 characters by the tiny tokenizer)
        for s in r["decisions"]:  # per sample: its id, largest token NLL, surprise beyond the entropy, tokens
            assert all(len(s[k]) == 16 for k in ("ids", "nll_max", "surprise_max", "surprise_sum", "tokens"))
            for p, e, total, n in zip(s["ppl"], s["entropy"], s["surprise_sum"], s["tokens"]):
                # the summed surprise per token is the pool's own log PPL - entropy (drop_surprising's test)
                assert n > 0 and math.isclose(total / n, math.log(p) - e, rel_tol=1e-4, abs_tol=1e-4)
        guard = "guard" in r["arm"] or "observe" in r["arm"]
        for s in r["decisions"]:  # the guard's flags and rises (recorded as excess_*), with the guard only
            assert {"suspect", "excess_max", "excess_mean"} <= set(s) if guard else not {"suspect", "excess_max"} & set(s)
        if r["arm"] == "qtuning-observe-25x50":
            assert not any(x for s in r["decisions"] for x in s["suspect"])  # it never acts
        assert 0 < r["kept_tokens_ratio"] < 1
    report = out.with_suffix(".md").read_text()
    assert report.startswith(f"`python benchmarks/quality.py --quick --tiny --out {out}`")
    assert "| qtuning-25x50 |" in report and "| qtuning-smallloss-highest-25x50 |" in report
    for regime in plan:
        assert f"### Regime `{regime}`" in report
    assert f"Machines: {runs[0]['machine']}: {len(plan['paper'])} runs." in report
    # each arm is paired with random pruning at its own budget: 25 x 100 with random-25x100
    assert [quality.baseline_of(a) for a in ("full", "qtuning-25x100", "qtuning-guard-highest-25x50",
                                             "random-25x50")] == ["random-25x50", "random-25x100", "random-25x50", None]
    # and, where it prunes tokens, with random pruning that trains every token of as many samples
    # (the same forwards and backwards): the report's equal-compute column
    assert [quality.equal_compute_baseline_of(a) for a in ("full", "qtuning-25x100", "qtuning-highest-25x50",
                                                           "random-25x50")] == [None, None, "random-25x100", None]
    row = next(line for line in report.splitlines() if line.startswith("| qtuning-highest-25x50 |"))
    header = next(line for line in report.splitlines() if line.startswith("| arm |"))
    column = [c.strip() for c in header.split("|")].index("equal compute: Δ accuracy, Δ NLL (wins / ties)")
    assert [c.strip() for c in row.split("|")][column].count("of 1)") == 2
    assert (tmp_path / "quality-accuracy-vs-compute.png").exists() and (tmp_path / "quality-eu-plane.png").exists()


def test_quality_pairs_and_retired_arms(tmp_path, capsys):
    """--pairs names (regime, arm) pairs; retired arms no longer run, but their recorded runs are
    reported, marked retired, with --report-only (and skipped, with a note, when not named)."""
    quality = _quality()
    args = quality.parse_args(["--pairs", "paper:full", "stress:qtuning-guard-25x50", "--quick"])
    assert args.pairs == [("paper", "full"), ("stress", "qtuning-guard-25x50")]
    assert args.regimes == ["paper", "stress"] and args.arms == ["full", "qtuning-guard-25x50"]
    assert quality.canonical_command(args).startswith(
        "python benchmarks/quality.py --pairs paper:full stress:qtuning-guard-25x50 --quick")
    crossed = quality.parse_args(["--regimes", "paper", "--arms", "full", "random-25x50"])
    assert crossed.pairs == [("paper", "full"), ("paper", "random-25x50")]
    assert " --regimes paper --arms full random-25x50 " in quality.canonical_command(crossed)
    assert len(quality.parse_args([]).pairs) == len(quality.REGIMES) * len(quality.ARMS)
    for argv in (["--arms", "qtuning-rank-25x50"], ["--pairs", "stress:qtuning-warmup-25x50"],
                 ["--pairs", "paper:full", "--arms", "full"], ["--pairs", "paper"]):
        with pytest.raises(SystemExit):
            quality.parse_args(argv)
    assert not set(quality.RETIRED_ARMS) & set(quality.ARMS)
    out = tmp_path / "q"
    base = {"regime": "stress-3ep", "seed": 0, "precision": "fp32", "model": "m", "machine": "here", "epochs": 3,
            "train_seconds": 1.0, "settings": {k: getattr(quality.parse_args(["--precision", "fp32"]), k)
                                               for k in quality.SETTINGS}}
    step = {"kind": ["useful", "wrong"], "quadrant": [3, 2], "keep": [True, False], "ppl": [1.5, 9.0],
            "entropy": [0.5, 0.2]}
    records = [{**base, "arm": "random-25x50", "accuracy": 0.5, "nll": 0.2, "kept_tokens_ratio": 0.1,
                "decisions": [step]},
               {**base, "arm": "qtuning-rank-25x50", "accuracy": 0.75, "nll": 0.1, "kept_tokens_ratio": 0.2,
                "decisions": [step]},
               {**base, "arm": "qtuning-guard2-25x50", "accuracy": 0.25, "nll": 0.3, "kept_tokens_ratio": 0.2,
                "decisions": [{**step, "suspect": [False, True], "excess_max": [0.1, 2.0], "excess_mean": [-1, -1]}]},
               {**base, "arm": "an-unknown-arm", "accuracy": 0.25, "nll": 0.3, "kept_tokens_ratio": 0.2,
                "decisions": None}]
    (tmp_path / "q.runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    common = ["--regimes", "stress-3ep", "--precision", "fp32", "--seeds", "1", "--out", str(out), "--report-only"]
    quality.main(common)  # the retained arms only; the others noted
    assert "not reported: 1 run of an-unknown-arm (unknown arm), 1 run of qtuning-guard2-25x50 (retired), 1 run " \
           "of qtuning-rank-25x50 (retired)" in capsys.readouterr().out
    report = out.with_suffix(".md").read_text()
    assert "| random-25x50 | 1 |" in report and "rank" not in report and "guard2" not in report
    quality.main(["--arms", "random-25x50", "qtuning-rank-25x50", "qtuning-guard2-25x50", *common])
    report = out.with_suffix(".md").read_text()
    assert report.startswith("`python benchmarks/quality.py --regimes stress-3ep --arms random-25x50 "
                             "qtuning-rank-25x50 qtuning-guard2-25x50 --seeds 1 --steps 12 --precision fp32 "
                             "--report-only")
    rank = next(line for line in report.splitlines() if line.startswith("| qtuning-rank-25x50 (retired: top_up) |"))
    assert "+25.0 pp ± 0.0 pp (1 / 0 of 1)" in rank  # paired with random-25x50, as when it ran
    assert "| qtuning-guard2-25x50 (retired: reference_spread, reference_sticky) | 1 |" in report
    assert "qtuning-guard2-25x50: each sample's largest per-token NLL rise" in report  # its recorded rises


def test_quality_runs_are_resumed_and_reported_at_one_precision(tmp_path):
    """A run trained in bf16 is neither resumed nor paired with fp32 runs (the report would compare
    precisions, not arms); a record from before precision was recorded counts as any."""
    quality = _quality()
    args = quality.parse_args(["--precision", "fp32", "--out", str(tmp_path / "q")])
    assert args.precision_used == "fp32" and quality.canonical_command(args).endswith(
        f"--precision fp32 --out {tmp_path / 'q'}")
    settings = {k: getattr(args, k) for k in quality.SETTINGS}
    records = [{"arm": "random-25x50", "seed": 0, "precision": "fp32", "settings": settings},
               {"arm": "random-25x100", "seed": 0, "precision": "bf16 autocast", "settings": settings},
               {"arm": "qtuning-25x50", "seed": 0, "settings": settings},
               {"arm": "full", "seed": 0, "precision": "fp32", "settings": {**settings, "steps": 3}}]
    path = tmp_path / "q.runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [r["arm"] for r in quality.load_runs(path, args)] == ["random-25x50", "qtuning-25x50"]
    bf16 = quality.parse_args(["--precision", "bf16", "--out", str(tmp_path / "q")])
    assert [r["arm"] for r in quality.load_runs(path, bf16)] == ["random-25x100", "qtuning-25x50"]
    assert quality.parse_args(["--quick"]).precision_used == "fp32"  # a pipeline check: always fp32
    with pytest.raises(SystemExit):
        quality.parse_args(["--quick", "--precision", "bf16"])


def test_gpu_check_smoke(tmp_path):
    """benchmarks/gpu_check.py's whole pipeline on CPU with a tiny model (the GPU run is its default)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    e = result["exactness"]
    assert e["scoring_leaves_gradients_ok"] and e["pruned_step_ok"] and e["pruned_step_rel_error"] < 1e-5
    assert e["pruned_step_kept_rows"] == 2  # 25 % of a pool of 8
    table = result["speed"]["64"]["table"]
    assert set(table) == {"full", "qt-25x50", "qt-12.5x50"} and table["full"]["epoch_ratio"] == 1.0
    assert table["qt-25x50"]["score_median_s"] > 0 and table["qt-25x50"]["floor"] > 0.25
    assert "quantisation" in (tmp_path / "gpu_check.md").read_text()


def test_separation_reads_logged_pools(tmp_path, capsys):
    """benchmarks/separation.py on a hand-made runs file: wrong answers with the highest PPL and
    middling entropy separate perfectly by PPL, not by entropy, and drop_highest_ppl = 1/4 or
    drop_ppl_outliers = 1 takes them out of what the triage keeps."""
    spec = importlib.util.spec_from_file_location("separation", ROOT / "benchmarks" / "separation.py")
    separation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(separation)
    pool = {"kind": ["wrong", "useful", "useful", "wrong", "useful", "useful", "redundant", "useful"],
            "ppl": [9.0, 2.0, 3.0, 8.0, 4.0, 5.0, 1.0, 6.0],
            "entropy": [0.1, 0.5, 0.05, 0.2, 0.9, 0.02, 0.3, 0.4]}
    runs = tmp_path / "q.runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"regime": "stress", "arm": "random-25x50", "seed": 0, "precision": "fp32", "decisions": [pool] * 5},
        {"regime": "stress", "arm": "qtuning-25x50", "seed": 0, "precision": "fp32", "decisions": [pool]}]))
    assert separation.auroc([3, 2], [1, 2]) == 0.875
    pools = separation.pools_of([runs], "random-25x50", None)
    assert list(pools) == ["stress"] and len(pools["stress"]) == 5 and pools["stress"][4][0] == 4
    got = separation.separation(pools["stress"])
    assert got["first 4 steps", "PPL"] == got["later steps", "PPL"] == 1.0
    assert got["first 4 steps", "entropy"] == 0.4  # 4 of the 10 pairs
    # (corrupted share of the pools, of what is kept; share of the useful samples kept out), with the
    # package's rules (qtuning_plugin.core.rules) turned on by QTuningConfig fields
    assert separation.replay(pools["stress"], 0.25) == (0.25, 0.5, 0.0)  # the paper keeps one wrong answer of two
    assert separation.replay(pools["stress"], 0.25, drop_highest_ppl=0.0) == (0.25, 0.5, 0.0)
    assert separation.replay(pools["stress"], 0.25, drop_highest_ppl=0.25) == (0.25, 0.0, 0.0)
    # log PPL: median log 4, scaled MAD 1.4826 log(6 / 4) = 0.601; k = 1: above 1.99 (PPL 7.3), the
    # two wrong answers; k = 0.5: above 1.69 (PPL 5.4), also the useful PPL 6: one of five useful
    assert separation.replay(pools["stress"], 0.25, drop_ppl_outliers=1.0) == (0.25, 0.0, 0.0)
    assert separation.replay(pools["stress"], 0.25, drop_ppl_outliers=0.5) == (0.25, 0.0, 0.2)
    # lower-half spread: 1.4826 x median(log 4 - {log 1, 2, 3, 4}) = 1.4826 log(4 / 3) = 0.427; k = 1:
    # above 1.81 (PPL 6.1), the two wrong answers; k = 0.5: above 1.60 (PPL 4.95), also PPL 5 and 6
    rule = separation.lower_half_outliers
    assert rule(separation.torch.tensor(pool["ppl"]), 1.0).tolist() == [True] + [False] * 2 + [True] + [False] * 4
    assert separation.replay(pools["stress"], 0.25, exclude=lambda p: rule(p.ppl, 1.0)) == (0.25, 0.0, 0.0)
    assert separation.replay(pools["stress"], 0.25, exclude=lambda p: rule(p.ppl, 0.5)) == (0.25, 0.0, 0.4)
    assert separation.main([str(runs)]) == 0
    assert "stress: 5 pools of random-25x50" in capsys.readouterr().out


def test_live_picture_cost_quick_mode(tmp_path):
    out = tmp_path / "live"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "live_cost.py"), "--tiny", "--steps", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["pictures"] == 2 and result["draw_seconds"] > 0 and result["step_seconds"] > 0
    assert result["share_of_a_step"]["50"] == pytest.approx(result["share_of_a_step"]["1"] / 50)


def test_noise_estimates_replay_the_logged_pools():
    """benchmarks/estimate_noise.py on the committed three-epoch runs: the truth column is each
    regime's corrupted share (as benchmarks/separation.py reports it) and every estimate a share."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "estimate_noise.py"),
                           str(ROOT / "benchmarks" / "results" / "quality-3ep.runs.jsonl"), "--precision", "fp32"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first_table = proc.stdout.split("\n\n")[0]  # (the per-kind tables of drop_surprising follow)
    rows = [line.split("|")[1:-1] for line in first_table.splitlines() if line.startswith("| ") and "regime" not in line]
    truth = {(r[0].strip(), r[2].strip()): float(r[4].split()[0]) for r in rows}
    assert truth[("stress-heavy-3ep", "last step")] == 34.4 and truth[("paper-3ep", "end of epoch 1")] == 6.4
    for r in rows:
        assert all(0.0 <= float(c.split()[0]) <= 100.0 for c in r[4:])


def test_preset_table_pairs_by_seed_and_replays_the_rules(tmp_path):
    """benchmarks/preset_table.py on a hand-made runs file: differences paired by seed (a seed the
    baseline lacks is left out), wins and ties counted apart, and the useful samples the arm's rules
    keep out replayed on its logged pools (drop_surprising 0.5: log PPL - entropy above 0.5; a pool
    whose every sample it would keep out is decided without it, as in training)."""
    spec = importlib.util.spec_from_file_location("preset_table", ROOT / "benchmarks" / "preset_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    # log PPL - entropy: 3.0 - 0.5 (out), 0.5 - 0.3, 0.2 - 0.1, 1.6 - 0.1 (out): one useful of three kept out
    pool = {"kind": ["garbled", "useful", "useful", "useful"], "ppl": [math.exp(3.0), math.exp(0.5), math.exp(0.2),
            math.exp(1.6)], "entropy": [0.5, 0.3, 0.1, 0.1], "keep": [False, True, False, False]}
    every_one_out = {**pool, "kind": ["useful"] * 2, "ppl": [math.exp(3.0)] * 2, "entropy": [0.1] * 2,
                     "keep": [True, False]}
    runs = [{"regime": "r", "arm": "qtuning-auto-25x50", "seed": s, "precision": "fp32", "accuracy": acc, "nll": nll,
             "decisions": [pool, every_one_out]} for s, acc, nll in ((0, 0.5, 0.1), (1, 0.75, 0.2), (2, 0.5, 0.3))]
    runs += [{"regime": "r", "arm": "random-25x50", "seed": s, "precision": "fp32", "accuracy": acc, "nll": nll,
              "decisions": [pool]} for s, acc, nll in ((0, 0.25, 0.2), (1, 0.75, 0.1))]
    auto = [r for r in runs if r["arm"] == "qtuning-auto-25x50"]
    assert table.useful_kept_out(auto, "qtuning-auto-25x50") == pytest.approx(1 / 5)
    assert table.useful_kept_out(auto, "qtuning-25x50") is None  # the paper: no rules
    path = tmp_path / "q.runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    out = tmp_path / "t.md"
    assert table.main([str(path), "--precision", "fp32", "--out", str(out)]) == 0
    row = next(line for line in out.read_text().splitlines() if line.startswith("| r (3 seeds)"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1] == "58.3 ± 14.4 %" and cells[2] == "0.200 ± 0.100"
    # seeds 0 and 1: accuracy +0.25 and 0 (one win, one tie), NLL -0.1 and +0.1 (one win)
    assert cells[3] == "+12.5 pp (1 / 1 of 2), +0.000 (1 of 2)"
    # corrupted: pools 1/6 (one garbled of six samples), kept 0 of 2
    assert cells[-2] == "16.7 % → 0.0 %" and cells[-1] == "20.0 %"
    with pytest.raises(SystemExit):
        table.main([str(path), "--regimes", "other"])


def test_preset_table_target_by_hand(tmp_path):
    """benchmarks/preset_table.py's verdict on issue 36's target, against random 25 x 100 on hand-made
    runs: no harm needs the mean not worse *and* 3 of 5 seeds not worse (ties count), on the NLL alone
    on GSM8K; helps needs 4 of 5 seeds and the mean better on one metric and no harm on the other; with
    fewer than 5 seeds a verdict stays open until the seeds left could no longer change it."""
    spec = importlib.util.spec_from_file_location("preset_table", ROOT / "benchmarks" / "preset_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    cells = {  # regime: (pool's corrupted share, accuracy differences, NLL differences), one per seed
        "noisy": (0.2, [0.1, 0.1, 0.1, 0.1, -0.1], [0.0, 0.0, 0.01, -0.01, -0.01]),  # no harm, helps
        "clean": (0.0, [0.0] * 5, [-0.001, -0.001, -0.001, 0.05, 0.05]),  # 3 of 5 not worse, the mean worse
        "gsm8k-20-1ep": (0.2, [-0.03] * 4, [-0.01, -0.01, -0.01, 0.01]),  # exact match lost: not for no harm
        "gsm8k-clean-1ep": (0.0, [0.0] * 4, [0.01, 0.01, 0.01, -0.01]),  # 1 + 1 seed left < 3: harm already
    }
    runs = []
    for regime, (share, accs, nlls) in cells.items():
        for seed, (da, dn) in enumerate(zip(accs, nlls)):
            for arm, acc, nll in (("random-25x100", 0.5, 0.1), ("qtuning-auto-25x50", 0.5 + da, 0.1 + dn)):
                runs.append({"regime": regime, "arm": arm, "seed": seed, "precision": "fp32", "accuracy": acc,
                             "nll": nll, "pool_share_corrupted": share})
    path = tmp_path / "q.runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    out = tmp_path / "t.md"
    assert table.main([str(path), "--out", str(out)]) == 0
    head = "| regime | seeds | corrupted pool |"
    lines = out.read_text().split(head)[1].splitlines()[2:]
    verdict = {c[0]: (c[1], c[3], c[4], c[5], c[6]) for c in
               ([x.strip() for x in line.split("|")[1:-1]] for line in lines if line.startswith("| "))}
    assert verdict["noisy"] == ("5", "+6.0 pp (4 of 5 not worse)", "-0.002 (4 of 5 not worse)", "yes", "yes")
    assert verdict["clean"] == ("5", "+0.0 pp (5 of 5 not worse)", "+0.019 (3 of 5 not worse)", "**no**", "-")
    assert verdict["gsm8k-20-1ep"][1:] == ("-3.0 pp (0 of 4 not worse)", "-0.005 (3 of 4 not worse)", "open",
                                           "**no**")  # NLL 3 + 1 could be 4 of 5, but exact match is harmed
    assert verdict["gsm8k-clean-1ep"][3:] == ("**no**", "-")
    # no pairs with random pruning at the same compute: no verdict line
    only = tmp_path / "only.runs.jsonl"
    only.write_text("".join(json.dumps(r) + "\n" for r in runs if r["arm"] == "qtuning-auto-25x50"))
    assert table.main([str(only), "--out", str(out)]) == 0
    assert out.read_text().split(head)[1].splitlines()[2:] == []


def test_replay_kinds_by_hand(tmp_path):
    """benchmarks/replay_kinds.py: on a logged pool, what each arm would keep, by kind. Random counts
    its expectation (K / n each), the surprise rule keeps the garbled sample out, and the most
    uncertain of the rest are the swapped and the wrong answers."""
    spec = importlib.util.spec_from_file_location("replay_kinds", ROOT / "benchmarks" / "replay_kinds.py")
    replay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay)
    entropy = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.5, 2.0]
    surprise = [0.0] * 5 + [0.1, 0.3, 2.0]  # log PPL - entropy: only the garbled one above 0.5
    pool = {"kind": ["useful"] * 5 + ["wrong", "swapped", "garbled"], "entropy": entropy,
            "ppl": [math.exp(e + s) for e, s in zip(entropy, surprise)], "keep": [True, True] + [False] * 6}
    path = tmp_path / "g.runs.jsonl"
    path.write_text(json.dumps({"regime": "r", "arm": "random-25x100", "seed": 0, "decisions": [pool, pool]}) + "\n")
    out = tmp_path / "k.md"
    assert replay.main([str(path), "--arms", "random-25x100", "surprise-random-25x100", "surprise-entropy-25x100",
                        "full", "--out", str(out)]) == 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.read_text().splitlines() if line.startswith("| ") and "%" in line}
    assert rows["random-25x100"] == ["25.0 %"] * 4 + ["37.5 % → 37.5 %"]  # K = 2 of 8
    assert rows["surprise-random-25x100"] == ["28.6 %"] * 3 + ["0.0 %", "37.5 % → 28.6 %"]  # 2 of the 7 left
    assert rows["surprise-entropy-25x100"] == ["0.0 %", "100.0 %", "100.0 %", "0.0 %", "37.5 % → 100.0 %"]
    assert rows["full"] == ["100.0 %"] * 4 + ["37.5 % → 37.5 %"]
    with pytest.raises(SystemExit):
        replay.main([str(path), "--arms", "no-such-arm"])
    with pytest.raises(SystemExit):
        replay.main([str(path), "--arms", "full", "--logged-by", "qtuning-25x50"])


def test_noise_estimates_memory_auroc_by_hand():
    """benchmarks/estimate_noise.py's memory table: per epoch, the AUROC of the surprise (log PPL -
    entropy) of that epoch's sightings, and of each sample's mean over its sightings so far."""
    spec = importlib.util.spec_from_file_location("estimate_noise", ROOT / "benchmarks" / "estimate_noise.py")
    est = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(est)

    def pool(surprise):  # samples a (wrong), b, c (useful); entropy 0, so log PPL = surprise
        return {"kind": ["wrong", "useful", "useful"], "ids": ["a", "b", "c"], "entropy": [0.0] * 3,
                "ppl": [math.exp(x) for x in surprise]}
    # epoch 1: the wrong answer above both useful ones; epoch 2: below one of them (the model learned it)
    run = {"epochs": 2, "decisions": [pool([3.0, 1.0, 2.0]), pool([1.5, 1.0, 2.0])]}
    got = est.memory_separation(run)
    assert list(got) == ["wrong"]
    (now1, mean1), (now2, mean2) = got["wrong"]
    assert now1 == mean1 == 1.0
    assert now2 == 0.5 and mean2 == 1.0  # mean of a: 2.25, above b's 1.0 and c's 2.0
    assert est.auroc([1.0], [1.0]) == 0.5 and math.isnan(est.auroc([], [1.0]))


@pytest.mark.parametrize("select", ["random", "entropy"])
def test_candidate_keeps_k_of_the_samples_its_rules_let_through(select):
    """benchmarks/quality.py's screened selection rules: the surprise rule keeps a sample out, K of
    the others are kept (the most uncertain first, or at random), and every label token of each."""
    import torch

    from qtuning_plugin.core import Scores

    quality = _quality()
    n, t = 8, 6
    trainable = torch.ones(n, t, dtype=torch.bool)
    trainable[:, 0] = False
    entropy = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 2.0, 0.4], dtype=torch.float64)
    ppl = entropy.exp()  # log PPL - entropy = 0: nothing surprising ...
    ppl[6] = math.exp(2.0 + 3.0)  # ... but sample 6, the most uncertain, 3 nats beyond its entropy
    scores = [Scores(ppl[:4], entropy[:4], torch.zeros(4, t), torch.zeros(4, t), trainable[:4], torch.full((4,), t)),
              Scores(ppl[4:], entropy[4:], torch.zeros(4, t), torch.zeros(4, t), trainable[4:], torch.full((4,), t))]
    cb = quality.Candidate(sample_ratio=0.5, token_ratio=1.0, select=select, drop_surprising=0.5, kinds={},
                           tokenizer=None)
    d = cb.decide(scores, {})
    keep = torch.cat(d.keep)
    assert int(keep.sum()) == 4 and not keep[6]  # K = floor(0.5 x 8); the surprising one never
    assert d.flags["surprising"].tolist() == [i == 6 for i in range(n)]
    if select == "entropy":
        assert keep.nonzero()[:, 0].tolist() == [1, 3, 5, 7]  # the four most uncertain of the rest
    for s, k, tk in zip(scores, d.keep, d.token_keep):
        assert torch.equal(tk, s.trainable & k[:, None])  # every token of a kept sample, none of the others
    assert d.kept_tokens == 4 * (t - 1) and not torch.cat(d.prune).any()
    # a pool the rule would empty is decided without it (decide_step clears its flags): still K kept
    surprising = [Scores(x.ppl * math.exp(3.0), x.entropy, x.nll, x.token_entropy, x.trainable, x.input_tokens)
                  for x in scores]
    assert int(torch.cat(cb.decide(surprising, {}).keep).sum()) == 4
    # within 0.5: choose among the less surprising half. Samples 1, 3, 7 are made 0.2 nats surprising
    # and 5 0.1, so the half (ceil(0.5 x 7) = 4 of the seven left) is 0, 2, 4, 5; K = floor(0.25 x 8) = 2
    calm = ppl.clone()
    calm[[1, 3, 7]] *= math.exp(0.2)
    calm[5] *= math.exp(0.1)
    halves = [dataclasses.replace(scores[0], ppl=calm[:4]), dataclasses.replace(scores[1], ppl=calm[4:])]
    half = quality.Candidate(sample_ratio=0.25, token_ratio=1.0, select=select, within=0.5, drop_surprising=0.5,
                             kinds={}, tokenizer=None)
    got = torch.cat(half.decide(halves, {}).keep).nonzero()[:, 0].tolist()
    assert len(got) == 2 and set(got) <= {0, 2, 4, 5}
    if select == "entropy":
        assert got == [4, 5]  # the two most uncertain of the half (0.3, 0.7), not 1, 3 or 7 (0.9, 0.8, 0.4)
    # avoid_q1: of the seven left, those above both medians (PPL and entropy) come last: with these
    # PPLs 3 and 5 (1 and 7 sit on the PPL median, not above it)
    ranked = torch.tensor([1.0, 2.0, 3.0, 9.0, 4.0, 8.0, 5.0, 7.0], dtype=torch.float64)
    skewed = (entropy + ranked / 10).exp()  # log PPL - Ent = rank / 10 <= 0.9: none surprising but 6
    skewed[6] = math.exp(2.0 + 3.0)
    pools = [dataclasses.replace(scores[0], ppl=skewed[:4]), dataclasses.replace(scores[1], ppl=skewed[4:])]
    noq1 = quality.Candidate(sample_ratio=0.25, token_ratio=1.0, select=select, avoid_q1=True, drop_surprising=1.0,
                             kinds={}, tokenizer=None)
    got = torch.cat(noq1.decide(pools, {}).keep).nonzero()[:, 0].tolist()
    assert len(got) == 2 and not {3, 5, 6} & set(got)
    if select == "entropy":
        assert got == [1, 7]  # the most uncertain outside Q1 (0.9 and 0.4), not 3 or 5 (0.8, 0.7)
    with pytest.raises(ValueError, match="select must be"):
        quality.Candidate(sample_ratio=0.5, token_ratio=1.0, select="lowest", kinds={}, tokenizer=None)
    with pytest.raises(ValueError, match="within must be"):
        quality.Candidate(sample_ratio=0.5, token_ratio=1.0, select="random", within=0.0, kinds={}, tokenizer=None)
    with pytest.raises(ValueError, match="token_ratio must be 1"):
        quality.Candidate(sample_ratio=0.5, token_ratio=0.5, select="random", kinds={}, tokenizer=None)


def test_filtered_random_draws_what_random_pruning_draws():
    """benchmarks/quality.py's FilteredRandom: on a pool where its rule fires on nothing it keeps
    exactly random pruning's samples and tokens (the same draws, seed for seed); where the rule fires
    it keeps the permutation's first K unflagged samples, so the kept sets differ only by the flagged
    samples random pruning drew and their replacements."""
    import torch

    from qtuning_plugin.core import Scores

    quality = _quality()
    n, t = 8, 6
    trainable = torch.ones(n, t, dtype=torch.bool)
    trainable[:, 0] = False
    entropy = torch.linspace(0.2, 1.6, n, dtype=torch.float64)

    def pools(ppl):
        return [Scores(ppl[:4], entropy[:4], torch.zeros(4, t), torch.zeros(4, t), trainable[:4], torch.full((4,), t)),
                Scores(ppl[4:], entropy[4:], torch.zeros(4, t), torch.zeros(4, t), trainable[4:], torch.full((4,), t))]

    calm = entropy.exp() * math.exp(0.9)  # log PPL - entropy = 0.9: under the 1-nat threshold
    for seed in range(4):
        base = quality.RandomPruning(sample_ratio=0.5, token_ratio=1.0, seed=seed, kinds={}, tokenizer=None)
        cand = quality.FilteredRandom(sample_ratio=0.5, token_ratio=1.0, seed=seed, drop_surprising=1.0, kinds={},
                                      tokenizer=None)
        for _ in range(3):  # three steps: the generators stay in step
            b, c = base.decide(pools(calm), {}), cand.decide(pools(calm), {})
            assert all(torch.equal(x, y) for x, y in zip(b.keep, c.keep))
            assert all(torch.equal(x, y) for x, y in zip(b.token_keep, c.token_keep))
            assert not c.flags["surprising"].any() and b.flags == {}
        # the step after: samples 0 and 5 are garbage (1.5 nats beyond their entropy)
        garbage = calm.clone()
        garbage[[0, 5]] *= math.exp(0.6)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed).set_state(base.generator.get_state()))
        b, c = base.decide(pools(garbage), {}), cand.decide(pools(garbage), {})
        kept_b, kept_c = torch.cat(b.keep), torch.cat(c.keep)
        assert c.flags["surprising"].tolist() == [i in (0, 5) for i in range(n)]
        assert kept_b.nonzero()[:, 0].tolist() == sorted(perm[:4].tolist())
        unflagged = perm[(perm != 0) & (perm != 5)]
        assert kept_c.nonzero()[:, 0].tolist() == sorted(unflagged[:4].tolist())  # the first 4 the rule lets through
        for s, k, tk in zip(pools(garbage), c.keep, c.token_keep):
            assert torch.equal(tk, s.trainable & k[:, None])  # token ratio 1: every label token of a kept sample
        assert c.kept_tokens == 4 * (t - 1)
        # a pool the rule would empty is decided without it (decide_step clears its flags): random pruning's picks
        b, c = base.decide(pools(calm * math.exp(0.6)), {}), cand.decide(pools(calm * math.exp(0.6)), {})
        assert all(torch.equal(x, y) for x, y in zip(b.keep, c.keep)) and int(torch.cat(c.keep).sum()) == 4


def test_swapped_random_exchanges_one_sample_once():
    """benchmarks/quality.py's A/A arm: at its first step it keeps random pruning's samples but one,
    exchanged for one random pruning dropped; at every later step it keeps exactly what random
    pruning keeps (its draws are random pruning's)."""
    import torch

    from qtuning_plugin.core import Scores

    quality = _quality()
    n, t = 8, 6
    trainable = torch.ones(n, t, dtype=torch.bool)
    entropy = torch.linspace(0.2, 1.6, n, dtype=torch.float64)
    ppl = entropy.exp()
    pools = [Scores(ppl[:4], entropy[:4], torch.zeros(4, t), torch.zeros(4, t), trainable[:4], torch.full((4,), t)),
             Scores(ppl[4:], entropy[4:], torch.zeros(4, t), torch.zeros(4, t), trainable[4:], torch.full((4,), t))]
    for seed in range(4):
        base = quality.RandomPruning(sample_ratio=0.5, token_ratio=1.0, seed=seed, kinds={}, tokenizer=None)
        aa = quality.SwappedRandom(sample_ratio=0.5, token_ratio=1.0, seed=seed, kinds={}, tokenizer=None)
        b, a = base.decide(pools, {}), aa.decide(pools, {})
        kb, ka = torch.cat(b.keep), torch.cat(a.keep)
        assert int(ka.sum()) == int(kb.sum()) == 4 and int((ka != kb).sum()) == 2  # one out, one in
        for s, k, tk in zip(pools, a.keep, a.token_keep):
            assert torch.equal(tk, s.trainable & k[:, None])
        assert a.kept_tokens == 4 * t
        for _ in range(3):
            b, a = base.decide(pools, {}), aa.decide(pools, {})
            assert all(torch.equal(x, y) for x, y in zip(b.keep, a.keep))
    with pytest.raises(ValueError, match="token_ratio must be 1"):
        quality.SwappedRandom(sample_ratio=0.5, token_ratio=0.5, kinds={}, tokenizer=None)
