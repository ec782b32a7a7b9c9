import pytest
import torch

from qtuning_plugin.core import apply_decision
from tiny import padded_batch, tiny_model


def test_drop_rows_mask_tokens_trim_right_padding():
    batch = padded_batch([5, 9, 3], [2, 3, 1])
    batch["position_ids"] = torch.arange(9).expand(3, 9).clone()
    batch["note"] = "kept as is"
    keep = torch.tensor([True, False, True])
    token_keep = batch["labels"] != -100
    token_keep[0, 3] = False  # prune one response token of row 0
    token_keep[:, 0] = False  # position 0 is never trainable: nothing to do there
    out = apply_decision(batch, keep, token_keep)
    assert out["input_ids"].shape == (2, 5)  # the 9-token row is gone: 4 padding columns trimmed
    assert torch.equal(out["input_ids"], batch["input_ids"][[0, 2], :5])
    assert torch.equal(out["position_ids"], batch["position_ids"][[0, 2], :5])
    want = batch["labels"][[0, 2], :5].clone()
    want[0, 3] = -100
    assert torch.equal(out["labels"], want)
    assert out["note"] == "kept as is"
    assert batch["labels"][0, 3] != -100  # the input batch is untouched


def test_left_padding_trims_leading_columns():
    batch = padded_batch([5, 9, 3], [2, 3, 1], padding_side="left")
    out = apply_decision(batch, torch.tensor([True, False, True]))
    assert out["input_ids"].shape == (2, 5)
    assert torch.equal(out["attention_mask"], batch["attention_mask"][[0, 2], 4:])
    assert torch.equal(out["labels"], batch["labels"][[0, 2], 4:])


def test_result_is_a_valid_batch_for_the_model():
    model = tiny_model("llama")
    batch = padded_batch([5, 9, 3], [2, 3, 1])
    out = apply_decision(batch, torch.tensor([True, False, True]))
    loss = model(**out).loss
    assert torch.isfinite(loss)
    # the same loss as the two kept rows scored alone, each unpadded
    per_row = []
    for b, n in ((0, 5), (2, 3)):
        logits = model(input_ids=batch["input_ids"][b:b + 1, :n]).logits[0, :-1]
        labels = batch["labels"][b, 1:n]
        per_row.append(torch.nn.functional.cross_entropy(logits, labels, reduction="sum", ignore_index=-100))
    n_tokens = int((out["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss, sum(per_row) / n_tokens, rtol=1e-5, atol=1e-6)


def test_errors():
    batch = padded_batch([5, 9], [2, 3])
    with pytest.raises(ValueError, match="no row kept"):
        apply_decision(batch, torch.tensor([False, False]))
    with pytest.raises(ValueError, match=r"keep must be bool \[2\]"):
        apply_decision(batch, torch.tensor([True]))
    with pytest.raises(ValueError, match=r"token_keep must be bool \[2, 9\]"):
        apply_decision(batch, torch.tensor([True, True]), torch.ones(2, 3, dtype=torch.bool))
