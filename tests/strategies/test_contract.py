"""Properties of every built-in strategy and of the collator, on random batches (hypothesis, derandomized)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
