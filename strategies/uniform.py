"""Canonical supervised fine-tuning: every response token weighs the same."""

from __future__ import annotations

from torch import Tensor

from .base import TokenBatch, WeightingStrategy


class UniformSFT(WeightingStrategy):
    """Weight 1 on every loss token: the plain causal-LM cross-entropy of standard SFT."""

    def weights(self, batch: TokenBatch) -> Tensor:
        """Return the loss mask as float32 weights."""
        return batch.mask.float()
