"""Tiny causal LMs built from configs (no hub, ``qtuning_plugin.models.tiny_config``), shared by the tests."""

import torch
import transformers

from qtuning_plugin.models import tiny_config  # noqa: F401  (the one builder; re-exported for the tests)


def tiny_model(kind: str = "llama", seed: int = 0, vocab_size: int = 128, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_config(kind, vocab_size, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init gives near-uniform predictions; scale the head so that scores vary.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model.eval()


def padded_batch(lengths, prompt_lengths, vocab_size=128, padding_side="right", seed=0, pad_id=0):
    """input_ids / attention_mask / labels with the prompt and the padding labelled -100."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.full((len(lengths), t), pad_id)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    labels = torch.full((len(lengths), t), -100)
    for b, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        row = torch.randint(1, vocab_size, (n,), generator=g)
        cols = slice(0, n) if padding_side == "right" else slice(t - n, t)
        ids[b, cols] = row
        mask[b, cols] = 1
        lab = row.clone()
        lab[:p] = -100
        labels[b, cols] = lab
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +=?.,:"


def tiny_tokenizer(padding_side="right"):
    """A character-level tokenizer built in memory (ids 0-2 are <pad>, <s>, </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", padding_side=padding_side)


def arithmetic_dataset(n=32, seed=0):
    """prompt / completion pairs of varied lengths ("12+7=" -> "19")."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 10 ** rng.randint(1, 4)), rng.randint(0, 10 ** rng.randint(1, 4))
        filler = " " * rng.randint(0, 6)
        rows.append({"prompt": f"what is {a}+{b}?{filler}", "completion": f" {a + b}. so {a}+{b}={a + b}"})
    return rows
