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
