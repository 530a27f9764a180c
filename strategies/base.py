"""The strategy contract: what the trainer hands a weighting strategy and what it gets back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenBatch:
    """Per-token quantities of one micro-batch, aligned with its ``input_ids`` of shape [B, T].

    Attributes:
        logp: log π_θ(y_t | x, y_<t) of each token under the model being trained, float32, with grad.
        mask: True where the token is trained on (response tokens); prompt and padding are False.
        behavior_logp: cached log π_β(y_t | ·) of the policy that generated the data, float32;
            its values where ``mask`` is False are ignored (they may be anything, even -inf).
        segment_ids: for packed rows, tokens of one sequence share an id; None means one sequence per row.
    """

    logp: Tensor
    mask: Tensor
    behavior_logp: Tensor | None = None
    segment_ids: Tensor | None = None


class WeightingStrategy(ABC):
    """Turns per-token log-probs into per-token losses by weighting each token's negative log-likelihood.

    Subclasses implement ``weights``; the trainer reduces ``token_losses`` to the scalar it
    backpropagates, so every strategy is normalised the same way. A strategy with an additive term
    (a regulariser) also overrides ``token_losses``.
    """

    requires_behavior_logp: ClassVar[bool] = False

    @abstractmethod
    def weights(self, batch: TokenBatch) -> Tensor:
        """Return [B, T] float32 weights, detached, zero where ``batch.mask`` is False."""

    def token_losses(self, batch: TokenBatch) -> Tensor:
        """Return [B, T] per-token losses: ``-weights * logp`` on loss tokens, zero elsewhere.

        The trainer computes ``weights`` once per micro-batch and, for a strategy that keeps this default,
        forms these losses from that same tensor (``weighted_losses``) rather than calling this.
        """
        return weighted_losses(batch, self.weights(batch))

    def metrics(self, batch: TokenBatch, weights: Tensor) -> dict[str, Tensor]:
        """Return diagnostics of this batch's weights as scalar tensors; none by default."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def weighted_losses(batch: TokenBatch, weights: Tensor) -> Tensor:
    """``-weights * logp`` on loss tokens, zero elsewhere: the default per-token loss of every strategy."""
    return torch.where(batch.mask, -weights * batch.logp, torch.zeros_like(batch.logp))
