"""PEAR's importance-sampling weightings (arXiv 2602.01058): sequence, token and block level, with clipping.

For each trajectory (a row, or a segment of a packed row) with loss tokens 1..T, the per-token
log-ratio δ_j = log π_θ(y_j) − log π_β(y_j) is taken from the detached current log-probs, clipped
to ``log_ratio_clip``, and summed over suffixes; the result is discounted, clipped to
``log_weight_clip`` and exponentiated once. All of it is vectorised prefix sums over [B, T].
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from .base import TokenBatch, WeightingStrategy

Clip = tuple[float, float]
RATIO_CLIP: Clip = (-0.08, 0.30)  # PEAR's defaults: bounds of each token's log-ratio,
WEIGHT_CLIP: Clip = (-10.0, 5.0)  # and of the final log-weight


def _check_clip(name: str, bounds: Clip) -> Clip:
    low, high = (float(b) for b in bounds)
    if not low <= 0 <= high:
        raise ValueError(f"{name} must be (low, high) with low <= 0 <= high, got {tuple(bounds)}")
    return low, high


def _segment_bounds(segment_ids: Tensor | None, shape: torch.Size, device: torch.device) -> tuple[Tensor, Tensor]:
    """For every position, the index of the first and of the last position of its trajectory."""
    positions = torch.arange(shape[1], device=device).expand(shape)
    if segment_ids is None:
        return torch.zeros_like(positions), torch.full_like(positions, shape[1] - 1)
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = torch.nn.functional.pad(change, (1, 0), value=True)
    ends = torch.nn.functional.pad(change, (0, 1), value=True)
    first = torch.where(starts, positions, 0).cummax(dim=1).values
    last = torch.where(ends, positions, shape[1]).flip(1).cummin(dim=1).values.flip(1)
    return first, last


class ImportanceSampling(WeightingStrategy):
    """Shared machinery of the PEAR weightings: clipped log-ratios, trajectory sums, diagnostics.

    Args:
        log_ratio_clip: (low, high) bounds of each token's log-ratio δ_j, applied in log space.
        log_weight_clip: (low, high) bounds of the final log-weight, applied after the discount.
    """

    requires_behavior_logp: ClassVar[bool] = True

    def __init__(self, log_ratio_clip: Clip = RATIO_CLIP, log_weight_clip: Clip = WEIGHT_CLIP) -> None:
        self.log_ratio_clip = _check_clip("log_ratio_clip", log_ratio_clip)
        self.log_weight_clip = _check_clip("log_weight_clip", log_weight_clip)

    def log_ratios(self, batch: TokenBatch) -> Tensor:
        """Unclipped δ = logp − behavior_logp on loss tokens (float64, detached), 0 elsewhere."""
        if batch.behavior_logp is None:
            raise ValueError(f"{type(self).__name__} needs behaviour log-probs (TokenBatch.behavior_logp)")
        delta = batch.logp.detach().double() - batch.behavior_logp.detach().double()
        return torch.where(batch.mask, delta, torch.zeros_like(delta))

    def log_weights(self, batch: TokenBatch) -> Tensor:
        """The unclipped log-weight of every loss token; subclasses define it."""
        raise NotImplementedError

    def weights(self, batch: TokenBatch) -> Tensor:
        """exp(clip(log-weight)) on loss tokens, 0 elsewhere; float32, detached."""
        log_w = self.log_weights(batch).clamp(*self.log_weight_clip)
        return torch.where(batch.mask, log_w.exp(), torch.zeros_like(log_w)).float()

    def trajectory_sums(self, batch: TokenBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per position, within its trajectory: the 1-based rank among the loss tokens, their count,
        the running sum of the clipped δ (this token included) and its total.

        Sums are float64, so that long sequences lose nothing to cancellation.
        """
        mask = batch.mask
        clipped = self.log_ratios(batch).clamp(*self.log_ratio_clip) * mask
        first, last = _segment_bounds(batch.segment_ids, mask.shape, mask.device)

        def within(values: Tensor) -> tuple[Tensor, Tensor]:
            prefix = values.cumsum(dim=1)
            before = (prefix - values).gather(1, first)  # the prefix just before the trajectory starts
            return prefix - before, prefix.gather(1, last) - before

        rank, count = within(mask.double())
        running, total = within(clipped)
        return rank, count, running, total

    def metrics(self, batch: TokenBatch, weights: Tensor) -> dict[str, Tensor]:
        """Weight mean/min/max, ESS/N, fractions of tokens at the clip bounds (per-token log-ratio and final
        log-weight, at either bound and at each), and the mean log-ratio (KL drift). Read from ``weights``; δ is the
        one thing recomputed."""
        mask = batch.mask
        n = mask.sum().clamp(min=1)
        w = weights[mask].double()
        delta = self.log_ratios(batch)[mask]
        (r_low, r_high), (w_low, w_high) = self.log_ratio_clip, self.log_weight_clip
        # A clipped log-weight becomes exactly exp(bound) rounded to float32, as in `weights`.
        at_low = w <= torch.tensor(math.exp(w_low), dtype=torch.float64).float().double()
        at_high = w >= torch.tensor(math.exp(w_high), dtype=torch.float64).float().double()
        empty = w.numel() == 0
        return {
            "weight_mean": w.sum() / n,
            "weight_min": w.min() if not empty else w.new_zeros(()),
            "weight_max": w.max() if not empty else w.new_zeros(()),
            "ess": w.sum() ** 2 / (n * (w**2).sum()).clamp(min=1e-30),
            "log_ratio_clipped": ((delta <= r_low) | (delta >= r_high)).sum() / n,
            "log_ratio_at_lower_clip": (delta <= r_low).sum() / n,
            "log_ratio_at_upper_clip": (delta >= r_high).sum() / n,
            "log_weight_clipped": (at_low | at_high).sum() / n,
            "log_weight_at_lower_clip": at_low.sum() / n,
            "log_weight_at_upper_clip": at_high.sum() / n,
            "log_ratio_mean": delta.sum() / n,
        }


class SequenceIS(ImportanceSampling):
    """Every loss token of a trajectory gets the clipped sequence-level ratio exp(clip(Σ_j δ̂_j)).

    Args:
        log_ratio_clip: (low, high) bounds of each token's log-ratio, in log space.
        log_weight_clip: (low, high) bounds of the summed log-ratio, in log space.
    """

    def log_weights(self, batch: TokenBatch) -> Tensor:
        """Σ over the whole trajectory of the clipped δ, the same for all its tokens."""
        return self.trajectory_sums(batch)[3]


class BlockIS(ImportanceSampling):
    """Blocks of ``block_size`` consecutive loss tokens share the discounted ratio of the blocks after them:
    token in block k (last index e_k) gets exp(clip((T − e_k)·log γ + Σ_{blocks m > k} Σ_{j∈m} δ̂_j)).

    Args:
        block_size: loss tokens per block; 1 is ``TokenIS``.
        gamma: discount per token, in (0, 1].
        log_ratio_clip: (low, high) bounds of each token's log-ratio, in log space.
        log_weight_clip: (low, high) bounds of the final log-weight, in log space.
    """

    def __init__(
        self,
        block_size: int = 4,
        gamma: float = 0.999,
        log_ratio_clip: Clip = RATIO_CLIP,
        log_weight_clip: Clip = WEIGHT_CLIP,
    ) -> None:
        super().__init__(log_ratio_clip, log_weight_clip)
        if not (isinstance(block_size, int) and block_size >= 1):
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.block_size = block_size
        self.gamma = gamma

    def log_weights(self, batch: TokenBatch) -> Tensor:
        """(tokens after the block)·log γ + Σ of the clipped δ after the block."""
        rank, count, running, total = self.trajectory_sums(batch)
        if self.block_size > 1:
            # Move every loss token to the last loss token of its block: the next block end at or after it.
            mask = batch.mask
            block_end = mask & ((rank % self.block_size == 0) | (rank == count))
            positions = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
            end = torch.where(block_end, positions, mask.shape[1] - 1).flip(1).cummin(dim=1).values.flip(1)
            rank, running = rank.gather(1, end), running.gather(1, end)
        return (count - rank) * math.log(self.gamma) + (total - running)


class TokenIS(BlockIS):
    """Token t gets the discounted ratio of the tokens after it: exp(clip((T − t)·log γ + Σ_{j>t} δ̂_j)).

    Args:
        gamma: discount per token, in (0, 1].
        log_ratio_clip: (low, high) bounds of each token's log-ratio δ_j, in log space.
        log_weight_clip: (low, high) bounds of the discounted suffix sum, in log space.
    """

    def __init__(
        self, gamma: float = 0.999, log_ratio_clip: Clip = RATIO_CLIP, log_weight_clip: Clip = WEIGHT_CLIP
    ) -> None:
        super().__init__(1, gamma, log_ratio_clip, log_weight_clip)
