"""Dynamic Fine-Tuning (DFT, arXiv 2508.05629): weight each token by its own detached probability."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TokenBatch, WeightingStrategy


class DFT(WeightingStrategy):
    """Token weight π_θ(y_t), detached: confident tokens keep their gradient, unlikely ones are damped.
    Needs no behaviour log-probs."""

    def weights(self, batch: TokenBatch) -> Tensor:
        """exp(logp) on loss tokens, 0 elsewhere."""
        probs = batch.logp.detach().float().exp()
        return torch.where(batch.mask, probs, torch.zeros_like(probs))
