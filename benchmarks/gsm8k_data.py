"""GSM8K for ``benchmarks/gsm8k.py``: loading, a seeded training subset with wrong labels, a seeded
test subset, and the token span of a solution's final answer.

Solutions lose their ``<<48/2=24>>`` calculator annotations: most SFT recipes strip them, they
repeat the computation written beside them, and they make the solutions about a quarter longer
(SmolLM2's tokenizer: 130 tokens on average with them, 96 without). A solution ends with its
final answer on a line of its own, ``#### N``.

Kinds of training sample (``KINDS``): useful (the problem's own solution); wrong (its own solution
with a plausible wrong final result, self-consistent: the last number of the worked steps - the
result of the last computation - and ``#### N`` both become N + delta, delta a small slip:
+-1, +-2, or +-10 for N >= 20); swapped (the worked solution of another problem, drawn from the
train rows outside the training subset so that no useful sample has the same text); garbled (its
own solution's words shuffled).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

KINDS = ("useful", "wrong", "swapped", "garbled")
GARBLED = 0.02  # the share of garbled samples in every noisy regime
ANNOTATION = re.compile(r"<<[^>]*>>")
NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")
FINAL = re.compile(r"####[ \t]*(\S+)[ \t]*$")


def strip_annotations(solution: str) -> str:
    return ANNOTATION.sub("", solution)


def final_answer(solution: str) -> str:
    """The text of N in a solution's last line ``#### N``. Raises ValueError without one."""
    m = FINAL.search(solution.rstrip())
    if not m:
        raise ValueError(f"a GSM8K solution ends with '#### N'; got ...{solution[-40:]!r}")
    return m.group(1)


def value(text: str) -> float:
    return float(text.replace(",", "").replace("$", ""))


def load(path: str | None) -> tuple[list[dict], list[dict], str]:
    """(train rows, test rows, description) with ``question`` and ``answer`` (annotations stripped).

    ``path``: a folder with ``train.jsonl`` and ``test.jsonl`` as OpenAI published them; None: the
    hub's ``openai/gsm8k`` (config ``main``) through ``datasets``."""
    if path is not None:
        folder = Path(path)
        if not (folder / "train.jsonl").exists() or not (folder / "test.jsonl").exists():
            raise SystemExit(f"--data {path}: expected train.jsonl and test.jsonl there")
        splits = [[json.loads(line) for line in (folder / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()
                   if line.strip()] for s in ("train", "test")]
        source = str(path)
    else:
        import datasets

        hub = datasets.load_dataset("openai/gsm8k", "main")
        splits = [list(hub[s]) for s in ("train", "test")]
        source = "openai/gsm8k (main) from the hub"
    train, test = ([{"question": r["question"], "answer": strip_annotations(r["answer"])} for r in rows]
                   for rows in splits)
    return train, test, source


def fingerprint(train: list[dict], test: list[dict]) -> str:
    """A short hash of the rows: runs are resumed and reported on the same data only."""
    h = hashlib.sha1()
    for r in (*train, *test):
        h.update(r["question"].encode() + b"\0" + r["answer"].encode() + b"\0")
    return h.hexdigest()[:12]


def wrong_solution(solution: str, rng: random.Random) -> str | None:
    """The solution with a plausible wrong final result, self-consistent: the worked steps' last number
    (the last computation's result) equals N, and every occurrence of it on its line and ``#### N`` become
    N + delta. None when the last number of the steps is not N (about 3 % of GSM8K's train rows)."""
    body, _, last = solution.rstrip().rpartition("\n")
    try:
        n = value(final_answer(last))
    except ValueError:
        return None
    numbers = list(NUMBER.finditer(body))
    if not numbers or value(numbers[-1].group()) != n or n != int(n):
        return None
    n = int(n)
    deltas = [-2, -1, 1, 2] + ([-10, 10] if n >= 20 else [])
    wrong = n + rng.choice([d for d in deltas if n + d >= 0])

    def shown(text: str) -> str:  # N + delta written as N was: with thousands commas, with decimals
        decimals = len(text.split(".")[1]) if "." in text else 0
        return f"{wrong:,.{decimals}f}" if "," in text else f"{wrong:.{decimals}f}"

    start = body.rfind("\n") + 1  # the line of the last computation
    line = NUMBER.sub(lambda m: shown(m.group()) if value(m.group()) == n else m.group(), body[start:])
    return f"{body[:start]}{line}\n#### {wrong}"


def garbled_solution(solution: str, rng: random.Random) -> str:
    words = solution.split()
    for _ in range(10):
        rng.shuffle(words)
        text = " ".join(words)
        if text != " ".join(solution.split()):
            break
    return text


def mix(noise: float) -> dict[str, float]:
    """Shares of each corrupted kind at a total share ``noise``: garbled ``GARBLED``, the rest half
    wrong, half swapped."""
    if noise == 0:
        return {}
    return {"wrong": (noise - GARBLED) / 2, "swapped": (noise - GARBLED) / 2, "garbled": GARBLED}


def build(train_rows: list[dict], test_rows: list[dict], *, noise: float, n_train: int, n_test: int,
          seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test) for one seed. Train: ``n_train`` rows drawn with the seed (the same rows at every
    noise rate of a seed, and for a smaller ``n_train`` the first of them), each a dict with
    ``question``, ``answer`` (the training label), ``kind`` and ``reference`` (the row's own solution);
    exactly round(n_train x share) samples of each corrupted kind (``mix``), placed with the seed and the
    noise rate. Test: ``n_test`` test rows drawn with the seed, with their solutions and ``target`` N."""
    if n_train > len(train_rows):
        raise ValueError(f"n_train {n_train} > {len(train_rows)} train rows")
    order = list(range(len(train_rows)))
    random.Random(1000 + seed).shuffle(order)
    chosen, donors = order[:n_train], order[n_train:]
    shares = mix(noise)
    counts = {k: round(n_train * s) for k, s in shares.items()}
    if shares:
        counts["swapped"] = round(n_train * noise) - counts["wrong"] - counts["garbled"]
    rng = random.Random(f"{seed}-{noise}")
    wrongs = {}
    for i in rng.sample(range(n_train), n_train):  # the first eligible ones become wrong
        if len(wrongs) == counts.get("wrong", 0):
            break
        text = wrong_solution(train_rows[chosen[i]]["answer"], rng)
        if text is not None:
            wrongs[i] = text
    if len(wrongs) < counts.get("wrong", 0):
        raise ValueError(f"only {len(wrongs)} of {n_train} solutions can take a wrong final result")
    rest = [i for i in range(n_train) if i not in wrongs]
    rng.shuffle(rest)
    swapped = set(rest[:counts.get("swapped", 0)])
    garbled = set(rest[len(swapped):len(swapped) + counts.get("garbled", 0)])
    train = []
    for i, j in enumerate(chosen):
        row = train_rows[j]
        kind, answer = "useful", row["answer"]
        if i in wrongs:
            kind, answer = "wrong", wrongs[i]
        elif i in swapped:
            kind = "swapped"
            own = value(final_answer(row["answer"]))
            answer = next(train_rows[d]["answer"] for d in rng.sample(donors, len(donors))
                          if value(final_answer(train_rows[d]["answer"])) != own)
        elif i in garbled:
            kind, answer = "garbled", garbled_solution(row["answer"], rng)
        train.append({"question": row["question"], "answer": answer, "kind": kind, "reference": row["answer"]})
    picked = random.Random(99_000 + seed).sample(range(len(test_rows)), min(n_test, len(test_rows)))
    test = [{**test_rows[j], "target": final_answer(test_rows[j]["answer"])} for j in picked]
    return train, test


def answer_span(offsets: list[tuple[int, int]], lo: int, hi: int) -> list[int]:
    """The positions of the tokens that cover characters ``lo:hi`` (``offsets``: each token's character
    span, as a fast tokenizer's offset mapping; empty spans, such as added special tokens', never count)."""
    return [t for t, (s, e) in enumerate(offsets) if s < hi and e > lo and e > s]


# the categories of a solution's tokens (``token_categories``), in the order of the text
CATEGORIES = ("words", "numbers", "####", "final answer", "end of turn")
_MARKER = re.compile(r"####[ \t]*")
_ANSWER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def token_categories(pieces: list[str], special: list[bool]) -> list[str]:
    """Each label token's category (``CATEGORIES``), from its decoded text (``pieces``, in order) and
    whether it is a special token (the end of turn):
    - ``final answer``: the tokens that cover N in the last ``#### N``;
    - ``####``: those that cover the marker (and the blank after it) and not N;
    - ``end of turn``: special tokens, and whatever follows N (the template's newline);
    - ``numbers``: any other token with a digit (the worked computations);
    - ``words``: the rest.
    A text without ``#### N`` (a garbled sample, or truncated) has numbers and words only."""
    text = "".join(pieces)
    starts = [0]
    for p in pieces:
        starts.append(starts[-1] + len(p))
    marker = None
    for marker in _MARKER.finditer(text):
        pass
    answer = _ANSWER.match(text, marker.end()) if marker else None
    out = []
    for p, sp, s, e in zip(pieces, special, starts, starts[1:]):
        if sp or (answer and s >= answer.end()):
            out.append("end of turn")
        elif answer and s < answer.end() and e > answer.start():
            out.append("final answer")
        elif answer and s < answer.start() and e > marker.start():
            out.append("####")
        elif any(c.isdigit() for c in p):
            out.append("numbers")
        else:
            out.append("words")
    return out
