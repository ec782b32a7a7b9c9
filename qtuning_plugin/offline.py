"""``qtuning analyze``: score every sample of a dataset on the Error-Uncertainty plane with a causal
LM (resumable), write per-sample rows and a picture; and what the commands share (errors, reading
datasets and rows). ``qtuning prune``, the static pass over those rows, is :mod:`.static`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class CLIError(Exception):
    """An expected problem of a command: printed as one line, exit status 2."""


def _require(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise CLIError(f"this command needs {module}: pip install 'qtuning-plugin[{extra}]'")


# ---------------------------------------------------------------------- shared

def _dataset(args, tokenizer, limit: int | None = None, records: list | None = None):
    """(records, format, encoded [(input_ids, labels)]) of --data."""
    from .data import DataError, detect_format, encode, load_records

    records = records if records is not None else load_records(args.data, args.split)
    if limit:
        records = records[:limit]
    fmt = detect_format(records, args.data)
    encoded = []
    for i, record in enumerate(records):
        try:
            encoded.append(encode(record, tokenizer, fmt, getattr(args, "max_length", None)))
        except (KeyError, TypeError) as err:
            raise DataError(f"{args.data}: record {i} does not fit the {fmt} format ({type(err).__name__}: {err})") \
                from None
    return records, fmt, encoded


def _write_rows(rows: list[dict], path: Path) -> None:
    """jsonl or parquet by suffix, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(tmp))
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import datasets

        return datasets.Dataset.from_parquet(str(path)).to_list()
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by an interruption
                    continue
    return rows


# ---------------------------------------------------------------------- analyze

def analyze(args) -> int:
    import torch

    from .core import median_quadrants, score_batch, scoring_mode
    from .core.scoring import IGNORE_INDEX
    from .data import check_token_ids, to_batch
    from .decision_log import finite_or_none as _num
    from .decision_log import sample_id
    from .models import load
    from .precision import compute_dtype

    out = Path(args.out or f"{Path(args.data.rstrip('/')).stem or 'dataset'}.scores.jsonl")
    if out.suffix not in (".jsonl", ".parquet"):
        raise CLIError(f"--out {out}: use a .jsonl or .parquet file name")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.load_in_4bit:
        _require("bitsandbytes", "qlora")
    # Data first: a bad dataset should fail before a model is loaded.
    from .data import detect_format, load_records

    records = load_records(args.data, args.split)
    detect_format(records, args.data)
    # bf16 weights only on GPUs that compute bf16 natively; on CPUs the scores are fp32 (and bitsandbytes
    # computes in bf16 only where the CPU has it: emulated bf16 is 15-50x slower, see precision.py).
    dtype = compute_dtype(device) if device.startswith("cuda") else None
    model, tok, description = load(args.model, load_in_4bit=args.load_in_4bit, dtype=dtype, device=device)
    records, fmt, encoded = _dataset(args, tok, args.limit, records)
    check_token_ids(encoded, model.get_input_embeddings().num_embeddings, args.data)
    if not any(any(x != IGNORE_INDEX for x in lab) for _, lab in encoded):
        raise CLIError(f"{args.data}: no sample has a response token to score (all labels are masked)")

    meta = {"model": args.model, "data": str(args.data), "split": args.split, "format": fmt,
            "max_length": args.max_length, "n_samples": len(encoded)}
    meta_path = out.with_name(out.name + ".meta.json")
    partial = out.with_name(out.name + ".partial.jsonl")
    done: dict[int, dict] = {}
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        changed = [k for k in ("model", "data", "split", "max_length") if old.get(k) != meta[k]]
        if changed:
            raise CLIError(f"{out} holds scores made with a different {', '.join(changed)} "
                           f"({', '.join(f'{k}={old.get(k)!r}' for k in changed)}); use another --out or delete it")
        for source in (out, partial):
            if source.exists():
                for row in _read_rows(source):
                    if row.get("index") is not None and row["index"] < len(encoded):
                        done[row["index"]] = row
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=1))
    for i, row in done.items():
        if row.get("id") != sample_id(encoded[i][0]):
            raise CLIError(f"{out}: sample {i} no longer matches the dataset (its tokens changed); "
                           "use another --out or delete it")

    todo = sorted((i for i in range(len(encoded)) if i not in done), key=lambda i: -len(encoded[i][0]))
    if done:
        print(f"resuming: {len(done)} of {len(encoded)} samples already scored in {out}", file=sys.stderr)
    computes = (dtype or compute_dtype(device)) if args.load_in_4bit else (dtype or torch.float32)
    precision = ("NF4 weights, " if args.load_in_4bit else "") + ("bf16" if computes == torch.bfloat16 else "fp32")
    print(f"scoring {len(todo)} samples of {args.data} ({fmt}) with {description} on {device} ({precision})",
          file=sys.stderr)
    from tqdm.auto import tqdm

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with open(partial, "a", encoding="utf-8") as f, scoring_mode(model), tqdm(total=len(todo), unit="sample") as bar:
        for start in range(0, len(todo), args.batch_size):
            idx = todo[start:start + args.batch_size]
            batch = {k: v.to(device) for k, v in to_batch([encoded[i] for i in idx], pad).items()}
            s = score_batch(model, batch)
            for r, i in enumerate(idx):
                n = len(encoded[i][0])
                trainable = s.trainable[r, :n].tolist()
                nll = [float(x) if t else None for x, t in zip(s.nll[r, :n].tolist(), trainable)]
                row = {"index": i, "id": sample_id(encoded[i][0]), "ppl": _num(s.ppl[r]),
                       "entropy": _num(s.entropy[r]), "n_tokens": int(sum(trainable)), "token_nll": nll}
                f.write(json.dumps(row) + "\n")
                done[i] = row
            f.flush()
            bar.update(len(idx))

    # Whole-dataset quantities: quadrants (by medians) and the triage at --sample-ratio.
    from .plots import plot_scores, triage_thresholds

    rows = [done[i] for i in range(len(encoded))]
    scorable = [r for r in rows if r["n_tokens"] > 0 and r["ppl"] is not None and r["entropy"] is not None]
    quadrants = median_quadrants(torch.tensor([r["ppl"] for r in scorable], dtype=torch.float64),
                                 torch.tensor([r["entropy"] for r in scorable], dtype=torch.float64)).tolist()
    th = triage_thresholds([r["ppl"] for r in scorable], [r["entropy"] for r in scorable], args.sample_ratio)
    for r in rows:
        r.update(quadrant=None, kept=False)
    for r, q, k in zip(scorable, quadrants, th["keep"]):
        r.update(quadrant=q, kept=bool(k))
    ordered = [{k: r[k] for k in ("index", "id", "ppl", "entropy", "quadrant", "n_tokens", "kept", "token_nll")}
               for r in rows]
    _write_rows(ordered, out)
    partial.unlink(missing_ok=True)
    picture = Path(args.plot or out.with_suffix(".png"))
    plot_scores(scorable, picture, args.sample_ratio,
                title=f"{Path(args.data).name}: {len(scorable)} samples, {description}")
    _print_examples(rows, records, fmt)
    skipped = len(rows) - len(scorable)
    print(f"wrote {out} ({len(rows)} rows{f', {skipped} without a response token' if skipped else ''}) "
          f"and {picture}; at sample ratio {args.sample_ratio:g}: {sum(r['kept'] for r in rows)} kept, "
          f"triage level {th['level']:.3f}")
    return 0


def _response_text(record: dict, fmt: str) -> str:
    if fmt == "messages":
        msgs = record.get("messages", record.get("conversations")) or []
        text = " | ".join(str(m.get("content", m.get("value", ""))) for m in msgs
                          if m.get("role", m.get("from")) in ("assistant", "gpt"))
    elif fmt == "prompt-completion":
        c = record["completion"]
        text = c if isinstance(c, str) else " | ".join(str(m.get("content", "")) for m in c)
    else:
        text = str(record.get("output", ""))
    text = " ".join(text.split())
    return text if len(text) <= 100 else text[:97] + "..."


def _print_examples(rows, records, fmt, per_quadrant: int = 3) -> None:
    from .plots import quadrant_label

    for q in (1, 2, 3, 4):
        in_q = sorted((r for r in rows if r["quadrant"] == q), key=lambda r: -(r["ppl"] or 0))
        if not in_q:
            continue
        print(f"{quadrant_label(q)}: {len(in_q)} samples, e.g.")
        step = max(1, len(in_q) // per_quadrant)
        for r in in_q[::step][:per_quadrant]:
            print(f"  #{r['index']:<5} ppl {r['ppl']:8.2f}  entropy {r['entropy']:.3f}  "
                  f"{_response_text(records[r['index']], fmt)}")
