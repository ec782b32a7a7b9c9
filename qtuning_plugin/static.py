"""``qtuning prune``: a static Q-Tuning pass over a dataset ``qtuning analyze`` scored, for any trainer.

The whole dataset is one pool, decided as one training step would be
(:func:`~qtuning_plugin.core.step.decide_step`, with the config's rules): the triage at the
sample ratio, the rules' samples kept out of it (K still counts them), the token stage in the kept
misconception samples (``token_ratio``, ``neighbor_lambda``, ``keep_tokens``, ``token_budget``).
Its scores are the analysed rows: each sample's PPL and entropy, and the NLL of each label token
(the per-token entropy is not stored: NaN, and no rule reads it).

Options: ``--preset`` and every option that decides (:data:`STATIC_OPTIONS`). Not offered:
``pool`` (here the pool is the dataset) and the runtime options (``chunk_size``, ``log_decisions``,
``plot_every``: nothing is trained). A rule that needs the model being trained, one that runs
forwards of its own (:meth:`~qtuning_plugin.core.rules.Rule.prepare`; the reference guard), is
refused with its option named (exit status 2).
"""

from __future__ import annotations

import os
from pathlib import Path

from .cli_options import flag, given_options
from .core.config import OPTIONS
from .offline import CLIError, _dataset, _read_rows, _write_rows

STATIC_OPTIONS = tuple(o.name for o in OPTIONS if o.group != "runtime" and o.name != "pool")


def static_rules(config) -> list:
    """The rules ``config`` turns on, or :class:`CLIError` naming the option of one that needs the
    model being trained."""
    from .core.rules import Rule, build_rules

    rules = build_rules(config)
    for rule in rules:
        if type(rule).prepare is not Rule.prepare:
            options = [o for o in rule.options if getattr(config, o.name) != o.default] or rule.options[:1]
            given = " ".join(f"{flag(o.name)} {getattr(config, o.name)}" for o in options)
            raise CLIError(f"{given}: the {rule.name} needs the model being trained (it runs forwards of its own "
                           "while training), which a static pass does not have; use it in training (QTuning, the "
                           "Axolotl plugin) or leave it off")
    return rules


def scores_of(rows: list[dict]):
    """One :class:`~qtuning_plugin.core.Scores` of every analysed row, in order (a row without a
    label token, or without a score, has PPL and entropy NaN: it is no sample)."""
    import torch

    from .core import Scores

    n, width = len(rows), max(1, max(len(r["token_nll"]) for r in rows))
    nll = torch.zeros(n, width, dtype=torch.float64)
    trainable = torch.zeros(n, width, dtype=torch.bool)
    for i, r in enumerate(rows):
        at = [j for j, x in enumerate(r["token_nll"]) if x is not None]
        nll[i, at] = torch.tensor([r["token_nll"][j] for j in at], dtype=torch.float64)
        trainable[i, at] = True
    scored = [bool(trainable[i].any()) and r["ppl"] is not None and r["entropy"] is not None
              for i, r in enumerate(rows)]
    nan = float("nan")
    return Scores(ppl=torch.tensor([r["ppl"] if ok else nan for r, ok in zip(rows, scored)], dtype=torch.float64),
                  entropy=torch.tensor([r["entropy"] if ok else nan for r, ok in zip(rows, scored)],
                                       dtype=torch.float64),
                  nll=nll, token_entropy=torch.full_like(nll, nan), trainable=trainable,
                  input_tokens=torch.tensor([len(r["token_nll"]) for r in rows], dtype=torch.long))


def prune(args) -> int:
    import json

    from .core import QTuningConfig, scored_mask
    from .core.scoring import IGNORE_INDEX
    from .core.step import decide_step
    from .decision_log import sample_id

    config = QTuningConfig.from_dict(given_options(args))
    rules = static_rules(config)
    scores_path = Path(args.scores)
    if not scores_path.is_file():
        raise CLIError(f"--scores: no such file: {scores_path}")
    out = Path(args.out)
    if out.suffix not in (".jsonl", ".parquet"):
        raise CLIError(f"--out {out}: use a .jsonl or .parquet file name")
    rows = _read_rows(scores_path)
    if not rows or not all("index" in r and "ppl" in r and "entropy" in r and "token_nll" in r for r in rows):
        raise CLIError(f"{scores_path} is not a file written by qtuning analyze (rows need index, ppl, entropy, "
                       "token_nll)")
    meta_path = scores_path.with_name(scores_path.name + ".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    model = args.model or meta.get("model")
    if model is None:
        raise CLIError(f"no tokenizer known for {scores_path} (no {meta_path.name}): pass --model")
    tok = _tokenizer(model)
    args.max_length = meta.get("max_length")
    records, fmt, encoded = _dataset(args, tok)
    for r in rows:
        i = r["index"]
        if i >= len(encoded) or r["id"] != sample_id(encoded[i][0]):
            raise CLIError(f"{scores_path} does not match {args.data}: sample {i} has other tokens "
                           "(another dataset, tokenizer or max_length?)")
    scores = scores_of(rows)
    if not scored_mask(scores.ppl, scores.entropy).any():
        raise CLIError(f"{scores_path}: no scored sample has a response token")
    decision = decide_step([scores], config, rules=rules)
    keep, token_keep = decision.keep[0].tolist(), decision.token_keep[0]
    written, tokens_in, tokens_kept = [], 0, 0
    for i, r in enumerate(rows):
        if not keep[i]:
            continue
        ids, labels = encoded[r["index"]]
        kept = token_keep[i, :len(labels)].tolist()
        written.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                        "labels": [lab if k else IGNORE_INDEX for lab, k in zip(labels, kept)]})
        tokens_in += int(scores.trainable[i].sum())
        tokens_kept += sum(kept)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_rows(written, out)
    kept_out = "".join(f"; {int(mask.sum())} kept out by the rules' field {field!r}"
                       for field, mask in decision.flags.items())
    print(f"wrote {out}: {len(written)} of {len(rows)} samples (sample ratio {config.sample_ratio:g}{kept_out}), "
          f"{tokens_kept} of their {tokens_in} label tokens kept (token ratio {config.token_ratio:g} in "
          f"misconception samples, the tokens of {config.keep_tokens} score); columns input_ids, attention_mask, "
          "labels")
    return 0


def _tokenizer(name: str):
    from .models import ModelError, tiny

    if name == "tiny":
        return tiny()[1]
    from transformers import AutoTokenizer

    path = name
    if name == "smollm2":
        from . import smollm2

        path = str(smollm2.model_dir())
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(path))
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"could not load the tokenizer of {name!r} ({type(err).__name__})") from None
    return tok
