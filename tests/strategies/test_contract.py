"""Properties of every built-in strategy and of the collator, on random batches (hypothesis, derandomized)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pear_lightning.data.collate import collate
from pear_lightning.strategies import (
    DFT,
    BlockIS,
    ImportanceSampling,
    SequenceIS,
    TokenBatch,
    TokenIS,
    TruncatedIS,
    UniformSFT,
    WeightingStrategy,
)

# Derandomized: CI sees the same examples every run; no example database, so nothing depends on earlier runs.
PROFILE = settings(
    max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# Log-probs are <= 0: extremes, exact zeros (of both signs) and values just below zero, or anything in between.
LOGPROBS = st.one_of(
    st.sampled_from([-1e4, -80.0, -20.0, -1.0, -1e-6, -1e-30, -0.0, 0.0]),
    st.floats(min_value=-100.0, max_value=0.0, allow_nan=False, width=32),
)
LOW_CLIPS = st.one_of(st.sampled_from([-10.0, -0.08]), st.floats(-20.0, -1e-3))
HIGH_CLIPS = st.one_of(st.sampled_from([5.0, 0.3]), st.floats(1e-3, 20.0))
CLIPS = {"log_ratio_clip": st.tuples(LOW_CLIPS, HIGH_CLIPS), "log_weight_clip": st.tuples(LOW_CLIPS, HIGH_CLIPS)}
GAMMAS = st.one_of(st.just(1.0), st.floats(1e-3, 1.0))

STRATEGIES = {
    "UniformSFT": st.builds(UniformSFT),
    "DFT": st.builds(DFT),
    "SequenceIS": st.builds(SequenceIS, **CLIPS),
    "TokenIS": st.builds(TokenIS, gamma=GAMMAS, **CLIPS),
    "BlockIS": st.builds(BlockIS, block_size=st.integers(1, 6), gamma=GAMMAS, **CLIPS),
    "TruncatedIS": st.builds(TruncatedIS, cap=st.floats(0.01, 100.0)),
}


@st.composite
def row_masks(draw: st.DrawFn, width: int) -> list[bool]:
    """A row's loss mask: prompt + response + right padding, left padding + prompt + response, several
    assistant turns (any pattern), no loss token, or all loss tokens."""
    kind = draw(st.sampled_from(["right", "left", "turns", "empty", "full"]))
    if kind == "turns":
        return draw(st.lists(st.booleans(), min_size=width, max_size=width))
    start = draw(st.integers(0, width))
    end = {"right": draw(st.integers(start, width)), "left": width, "empty": start, "full": width}[kind]
    start = 0 if kind == "full" else start
    return [start <= t < end for t in range(width)]


@st.composite
def token_batches(draw: st.DrawFn) -> TokenBatch:
    """A random TokenBatch: 1-4 rows of 1-16 tokens, maybe packed (segment ids that start new sequences anywhere);
    behaviour log-probs are -inf or NaN off the mask, where the contract says they are ignored."""
    rows, width = draw(st.integers(1, 4)), draw(st.integers(1, 16))
    cells = st.lists(st.lists(LOGPROBS, min_size=width, max_size=width), min_size=rows, max_size=rows)
    logp, behavior = torch.tensor(draw(cells)), torch.tensor(draw(cells))
    mask = torch.tensor([draw(row_masks(width)) for _ in range(rows)], dtype=torch.bool)
    behavior = torch.where(mask, behavior, torch.tensor(draw(st.sampled_from([-math.inf, math.nan]))))
    segment_ids = None
    if draw(st.booleans()):
        starts = draw(st.lists(st.lists(st.booleans(), min_size=width, max_size=width), min_size=rows, max_size=rows))
        segment_ids = torch.tensor(starts, dtype=torch.long).cumsum(dim=1)
    return TokenBatch(logp=logp, mask=mask, behavior_logp=behavior, segment_ids=segment_ids)


def trajectories(batch: TokenBatch) -> list[tuple[int, list[int]]]:
    """(row, loss positions) of every trajectory (a row, or a segment of a packed row) with a loss token."""
    found = []
    for b, row in enumerate(batch.mask.tolist()):
        segments = batch.segment_ids[b].tolist() if batch.segment_ids is not None else [0] * len(row)
        for segment in dict.fromkeys(segments):
            positions = [t for t, (s, m) in enumerate(zip(segments, row)) if s == segment and m]
            if positions:
                found.append((b, positions))
    return found


def check_range(strategy: WeightingStrategy, batch: TokenBatch, weights: torch.Tensor) -> None:
    """On loss tokens, each strategy's weights stay within its own bounds."""
    on = weights[batch.mask]
    if isinstance(strategy, UniformSFT):
        assert (on == 1).all()
    elif isinstance(strategy, DFT):
        assert ((on >= 0) & (on <= 1)).all()
    elif isinstance(strategy, TruncatedIS):
        assert ((on >= 0) & (on <= torch.tensor(strategy.cap) * (1 + 1e-6))).all()
    else:  # exp of a log-weight clipped in float64, then rounded to float32 (rounding is monotone)
        low, high = (torch.tensor(math.exp(bound), dtype=torch.float32) for bound in strategy.log_weight_clip)
        assert ((on >= low) & (on <= high)).all()


def check_structure(strategy: WeightingStrategy, batch: TokenBatch, weights: torch.Tensor) -> None:
    """SequenceIS gives a trajectory one weight; TokenIS and BlockIS give its last loss token weight 1."""
    for b, positions in trajectories(batch):
        if isinstance(strategy, SequenceIS):
            assert len(set(weights[b, positions].tolist())) == 1
        elif isinstance(strategy, BlockIS):
            assert weights[b, positions[-1]].item() == 1.0


@PROFILE
@given(data=st.data())
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_weights_and_losses_are_finite_bounded_masked_and_detached(name, data):
    strategy = data.draw(STRATEGIES[name], label="strategy")
    batch = data.draw(token_batches(), label="batch")
    logp = batch.logp.clone().requires_grad_()
    behavior = batch.behavior_logp.clone().requires_grad_()  # data, but a plugin might hand it over with grad
    tokens = TokenBatch(logp=logp, mask=batch.mask, behavior_logp=behavior, segment_ids=batch.segment_ids)

    weights = strategy.weights(tokens)
    assert weights.shape == batch.mask.shape and weights.dtype == torch.float32
    assert not weights.requires_grad
    assert torch.isfinite(weights).all()
    assert (weights[~batch.mask] == 0).all()
    check_range(strategy, batch, weights)
    check_structure(strategy, batch, weights)

    losses = strategy.token_losses(tokens)
    assert losses.shape == batch.mask.shape and torch.isfinite(losses).all()
    assert (losses[~batch.mask] == 0).all()
    losses.sum().backward()
    # The gradient flows through logp only, with the weights as constants: d loss_t / d logp_t = -w_t.
    assert torch.equal(logp.grad, torch.where(batch.mask, -weights, torch.zeros_like(weights)))
    assert behavior.grad is None

    if isinstance(strategy, ImportanceSampling):
        metrics = strategy.metrics(tokens, weights)
        assert all(torch.isfinite(value) for value in metrics.values()), metrics


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
