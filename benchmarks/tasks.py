"""Synthetic chat fine-tuning data with checkable answers, for the benchmarks.

``word_problems``: two-step arithmetic word problems with a worked answer that ends in
"The answer is N." (the exact-match target). Lengths are set by a context paragraph so that the
speed benchmark sees realistic sequence lengths.
"""

from __future__ import annotations

import random

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatma", "Goro", "Hana", "Ivo", "Juno"]
ITEMS = ["apples", "books", "coins", "shells", "stamps", "marbles", "cards", "pencils"]
FILLER = ("The market opens early and the stalls are busy. Prices are written on small boards. "
          "Some people come every week; others only when the weather is good. ")


def word_problem(rng: random.Random, context_sentences: int = 0) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 60), rng.randint(2, 9), rng.randint(2, 12)
    d = rng.randint(1, a + b * c - 1)
    x = b * c
    y = a + x
    z = y - d
    context = FILLER * context_sentences
    prompt = (f"{context}{name} has {a} {item}. {name} buys {b} bags with {c} {item} in each bag, then gives "
              f"away {d} {item}. How many {item} does {name} have now?")
    answer = (f"{name} buys {b} x {c} = {x} {item}. Then {name} has {a} + {x} = {y} {item}. "
              f"After giving away {d}, {name} has {y} - {d} = {z} {item}. The answer is {z}.")
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "answer": z}


def word_problems(n: int, seed: int = 0, context_sentences: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [word_problem(rng, context_sentences) for _ in range(n)]


def demo_records(n: int = 320, seed: int = 7) -> list[dict]:
    """The dataset `qtuning demo` ships (qtuning_plugin/demo_data/word_problems.jsonl): worked word
    problems, of which 5 % have a plausible wrong final answer, 5 % a garbled answer (words
    shuffled) and 10 % are copies of two fixed problems; ``kind`` says which."""
    rng = random.Random(seed)
    fixed = [word_problem(random.Random(k)) for k in range(2)]
    rows = []
    for _ in range(n):
        u = rng.random()
        kind = "wrong" if u < 0.05 else "garbled" if u < 0.10 else "redundant" if u < 0.20 else "useful"
        row = dict(rng.choice(fixed)) if kind == "redundant" else word_problem(rng)
        answer = row["messages"][1]["content"]
        if kind == "wrong":
            z = row["answer"]
            wrong = z + rng.choice([-3, -2, -1, 1, 2, 3])
            answer = answer.replace(f"= {z} ", f"= {wrong} ").replace(f"The answer is {z}.", f"The answer is {wrong}.")
        elif kind == "garbled":
            words = answer.split()
            rng.shuffle(words)
            answer = " ".join(words)
        rows.append({"messages": [row["messages"][0], {"role": "assistant", "content": answer}], "kind": kind})
    return rows


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:] != ["--demo"]:
        sys.exit("usage: python benchmarks/tasks.py --demo > qtuning_plugin/demo_data/word_problems.jsonl")
    for record in demo_records():
        print(json.dumps(record))
