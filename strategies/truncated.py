"""Truncated per-token importance sampling: min(π_θ/π_β, cap) on every response token."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from .base import TokenBatch, WeightingStrategy


class TruncatedIS(WeightingStrategy):
    """Token weight min(π_θ(y_t)/π_β(y_t), cap), from the detached current log-probs.

    Args:
        cap: the largest weight a token can get; must be > 0.
    """

    requires_behavior_logp: ClassVar[bool] = True

    def __init__(self, cap: float = 2.0) -> None:
        if not cap > 0:
            raise ValueError(f"cap must be > 0, got {cap}")
        self.cap = cap

    def weights(self, batch: TokenBatch) -> Tensor:
        """exp(min(δ_t, log cap)) on loss tokens, 0 elsewhere."""
        if batch.behavior_logp is None:
            raise ValueError("TruncatedIS needs behaviour log-probs (TokenBatch.behavior_logp)")
        delta = (batch.logp.detach() - batch.behavior_logp.detach()).float().clamp(max=math.log(self.cap))
        return torch.where(batch.mask, delta.exp(), torch.zeros_like(delta))
