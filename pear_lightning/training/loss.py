"""The loss of one micro-batch: the strategy's weights, computed once, and everything the optimizer step needs.

The strategy turns log-probs into per-token losses; this unit sums them and pairs the sum with the
micro-batch's share of the step's normaliser (its loss tokens, or the sum of its weights), the plain
negative log-likelihood and the strategy's diagnostics, all read from the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pear_lightning.errors import PearError
from pear_lightning.strategies import TokenBatch, WeightingStrategy
from pear_lightning.strategies.base import weighted_losses

Normalizer = Literal["tokens", "weights"]


@dataclass(frozen=True)
class LossTerms:
    """One micro-batch's part of its optimizer step.

    Attributes:
        tokens: the scored micro-batch the strategy saw.
        weights: the strategy's [B, T] weights, detached.
        total: Σ of the token losses, with grad; the step divides the gradient by its normaliser.
        normalizer: this micro-batch's share of the step's normaliser (loss tokens, or Σ weights), detached.
        nll: Σ −log π_θ over the loss tokens, detached: the plain SFT loss, whatever the weighting.
        num_tokens: the number of loss tokens, as a float tensor.
        metrics: the strategy's diagnostics of these weights (none when not asked for).
    """

    tokens: TokenBatch
    weights: Tensor
    total: Tensor
    normalizer: Tensor
    nll: Tensor
    num_tokens: Tensor
    metrics: dict[str, Tensor]

    @property
    def mean(self) -> Tensor:
        """The loss of this micro-batch on its own: its summed token losses over its own normaliser."""
        return self.total / self.normalizer.clamp(min=1e-8)


def nll_sum(tokens: TokenBatch) -> Tensor:
    """Σ −log π_θ over the loss tokens (with grad where ``tokens.logp`` has it)."""
    return -(tokens.logp * tokens.mask).sum()


def loss_terms(
    strategy: WeightingStrategy,
    tokens: TokenBatch,
    normalizer: Normalizer = "tokens",
    per_token: Tensor | None = None,
    extra_metrics: dict[str, Tensor] | None = None,
    metrics: bool = True,
) -> LossTerms:
    """Weigh one scored micro-batch with ``strategy``: its weights once, then the loss, normaliser and (unless
    ``metrics`` is off: they cost device syncs) diagnostics.

    Args:
        strategy: the weighting strategy.
        tokens: the scored micro-batch.
        normalizer: what the step's loss is divided by (see ``PearModule``).
        per_token: [B, T] the loss of each token that the weights multiply, with grad (distillation's KL, see
            ``distill``); None: the strategy's own token losses, −weight · log π_θ by default.
        extra_metrics: diagnostics logged beside the strategy's (the KL term's), when ``metrics`` is on.
        metrics: compute the diagnostics (off on steps that do not log them).

    Raises:
        PearError: if the strategy needs behaviour log-probs and the batch has none, or if it defines its own
            ``token_losses`` and ``per_token`` is given.
    """
    if strategy.requires_behavior_logp and tokens.behavior_logp is None:
        raise PearError(
            f"weighting {type(strategy).__name__} needs the behaviour policy's log-probs (log π_β of "
            "every response token) and the training data has none: add `token_ids` and `logprobs` columns "
            "scored by the model that generated the data (docs/data.md), or train with UniformSFT or DFT"
        )
    own_losses = type(strategy).token_losses is not WeightingStrategy.token_losses
    if per_token is not None and own_losses:
        raise PearError(
            f"weighting {type(strategy).__name__} defines its own token_losses (a loss other than weight × NLL), which "
            "a distillation loss (model.loss kl or nll+kl) cannot use: there the strategy's weights multiply each "
            "token's KL; use model.loss nll with it, or a strategy that defines only weights"
        )
    weights = strategy.weights(tokens)
    num_tokens = tokens.mask.sum().float()
    with torch.no_grad():
        diagnostics = {**strategy.metrics(tokens, weights), **(extra_metrics or {})} if metrics else {}
    if per_token is not None:
        losses = torch.where(tokens.mask, weights * per_token, torch.zeros_like(per_token))
    else:
        losses = strategy.token_losses(tokens) if own_losses else weighted_losses(tokens, weights)
    return LossTerms(
        tokens=tokens,
        weights=weights,
        total=losses.sum(),
        normalizer=weights.sum() if normalizer == "weights" else num_tokens,
        nll=nll_sum(tokens).detach(),
        num_tokens=num_tokens,
        metrics=diagnostics,
    )
