"""The GSM8K benchmark (benchmarks/gsm8k.py): its wrong labels, its pairing, its metrics' token span,
and the pipeline end to end on the fixture (tests/fixtures/gsm8k) with a tiny random model."""

import importlib
import json
import math
import pathlib
import sys
from collections import Counter

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "gsm8k"
sys.path.insert(0, str(ROOT / "benchmarks"))
gsm8k_data = importlib.import_module("gsm8k_data")
gsm8k = importlib.import_module("gsm8k")


@pytest.fixture(scope="module")
def rows():
    train, test, _ = gsm8k_data.load(str(FIXTURE))
    return train, test


def body_and_final(solution):
    body, _, last = solution.rstrip().rpartition("\n")
    return body, gsm8k_data.value(gsm8k_data.final_answer(last))


def last_number(text):
    return gsm8k_data.value(list(gsm8k_data.NUMBER.finditer(text))[-1].group())


def test_fixture_rows_are_gsm8k_with_annotations_stripped(rows):
    train, test = rows
    assert (len(train), len(test)) == (48, 16)
    raw = json.loads((FIXTURE / "train.jsonl").read_text().splitlines()[0])["answer"]
    assert "<<" in raw and train[0]["answer"] == gsm8k_data.strip_annotations(raw)
    assert not any("<<" in r["answer"] for r in train + test)
    assert "MIT License" in (FIXTURE / "LICENSE").read_text()


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.2, 0.3])
def test_injection_rates_are_exact(rows, noise):
    train, _ = gsm8k_data.build(*rows, noise=noise, n_train=40, n_test=8, seed=3)
    counts = Counter(r["kind"] for r in train)
    expected = {k: round(40 * s) for k, s in gsm8k_data.mix(noise).items()}
    if noise:
        expected["swapped"] = round(40 * noise) - expected["wrong"] - expected["garbled"]
        assert abs(expected["wrong"] - expected["swapped"]) <= 1  # half and half
    assert {k: v for k, v in counts.items() if k != "useful"} == {k: v for k, v in expected.items() if v}
    assert counts["useful"] == 40 - round(40 * noise)
    for r in train:
        assert (r["answer"] == r["reference"]) == (r["kind"] == "useful")


def test_wrong_labels_are_self_consistent_and_wrong(rows):
    train, _ = gsm8k_data.build(*rows, noise=0.3, n_train=40, n_test=8, seed=0)
    wrong = [r for r in train if r["kind"] == "wrong"]
    assert wrong
    for r in wrong:
        body, final = body_and_final(r["answer"])
        ref_body, truth = body_and_final(r["reference"])
        assert last_number(body) == final != truth  # the last computation and #### agree, and are wrong
        assert 0 < abs(final - truth) <= 10
        # only the last computation's line changed
        assert body.rpartition("\n")[0] == ref_body.rpartition("\n")[0]
    # thousands separators and decimals kept as written
    text = "A costs 2 * $600.00 = $1,200.00 each.\nSo 1,200 in total\n#### 1200"
    import random

    out = gsm8k_data.wrong_solution(text, random.Random(0))
    body, final = body_and_final(out)
    assert body.startswith("A costs 2 * $600.00 = $1,200.00 each.\nSo ") and last_number(body) == final != 1200
    assert f"So {int(final):,} in total" in out
    assert gsm8k_data.wrong_solution("It is 3 + 4 = 7, times 2\n#### 14", random.Random(0)) is None


def test_swapped_is_another_problems_solution_and_garbled_its_own_words(rows):
    train_rows, _ = rows
    train, _ = gsm8k_data.build(*rows, noise=0.3, n_train=30, n_test=8, seed=1)
    solutions = {r["answer"]: r["question"] for r in train_rows}
    own = {r["reference"] for r in train}
    for r in train:
        if r["kind"] == "swapped":
            assert r["answer"] in solutions and solutions[r["answer"]] != r["question"]
            assert r["answer"] not in own  # no training sample has it as its own solution
            assert body_and_final(r["answer"])[1] != body_and_final(r["reference"])[1]
        if r["kind"] == "garbled":
            assert sorted(r["answer"].split()) == sorted(r["reference"].split()) and r["answer"] != r["reference"]
    assert Counter(r["kind"] for r in train)["swapped"] > 0


def test_pairing_same_data_per_seed(rows):
    a = gsm8k_data.build(*rows, noise=0.2, n_train=24, n_test=8, seed=0)
    assert gsm8k_data.build(*rows, noise=0.2, n_train=24, n_test=8, seed=0) == a
    b = gsm8k_data.build(*rows, noise=0.2, n_train=24, n_test=8, seed=1)
    assert [r["question"] for r in a[0]] != [r["question"] for r in b[0]]
    # the same rows and test problems at every noise rate of a seed; three epochs: the first third
    clean = gsm8k_data.build(*rows, noise=0.0, n_train=24, n_test=8, seed=0)
    third = gsm8k_data.build(*rows, noise=0.2, n_train=8, n_test=8, seed=0)
    assert [r["question"] for r in clean[0]] == [r["question"] for r in a[0]]
    assert [r["question"] for r in third[0]] == [r["question"] for r in a[0][:8]]
    assert clean[1] == a[1] == third[1] and a[1] != b[1]


def test_final_answer_span_is_exactly_n(rows):
    from qtuning_plugin.models import tiny

    _, tok = tiny()
    _, test = gsm8k_data.build(*rows, noise=0.0, n_train=8, n_test=16, seed=0)
    for t in test:
        e = gsm8k.encode_reference(tok, t["question"], t["answer"])
        offsets = tok(e["text"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        span = e["span"]
        assert span == list(range(span[0], span[-1] + 1)) and set(span) <= set(e["labels"])
        assert e["text"][offsets[span[0]][0]:offsets[span[-1]][1]] == t["target"]  # N's characters, no more
        assert e["text"][:offsets[span[0]][0]].endswith("#### ")
        assert not e["text"][offsets[span[-1]][1]:].lstrip("</s>").strip()  # then only the end of turn
    # a number with a thousands separator, tokenized by its own span
    e = gsm8k.encode_reference(tok, "How many?", "2 * 600 = 1,200\n#### 1200")
    assert "".join(tok.decode([e["ids"][i] for i in e["span"]]).split()) == "1200"


def test_parse_final():
    assert gsm8k.parse_final("so 3 + 4 = 7\n#### 7") == 7
    assert gsm8k.parse_final("#### $1,200.") == 1200
    assert gsm8k.parse_final("The answer is 7") is None


def test_token_categories():
    pieces = ["She", " has", " 3", " apples", ".\n", "####", " ", "1", "2", "<|im_end|>", "\n"]
    special = [p == "<|im_end|>" for p in pieces]
    assert gsm8k_data.token_categories(pieces, special) == [
        "words", "words", "numbers", "words", "words", "####", "####", "final answer", "final answer", "end of turn",
        "end of turn"]
    # a token that covers the blank and N is N's; the last marker counts; $ and , belong to N
    assert gsm8k_data.token_categories(["#### 4\n", "####", " 1", ",2", "00", "</s>"], [0, 0, 0, 0, 0, 1]) == [
        "numbers", "####", "final answer", "final answer", "final answer", "end of turn"]
    assert gsm8k_data.token_categories(["####", " $", "5"], [0, 0, 0]) == ["####", "final answer", "final answer"]
    # no "#### N" (garbled): numbers and words only, special tokens still the end of turn
    assert gsm8k_data.token_categories(["apples", " 3", " ####", "</s>"], [0, 0, 0, 1]) == [
        "words", "numbers", "words", "end of turn"]


def run_quick(out, capsys):
    gsm8k.main(["--quick", "--out", str(out), "--regimes", "gsm8k-20-1ep", "--arms", "random-25x100",
                "qtuning-auto-25x50", "full-equal-compute"])
    return capsys.readouterr()


def test_distinct_shares_by_hand():
    """Over several epochs, the share of the training samples an arm trained at least once and, of
    those, the share trained on two visits or more, from the logged ids; a run without ids gives None."""
    visit = {"ids": ["a", "b", "c", "d"], "keep": [True, True, False, False]}
    again = {"ids": ["c", "a", "d", "b"], "keep": [False, True, True, False]}  # a twice, d once: 3 of 4, 1 of 3
    assert gsm8k.distinct_shares({"decisions": [visit, again]}) == (0.75, pytest.approx(1 / 3))
    assert gsm8k.distinct_shares({"decisions": [{"keep": [True]}]}) is None
    assert gsm8k.distinct_shares({}) is None


def test_label_cost_by_hand():
    """What the corrupted labels cost an arm: its corrupted run minus its clean run of the same epochs,
    paired by seed (a seed without both runs left out); the sd only over several seeds; regimes
    without their clean counterpart in the report give no line."""
    def row(regime, arm, seed, nll, acc):
        return {"regime": regime, "arm": arm, "seed": seed, "nll": nll, "answer_nll": 0.1, "answer_accuracy": acc,
                "accuracy": 0.0}
    runs = [row("gsm8k-clean-1ep", "random-25x100", 0, 1.00, 0.9), row("gsm8k-20-1ep", "random-25x100", 0, 1.01, 0.8),
            row("gsm8k-clean-1ep", "random-25x100", 1, 1.00, 0.9), row("gsm8k-20-1ep", "random-25x100", 1, 1.03, 0.9),
            row("gsm8k-20-1ep", "random-25x100", 2, 9.00, 0.0),  # no clean run of seed 2
            row("gsm8k-clean-3ep", "qtuning-auto-25x50", 0, 1.00, 0.9),  # another epochs' clean run
            row("gsm8k-20-1ep", "qtuning-auto-25x50", 0, 0.98, 0.9)]
    regimes = ["gsm8k-clean-1ep", "gsm8k-20-1ep", "gsm8k-clean-3ep"]
    lines = gsm8k.label_cost(runs, regimes, ["random-25x100", "qtuning-auto-25x50"])
    table = [line for line in lines if line.startswith("| gsm8k-")]
    assert table == ["| gsm8k-20-1ep | random-25x100 | +0.020 ± 0.014 (2 of 2 worse) | +0.000 ± 0.000 (0 of 2 worse) "
                     "| -5.0 pp ± 7.1 (1 of 2 worse) | +0.0 pp ± 0.0 (0 of 2 worse) |"]
    assert gsm8k.label_cost(runs, ["gsm8k-20-1ep"], ["random-25x100"]) == []  # its clean regime not reported


def test_label_cost_leaves_out_seeds_across_machines():
    """A seed whose corrupted and clean runs were made on different machines is not paired (the CPUs'
    numerics differ) and is named under the table; with every seed apart the arm has no row."""
    def row(regime, seed, nll, machine):
        return {"regime": regime, "arm": "random-25x100", "seed": seed, "nll": nll, "answer_nll": 0.1,
                "answer_accuracy": 0.9, "accuracy": 0.0, "machine": machine}
    runs = [row("gsm8k-clean-1ep", 0, 1.00, "A"), row("gsm8k-20-1ep", 0, 1.01, "A"),
            row("gsm8k-clean-1ep", 1, 1.00, "A"), row("gsm8k-20-1ep", 1, 0.90, "B")]
    regimes = ["gsm8k-clean-1ep", "gsm8k-20-1ep"]
    lines = gsm8k.label_cost(runs, regimes, ["random-25x100"])
    assert [line for line in lines if line.startswith("| gsm8k-")] == [
        "| gsm8k-20-1ep | random-25x100 | +0.010 (1 of 1 worse) | +0.000 (0 of 1 worse) | +0.0 pp (0 of 1 worse) "
        "| +0.0 pp (0 of 1 worse) |"]
    assert "Left out, the corrupted and the clean run made on different machines: gsm8k-20-1ep random-25x100: " \
           "seed 1." in lines
    apart = gsm8k.label_cost(runs[2:], regimes, ["random-25x100"])
    assert not [line for line in apart if line.startswith("| gsm8k-")]
    assert any(line.endswith("gsm8k-20-1ep random-25x100: seed 1.") for line in apart)


def test_score_auroc_by_hand():
    """AUROC of each score for each corrupted kind against the useful samples, ties counted half, over
    every pool sample of every run; no table without useful or corrupted samples."""
    e = math.e
    step = {"kind": ["useful", "useful", "wrong", "garbled"], "ppl": [e, e ** 2, e ** 2, e ** 3],
            "entropy": [1.0, 0.5, 2.0, 0.0], "nll_max": [1.0, 2.0, 3.0, 0.5]}
    rows, kinds = gsm8k.score_auroc([{"decisions": [step]}, {"decisions": None}])
    assert kinds == ["wrong", "garbled"]
    # wrong: log PPL 2 vs useful 1, 2 -> 0.75; entropy 2 vs 1, 0.5 -> 1; surprise 0 vs 0, 1.5 -> 0.25
    assert rows == ["| log PPL (error) | 0.75 | 1.00 |", "| entropy (uncertainty) | 1.00 | 0.00 |",
                    "| log PPL - entropy (drop_surprising) | 0.25 | 1.00 |", "| largest token NLL | 1.00 | 0.00 |"]
    assert gsm8k.score_auroc([{"decisions": [{**step, "kind": ["useful"] * 4}]}]) == ([], [])


def test_quick_pipeline_pairs_and_resumes(tmp_path, capsys):
    out = tmp_path / "gsm8k"
    first = run_quick(out, capsys)
    runs_file = tmp_path / "gsm8k.runs.jsonl"
    runs = [json.loads(line) for line in runs_file.read_text().splitlines()]
    assert sorted(r["arm"] for r in runs) == ["full-equal-compute", "qtuning-auto-25x50", "random-25x100"]
    assert first.out.count("seed 0 gsm8k-20-1ep") == 3
    for r in runs:
        for key in ("nll", "answer_nll", "answer_accuracy", "accuracy", "train_seconds", "eval_seconds",
                    "generate_seconds"):
            assert math.isfinite(r[key]) and r[key] >= 0, key
        assert r["nll"] > 0 and r["answer_nll"] > 0 and 0 <= r["answer_accuracy"] <= 1 and 0 <= r["accuracy"] <= 1
        assert r["precision"] == "fp32" and len(r["load"]) == 2
    # paired: the same training set in every arm of the seed
    assert len({(r["train_samples"], r["pool_share_corrupted"]) for r in runs}) == 1
    pruned = [r for r in runs if r["arm"] != "full-equal-compute"]
    for r in pruned:
        assert len(r["decisions"]) == 2 and all(sum(s["keep"]) == 2 for s in r["decisions"])  # 25 % of 8
        assert all("?" not in s["kind"] for s in r["decisions"])  # every pool sample's kind found
    for r in pruned:  # the token tally counts every label token of the pools, and what was trained
        counts = [c for cats in r["token_tally"].values() for c in cats.values()]
        assert sum(c[0] for c in counts) == sum(t for s in r["decisions"] for t in s["tokens"])
        assert all(c[0] >= c[1] >= c[2] >= 0 and c[1] >= c[3] >= c[4] >= 0 and c[2] >= c[4] for c in counts)
        if r["arm"] == "qtuning-auto-25x50":  # tokens trained = the whole kept samples' + the pruned ones' kept
            whole = sum(c[1] - c[3] for c in counts)
            assert sum(c[2] for c in counts) == whole + sum(c[4] for c in counts)
        assert abs(sum(c[2] for c in counts) / sum(c[0] for c in counts) - r["kept_tokens_ratio"]) < 1e-9
    # the same pools, in the same order, in both pruning arms
    assert pruned[0]["decisions"][0]["kind"] == pruned[1]["decisions"][0]["kind"]
    eq = next(r for r in runs if r["arm"] == "full-equal-compute")
    assert (eq["batch"], eq["grad_accum"], eq["samples_seen"], eq["decisions"]) == (2, 1, 4, None)
    report = out.with_suffix(".md").read_text()
    assert report.startswith("`python benchmarks/gsm8k.py --regimes gsm8k-20-1ep --arms random-25x100 ")
    row = next(line for line in report.splitlines() if line.startswith("| qtuning-auto-25x50 | 1 |"))
    assert row.count(" of 1)") == 4  # paired with random-25x100 on the four metrics
    # a run made on another machine is reported, not paired: the CPUs' numerics differ
    moved = [{**r, "machine": "another CPU"} if r["arm"] == "qtuning-auto-25x50" else r for r in runs]
    args = gsm8k.parse_args(["--quick", "--regimes", "gsm8k-20-1ep", "--arms", "random-25x100", "qtuning-auto-25x50",
                             "full-equal-compute"])
    text = gsm8k.report(moved, args)
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ") and " | 1 | " in line}
    assert " of 1)" not in rows["qtuning-auto-25x50"] and rows["full-equal-compute"].count(" of 1)") == 4
    assert "Not paired with random-25x100, their runs made on different machines: qtuning-auto-25x50: seed 0." in text
    # a second invocation runs nothing
    again = run_quick(out, capsys)
    assert "seed 0" not in again.out and len(runs_file.read_text().splitlines()) == 3
    assert "3 runs already recorded" in again.out
    # benchmarks/preset_table.py reads the runs, on the final-answer metrics too
    preset_table = importlib.import_module("preset_table")
    assert preset_table.main([str(runs_file), "--arm", "qtuning-auto-25x50", "--metrics", "answer_accuracy",
                              "answer_nll"]) == 0
    table = capsys.readouterr().out
    auto = next(r for r in runs if r["arm"] == "qtuning-auto-25x50")
    assert f"| gsm8k-20-1ep (1 seeds) | {100 * auto['answer_accuracy']:.1f} ± 0.0 % | {auto['answer_nll']:.3f} ± 0.000 |" \
        in table
    assert "Exact match: the runs' answer_accuracy; NLL: their answer_nll." in table
