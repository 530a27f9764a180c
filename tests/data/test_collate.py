"""Collation: examples right-padded into rows, or packed several to a row with their own positions and segment ids;
either way every example's tokens, loss mask and behaviour log-probs are where the loss expects them (checked on
random examples too: hypothesis, derandomized)."""

import pytest
import torch
from conftest import SMALL_CHATS, collate_with_behavior
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pear_lightning.data.collate import collate, pack

# Derandomized: CI sees the same examples every run; no example database, so nothing depends on earlier runs.
PROFILE = settings(
    max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# Log-probs are <= 0: extremes, exact zeros (of both signs) and values just below zero, or anything in between.
LOGPROBS = st.one_of(
    st.sampled_from([-1e4, -80.0, -20.0, -1.0, -1e-6, -1e-30, -0.0, 0.0]),
    st.floats(min_value=-100.0, max_value=0.0, allow_nan=False, width=32),
)


def test_behaviour_logprobs_are_placed_on_the_response_tokens(tokenizer):
    batch, behavior = collate_with_behavior(tokenizer, SMALL_CHATS)
    for i, row in enumerate(behavior):
        assert batch["behavior_logp"][i][batch["loss_mask"][i]].tolist() == pytest.approx(row["logprobs"])
    assert (batch["behavior_logp"][~batch["loss_mask"]] == 0).all()


def test_packing_fills_rows_up_to_the_capacity_first_fit_longest_first():
    lengths = [10, 3, 7, 2, 9, 1]
    assert pack(lengths, 10) == [[0], [4, 5], [2, 1], [3]]
    assert pack(lengths, 16) == [[0, 1, 3, 5], [4, 2]]
    assert pack(lengths, 4) == pack(lengths, 10)  # a capacity below the longest example is raised to it


def test_a_packed_batch_lays_every_example_out_once_with_its_own_positions(mixed_rows):
    padded, packed = collate(mixed_rows, 0), collate(mixed_rows, 0, pack_length=256)
    assert packed["input_ids"].shape[1] <= 256
    assert packed["input_ids"].numel() < 0.75 * padded["input_ids"].numel()
    assert packed["num_tokens"] == padded["num_tokens"] and packed["ids"] == padded["ids"]
    starts = packed["cu_seq_lens"].tolist()
    flat = {key: packed[key].flatten() for key in ("input_ids", "loss_mask", "behavior_logp", "position_ids")}
    for i, row in enumerate(mixed_rows):
        where = (packed["segment_ids"].flatten() == i).nonzero().squeeze(1)
        n = len(row["input_ids"])
        assert where.tolist() == list(range(where[0], where[0] + n)) and where[0].item() in starts
        assert flat["input_ids"][where].tolist() == row["input_ids"]
        assert flat["loss_mask"][where].tolist() == row["loss_mask"]
        assert flat["position_ids"][where].tolist() == list(range(n))
        expected = torch.tensor(row["behavior_logp"])
        assert torch.equal(flat["behavior_logp"][where][flat["loss_mask"][where]], expected)
    padding = packed["segment_ids"] == -1
    assert not (packed["attention_mask"] & padding).any() and not (packed["loss_mask"] & padding).any()
    assert packed["max_seq_len"] == max(b - a for a, b in zip(starts, starts[1:]))


@st.composite
def tokenised_rows(draw: st.DrawFn) -> list[dict]:
    """1-5 tokenised examples as the join leaves them: each with one behaviour log-prob per loss token."""
    rows = []
    for i in range(draw(st.integers(1, 5))):
        n = draw(st.integers(1, 20))
        loss_mask = [False] + draw(st.lists(st.booleans(), min_size=n - 1, max_size=n - 1))
        num_loss = sum(loss_mask)
        rows.append(
            {
                "id": f"ex-{i}",
                "input_ids": draw(st.lists(st.integers(0, 255), min_size=n, max_size=n)),
                "loss_mask": loss_mask,
                "num_loss_tokens": num_loss,
                "behavior_logp": draw(st.lists(LOGPROBS, min_size=num_loss, max_size=num_loss)),
            }
        )
    return rows


@PROFILE
@given(rows=tokenised_rows())
def test_collated_batches_are_right_padded_and_aligned(rows):
    pad = 7
    batch = collate(rows, pad)
    lengths = [len(r["input_ids"]) for r in rows]
    shape = (len(rows), max(lengths))
    assert batch["ids"] == [r["id"] for r in rows]
    assert batch["num_tokens"] == sum(lengths)
    for key in ("input_ids", "attention_mask", "loss_mask", "behavior_logp"):
        assert batch[key].shape == shape, key
    assert batch["attention_mask"].dtype == batch["loss_mask"].dtype == torch.bool
    assert batch["behavior_logp"].dtype == torch.float32
    assert not (batch["loss_mask"] & ~batch["attention_mask"]).any()  # loss tokens are real tokens
    for i, (row, n) in enumerate(zip(rows, lengths)):
        assert batch["attention_mask"][i].tolist() == [True] * n + [False] * (shape[1] - n)
        assert batch["input_ids"][i].tolist() == row["input_ids"] + [pad] * (shape[1] - n)
        assert batch["loss_mask"][i].tolist() == row["loss_mask"] + [False] * (shape[1] - n)
        # The behaviour log-probs of the kept loss tokens, in order, on those tokens; zero everywhere else.
        expected = torch.tensor(row["behavior_logp"], dtype=torch.float32)
        assert torch.equal(batch["behavior_logp"][i][batch["loss_mask"][i]], expected)
        assert (batch["behavior_logp"][i][~batch["loss_mask"][i]] == 0).all()


@PROFILE
@given(rows=tokenised_rows(), pack_length=st.integers(1, 40))
def test_packed_batches_hold_every_example_once_with_its_own_positions_and_are_never_larger(rows, pack_length):
    padded, packed = collate(rows, 7), collate(rows, 7, pack_length)
    lengths = [len(r["input_ids"]) for r in rows]
    assert packed["input_ids"].numel() <= padded["input_ids"].numel()
    assert packed["input_ids"].shape[1] <= max(pack_length, *lengths)
    assert packed["ids"] == padded["ids"] and packed["num_tokens"] == sum(lengths)
    segments = packed["segment_ids"].flatten()
    for i, row in enumerate(rows):
        where = (segments == i).nonzero().squeeze(1)
        assert where.tolist() == list(range(where[0], where[0] + lengths[i]))  # contiguous, in one row
        assert packed["input_ids"].flatten()[where].tolist() == row["input_ids"]
        assert packed["position_ids"].flatten()[where].tolist() == list(range(lengths[i]))
        mask = packed["loss_mask"].flatten()[where]
        assert mask.tolist() == row["loss_mask"]
        expected = torch.tensor(row["behavior_logp"], dtype=torch.float32)
        assert torch.equal(packed["behavior_logp"].flatten()[where][mask], expected)
    padding = segments == -1
    assert not packed["attention_mask"].flatten()[padding].any() and not packed["loss_mask"].flatten()[padding].any()
    assert (packed["behavior_logp"].flatten()[~packed["loss_mask"].flatten()] == 0).all()
    # The scored positions are the loss tokens that are not the first of their sequence, in both layouts.
    assert len(packed["scored"]) == len(padded["scored"]) == sum(sum(r["loss_mask"][1:]) for r in rows)
