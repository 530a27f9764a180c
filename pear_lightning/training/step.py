"""The books of one optimizer step: its micro-batches' sums, one all-reduce, the non-finite guard, the gradient scale.

A step's loss is Σ token losses over all its micro-batches and data-parallel ranks divided by the
step's normaliser, known only once the last micro-batch is in. Each micro-batch backpropagates its
unnormalised sum; when the step closes, one all-reduce gives every rank the step's totals (and
whether any rank saw a non-finite loss or gradient), and the accumulated gradient is rescaled once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from torch import nn

from pear_lightning.errors import PearError
from pear_lightning.training.loss import LossTerms

# Where the gradients are the parameters' `.grad`, which `scale_gradients` rescales before the update.
SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy, FSDPStrategy, ModelParallelStrategy)


@dataclass(frozen=True)
class StepTotals:
    """An optimizer step's sums over its micro-batches and ranks."""

    loss: float
    normalizer: float
    nll: float
    num_tokens: float
    skipped: bool

    @property
    def mean_loss(self) -> float:
        """The step's loss: Σ token losses over its normaliser."""
        return self.loss / max(self.normalizer, 1e-8)

    @property
    def mean_nll(self) -> float:
        """The step's plain SFT loss: the token-mean negative log-likelihood, whatever the weighting."""
        return self.nll / max(self.num_tokens, 1)


def nonfinite_gradients(parameters: Iterable[nn.Parameter], device: torch.device) -> torch.Tensor:
    """1.0 if a gradient on this rank (its own shards) holds a NaN or an infinity, else 0.0 (no device sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    # A norm is non-finite when an element is (or when it overflows, which only a diverged gradient does); the
    # foreach kernel takes all the gradients in a few launches.
    total = torch.stack([norm.float() for norm in torch._foreach_norm(_local(grads))]).sum()
    return (~total.isfinite()).float()


class StepBooks:
    """Adds up the micro-batches of the current optimizer step, then closes it: totals over all ranks, and the
    decision to skip it when its loss or gradient is non-finite.

    Args:
        max_nonfinite_steps: steps that may be skipped in a run; one more stops it with a ``PearError``.
    """

    def __init__(self, max_nonfinite_steps: int) -> None:
        if max_nonfinite_steps < 0:
            raise PearError(f"model.max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.skipped_steps = 0  # in this run, checkpointed
        self.last_skipped = False
        self._sums: torch.Tensor | None = None  # loss, normaliser, nll, loss tokens
        self._batches: list[tuple[list[str], torch.Tensor]] = []  # (ids, loss finite) per micro-batch

    def add(self, terms: LossTerms, ids: list[str]) -> None:
        """Count one micro-batch in the current step."""
        sums = torch.stack([terms.total.detach(), terms.normalizer.detach(), terms.nll, terms.num_tokens]).float()
        self._sums = sums if self._sums is None else self._sums + sums
        self._batches.append((ids, sums[:2].isfinite().all()))

    def close(self, trainer: Trainer, parameters: Iterable[nn.Parameter]) -> StepTotals:
        """Close the step once its last backward is done: one all-reduce of its sums and of whether any rank's
        gradients (its own shards) are non-finite, one copy to the host; warn (and count) if the step must be
        skipped, or stop the run past ``max_nonfinite_steps``. Under a gradient scaler (fp16) overflowing gradients
        are routine and the scaler skips them itself: only the loss is checked."""
        world = trainer.world_size
        where = f"global step {trainer.global_step}" + (f", rank {trainer.global_rank}" if world > 1 else "")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        flag = nonfinite_gradients(parameters if scaler is None else [], self._sums.device)
        local = torch.cat([self._sums, flag.reshape(1).to(self._sums)])
        batches, self._sums, self._batches = self._batches, None, []
        summed = trainer.strategy.reduce(local, reduce_op="sum") if world > 1 else local
        loss, normalizer, nll, num_tokens, nonfinite = summed.tolist()
        loss_finite = math.isfinite(loss) and math.isfinite(normalizer)
        self.last_skipped = not loss_finite or nonfinite > 0
        if self.last_skipped:
            self.skipped_steps += 1
            # This rank's micro-batches whose loss is non-finite; when only the gradient is, any of them may be;
            # none when the non-finite loss is another rank's.
            ids = [i for batch_ids, finite in batches if not finite or loss_finite for i in batch_ids]
            self._report(where, ids)
        return StepTotals(loss, normalizer, nll, num_tokens, self.last_skipped)

    def _report(self, where: str, ids: list[str]) -> None:
        limit = self.max_nonfinite_steps
        if self.skipped_steps > limit:
            raise PearError(
                f"training stopped at {where}: {self.skipped_steps} optimizer steps had a non-finite loss or "
                f"gradient, more than model.max_nonfinite_steps={limit}; the last one's examples: {ids}. Check "
                "these examples (and their behaviour log-probs), lower the learning rate, or raise "
                "model.max_nonfinite_steps"
            )
        warnings.warn(
            f"non-finite loss or gradient at {where}: optimizer step skipped ({self.skipped_steps} of at "
            f"most {limit}); examples: {ids}",
            RuntimeWarning,
            stacklevel=3,
        )


def scale_gradients(parameters: Iterable[nn.Parameter], factor: float) -> None:
    """Multiply every gradient by ``factor`` in place."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        torch._foreach_mul_(_local(grads), factor)


def _local(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each gradient, or this rank's shard of it (FSDP2's DTensors)."""
    return [g.to_local() if hasattr(g, "to_local") else g for g in grads]


def check_strategy(strategy: Strategy) -> None:
    """Refuse a training strategy whose gradients do not live in the parameters' ``.grad`` (DeepSpeed's ZeRO keeps
    them in its own buffers): the step's normalisation would silently do nothing there.

    Raises:
        PearError: naming the strategy and the ones that work.
    """
    if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, SUPPORTED_STRATEGIES):
        raise PearError(
            f"trainer.strategy: {type(strategy).__name__} cannot be used: the loss of an optimizer step is normalised "
            "by rescaling the parameters' .grad before the update, and this strategy keeps its gradients elsewhere "
            "(the rescale would silently do nothing); use auto (one device), ddp, fsdp or ModelParallelStrategy (FSDP2)"
        )
