"""The benchmark pipelines run end to end (their numbers are checked by reading them, not here)."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_speed_benchmark_quick_mode(tmp_path):
    out = tmp_path / "speed"
    arms = ["full", "qt-100x100", "qt-25x50", "qt-12.5x50", "qt-25x50-guard", "qt-25x50-guard-revisit",
            "qt-25x50-small-loss", "qt-25x50-outliers", "full-packed", "qt-25x50-packed"]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--quick", "--out", str(out),
                           "--arms", *arms], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    table = result["table"]
    assert set(table) == set(arms)
    assert table["qt-25x50-guard"]["kept_samples"] == table["qt-25x50-guard-revisit"]["kept_samples"] == 2
    assert table["full"]["epoch_ratio"] == 1.0
    # batch 4 x GA 2 = pool 8: K = 2 and 1 samples per step
    assert table["qt-25x50"]["kept_samples"] == table["qt-25x50-small-loss"]["kept_samples"] == 2
    assert table["qt-25x50-outliers"]["kept_samples"] == 2
    assert table["qt-12.5x50"]["kept_samples"] == 1
    for arm in ("qt-25x50", "qt-12.5x50"):
        assert table[arm]["score_median_s"] > 0 and table[arm]["floor"] > 0
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


def test_quality_benchmark_quick_mode(tmp_path):
    """Every arm in every regime (--quick, tiny model); the runs file resumes: the same command again
    runs nothing and reports the same runs."""
    out = tmp_path / "quality"
    command = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--tiny", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    runs = result["results"]
    arms = ("full", "random-25x50", "qtuning-25x50", "random-25x100", "qtuning-25x100", "qtuning-rank-25x50",
            "qtuning-highest-25x50", "qtuning-smallloss-25x50", "qtuning-outliers-highest-25x50",
            "qtuning-smallloss-highest-25x50", "qtuning-smallloss3-highest-25x50", "qtuning-warmup-25x50",
            "qtuning-batch-25x50", "qtuning-guard-25x50", "qtuning-guard-highest-25x50", "qtuning-guard-25x100",
            "qtuning-guard2-25x50", "qtuning-guard2-highest-25x50", "qtuning-guard3-highest-25x50",
            "qtuning-observe-25x50")
    regimes = ("paper", "stress", "paper-3ep", "stress-3ep", "paper-noisy-3ep", "stress-light-3ep", "stress-heavy-3ep")
    assert sorted((r["regime"], r["arm"]) for r in runs) == sorted((g, a) for g in regimes for a in arms)
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
        if r["arm"].startswith("qtuning"):
            # one record per pruned step (the warm-up arm trains its first step unpruned)
            assert len(r["decisions"]) == (2 if "warmup" in r["arm"] else 3)
            assert all(sum(s["keep"]) == 4 for s in r["decisions"])  # 25 % of a pool of 16
            assert ("suspect" in r["decisions"][0]) == ("guard" in r["arm"] or "observe" in r["arm"])
    report = out.with_suffix(".md").read_text()
    assert "| qtuning-25x50 |" in report
    assert f"Machines: {runs[0]['machine']}: {len(arms)} runs." in report
    # each arm is paired with random pruning at its own budget: 25 x 100 with random-25x100
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
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


def test_quality_runs_are_resumed_and_reported_at_one_precision(tmp_path):
    """A run trained in bf16 is neither resumed nor paired with fp32 runs (the report would compare
    precisions, not arms); a record from before precision was recorded counts as any."""
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
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
    # (corrupted share of the pools, of what is kept; share of the useful samples kept out)
    assert separation.replay(pools["stress"], 0.25, drop_highest=0.0) == (0.25, 0.5, 0.0)  # the paper keeps one
    assert separation.replay(pools["stress"], 0.25, drop_highest=0.25) == (0.25, 0.0, 0.0)  # wrong answer of two
    # log PPL: median log 4, scaled MAD 1.4826 log(6 / 4) = 0.601; k = 1: above 1.99 (PPL 7.3), the
    # two wrong answers; k = 0.5: above 1.69 (PPL 5.4), also the useful PPL 6: one of five useful
    assert separation.replay(pools["stress"], 0.25, drop_outliers=1.0) == (0.25, 0.0, 0.0)
    assert separation.replay(pools["stress"], 0.25, drop_outliers=0.5) == (0.25, 0.0, 0.2)
    # lower-half spread: 1.4826 x median(log 4 - {log 1, 2, 3, 4}) = 1.4826 log(4 / 3) = 0.427; k = 1:
    # above 1.81 (PPL 6.1), the two wrong answers; k = 0.5: above 1.60 (PPL 4.95), also PPL 5 and 6
    rule = separation.lower_half_outliers
    assert rule(separation.torch.tensor(pool["ppl"]), 1.0).tolist() == [True] + [False] * 2 + [True] + [False] * 4
    assert separation.replay(pools["stress"], 0.25, exclude=lambda p: rule(p, 1.0)) == (0.25, 0.0, 0.0)
    assert separation.replay(pools["stress"], 0.25, exclude=lambda p: rule(p, 0.5)) == (0.25, 0.0, 0.4)
    assert separation.main([str(runs)]) == 0
    assert "stress: 5 pools of random-25x50" in capsys.readouterr().out
