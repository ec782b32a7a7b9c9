"""Datasets for the command line: load a file or a ``datasets`` dataset, recognise its format, tokenise
it into (input_ids, labels) with the loss on the responses only.

Formats (recognised from the columns of the first record):

- ``messages``: chat, ``{"messages": [{"role": ..., "content": ...}, ...]}`` (also ``conversations``);
  every assistant turn is trained. Needs a tokenizer with a chat template.
- ``prompt-completion``: ``{"prompt": ..., "completion": ...}``, both strings or both message lists
  (TRL's formats); the completion is trained.
- ``alpaca``: ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional); the output is
  trained. Rendered through the chat template (one user turn) when the tokenizer has one, else with
  the Alpaca prompt.

Errors are :class:`DataError` with a one-line message naming the problem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from .core.scoring import IGNORE_INDEX

FORMATS = ("messages", "prompt-completion", "alpaca")
ALPACA_PROMPT = "Below is an instruction that describes a task{with_input}. Write a response that appropriately " \
                "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"


class DataError(ValueError):
    """A dataset that cannot be used, with a message for the user."""


def load_records(source: str | os.PathLike, split: str = "train") -> list[dict[str, Any]]:
    """Records of a jsonl / json / parquet file, a ``save_to_disk`` folder, or a hub dataset id."""
    source = str(source)
    path = Path(source)
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(source)
        except FileNotFoundError:
            raise DataError(f"{source} is a directory but not a dataset saved with save_to_disk") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{source} has no split {split!r} (it has {list(ds)})")
            ds = ds[split]
        records = ds.to_list()
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            records = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise DataError(f"{source}:{n}: not valid JSON ({err.msg})") from None
        elif suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise DataError(f"{source}: not valid JSON ({err.msg}, line {err.lineno})") from None
            records = data if isinstance(data, list) else data.get(split) if isinstance(data, dict) else None
            if not isinstance(records, list):
                raise DataError(f"{source}: expected a JSON list of records (or {{{split!r}: [...]}})")
        elif suffix == ".parquet":
            import datasets

            records = datasets.Dataset.from_parquet(str(path)).to_list()
        else:
            raise DataError(f"{source}: unknown file type {suffix or '(none)'!r}; use .jsonl, .json or .parquet")
    elif _looks_like_hub_id(source):
        import datasets

        try:  # a hub id such as "tatsu-lab/alpaca"
            records = datasets.load_dataset(source, split=split).to_list()
        except Exception as err:  # noqa: BLE001 - offline, unknown id, ...: one line for the user
            raise DataError(f"could not load dataset {source!r}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}") from None
    else:
        raise DataError(f"no such file or directory: {source}")
    if not records:
        raise DataError(f"{source}: the dataset is empty")
    if not all(isinstance(r, dict) for r in records):
        raise DataError(f"{source}: every record must be a JSON object")
    return records


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return (len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and not Path(source).suffix)


def detect_format(records: Sequence[dict[str, Any]], source: str = "dataset") -> str:
    keys = set(records[0])
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt-completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    raise DataError(f"{source}: unknown format, columns {sorted(keys)}; expected 'messages' (chat), "
                    "'prompt' + 'completion', or 'instruction' + 'output' (Alpaca, optional 'input')")


def _ids(encoded) -> list[int]:
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def _chat(tokenizer, messages, **kw) -> list[int]:
    return _ids(tokenizer.apply_chat_template(messages, tokenize=True, **kw))


def _messages(record: dict) -> list[dict]:
    messages = record.get("messages", record.get("conversations"))
    if not isinstance(messages, list) or not messages:
        raise DataError("a record's 'messages' is not a non-empty list")
    out = []
    for m in messages:  # ShareGPT's {"from", "value"} too
        if not isinstance(m, dict):
            raise DataError("a message is not an object with 'role' and 'content'")
        role = m.get("role", {"human": "user", "gpt": "assistant"}.get(m.get("from"), m.get("from")))
        content = m.get("content", m.get("value"))
        if role is None or content is None:
            raise DataError("a message lacks 'role' / 'content'")
        out.append({"role": role, "content": content})
    return out


def encode(record: dict, tokenizer, fmt: str, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record; labels are -100 outside the trained responses."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "alpaca":
        instruction, inp, output = record["instruction"], record.get("input") or "", record["output"]
        if has_template:
            user = f"{instruction}\n\n{inp}" if inp else instruction
            record, fmt = {"messages": [{"role": "user", "content": user},
                                        {"role": "assistant", "content": output}]}, "messages"
        else:
            prompt = ALPACA_PROMPT.format(with_input=", paired with an input that provides further context"
                                          if inp else "", instruction=instruction,
                                          input=f"### Input:\n{inp}\n\n" if inp else "")
            record, fmt = {"prompt": prompt, "completion": output}, "prompt-completion"
    if fmt == "messages":
        if not has_template:
            raise DataError("chat 'messages' need a tokenizer with a chat template; this one has none")
        messages = _messages(record)
        ids = _chat(tokenizer, messages)
        labels = [IGNORE_INDEX] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(_chat(tokenizer, messages[:i], add_generation_prompt=True))
            end = len(_chat(tokenizer, messages[: i + 1]))
            labels[start:end] = ids[start:end]
    elif fmt == "prompt-completion":
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            if not has_template:
                raise DataError("conversational prompt / completion need a tokenizer with a chat template")
            p = _chat(tokenizer, prompt, add_generation_prompt=True)
            ids = _chat(tokenizer, prompt + completion)
        elif isinstance(prompt, str) and isinstance(completion, str):
            p = _ids(tokenizer(prompt, add_special_tokens=True))
            c = _ids(tokenizer(completion, add_special_tokens=False))
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            ids = p + c + eos
        else:
            raise DataError("'prompt' and 'completion' must both be strings or both be message lists")
        labels = [IGNORE_INDEX] * len(p) + ids[len(p):]
    else:
        raise DataError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def check_token_ids(encoded: Sequence[tuple[list[int], list[int]]], vocab_size: int, source: str = "dataset") -> None:
    """A :class:`DataError` if a token id is beyond the model's embeddings (a tokenizer that is not the model's)."""
    for i, (ids, _) in enumerate(encoded):
        top = max(ids, default=0)
        if top >= vocab_size:
            raise DataError(f"{source}: record {i} has token id {top}, but the model has only {vocab_size} token "
                            "embeddings: the tokenizer does not match the model (save the model's own tokenizer "
                            "with it)")


def to_batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """A right-padded batch (input_ids / attention_mask / labels) of :func:`encode`'s outputs."""
    import torch

    from .core.batch import collate_rows

    rows = [{"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
             "labels": torch.tensor(labels)} for ids, labels in examples]
    return collate_rows(rows, side="right", pad_values={"input_ids": pad_id})
