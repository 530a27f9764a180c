"""What a training step logs: its loss every step; on logging steps (every ``trainer.log_every_n_steps``) the rest,
the strategy's diagnostics (and, under distillation, the KL's) and the token throughput. Every ``module.log`` costs
milliseconds of Python and the diagnostics cost device syncs, so they wait for the steps the loggers write. Values go
out as CPU tensors: a float would be copied to the module's device, a copy that waits for the GPU to finish its queued
work."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import Metric
from torchmetrics.aggregation import MaxMetric, MeanMetric, MinMetric

from pear_lightning.training.loss import LossTerms, nll_sum
from pear_lightning.training.step import StepTotals

SATURATION_STEPS = 20  # the optimizer steps whose logging steps the saturation warning looks back over (at least one)


class SaturationWatch:
    """Watches the fraction of loss tokens whose log-weight sits at a clip bound, window by window of micro-batches,
    and says once when it passes ``threshold``: saturated weights carry little of π_θ/π_β. The counts stay on the
    device; one copy to the host per window.

    Args:
        threshold: the fraction of loss tokens at a bound above which to warn; 1 never warns.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.sums: torch.Tensor | None = None  # loss tokens at the upper bound, at the lower, all, in this window
        self.seen = 0
        self.warned = False

    def add(
        self, metrics: dict[str, torch.Tensor], loss_tokens: torch.Tensor, window: int
    ) -> tuple[float, float] | None:
        """Count one micro-batch; at the end of a window of ``window`` micro-batches whose bounds hold more than
        ``threshold`` of their loss tokens, return (fraction at the upper bound, at the lower), the first time only."""
        if self.warned or "log_weight_at_upper_clip" not in metrics:
            return None
        at = [metrics[f"log_weight_at_{bound}_clip"].double() * loss_tokens for bound in ("upper", "lower")]
        counts = torch.stack([*at, loss_tokens.double()])
        self.sums, self.seen = (counts if self.sums is None else self.sums + counts), self.seen + 1
        if self.seen < window:
            return None
        (upper, lower, tokens), self.sums, self.seen = self.sums.tolist(), None, 0
        if upper + lower <= self.threshold * tokens:
            return None
        self.warned = True
        return upper / tokens, lower / tokens


def saturation_message(strategy: object, upper: float, lower: float, steps: int, every: int) -> str:
    """What saturated weights mean (over ``steps`` logging steps, one every ``every`` steps), and what to do."""
    low, high = getattr(strategy, "log_weight_clip", (math.nan, math.nan))
    seen = f"the last {steps} optimizer steps" if every == 1 else f"{steps} logging step(s), one every {every} steps"
    return (
        f"{type(strategy).__name__}: over {seen}, {upper + lower:.0%} of the loss tokens had "
        f"their log-weight at a clip bound ({upper:.0%} at the upper bound {high:g}, a weight of e^{high:g} ≈ "
        f"{math.exp(high):.0f}; {lower:.0%} at the lower bound {low:g}): the weights are saturated and carry little of "
        "π_θ/π_β (on long responses the suffix sums of the per-token log-ratios reach a bound within a few dozen "
        "tokens). Consider model.loss_normalizer: weights (only relative weights matter), a lower upper bound "
        "(--model.weighting.log_weight_clip), a smaller gamma, or BlockIS with shorter blocks"
    )


def logging_step(trainer: L.Trainer) -> bool:
    """Whether the current training batch's step is one the loggers write (every ``trainer.log_every_n_steps``)."""
    every = trainer.log_every_n_steps
    return every > 0 and (trainer.global_step + 1) % every == 0


def log_step(module: L.LightningModule, totals: StepTotals, skipped_steps: int, lr: float) -> None:
    """Log a closed optimizer step: ``train/loss`` every step (the progress bar's), ``train/skipped_steps`` on logging
    steps and skipped ones, ``train/nll`` and ``train/lr`` (the rate of this update) on logging steps."""
    logs = logging_step(module.trainer)
    if totals.skipped or logs:
        module.log("train/skipped_steps", torch.tensor(float(skipped_steps)))
    if totals.skipped:
        return
    module.log("train/loss", torch.tensor(totals.mean_loss), prog_bar=True)
    if logs:
        nll, lr = torch.tensor(totals.mean_nll), torch.tensor(float(lr))
        module.log_dict({"train/nll": nll, "train/lr": lr}, prog_bar=True)


class StepDiagnostics(torch.nn.ModuleDict):
    """Logs, for the training micro-batches of logging steps, the strategy's metrics as ``train/<name>`` and the token
    throughput as ``train/tokens_per_sec``; watches those metrics for saturated weights.

    Metrics are logged per step as this rank sees them, and per epoch aggregated over the logging steps and ranks by
    torchmetrics (``*_max`` / ``*_min`` as max / min, the rest as means weighted by loss tokens): one aggregator per
    metric name, made on first use. The module holds this as its ``diagnostics`` attribute (Lightning finds the
    aggregators by that name). Throughput is non-padding tokens per second of wall time from one micro-batch to the
    next (forward, backward, optimizer and data loading).
    """

    def __init__(self, saturation_warning: float = 0.5) -> None:
        super().__init__()
        self._last: tuple[float, int] | None = None  # when the previous micro-batch started, and its tokens
        self.saturation = SaturationWatch(saturation_warning)

    def log(self, module: L.LightningModule, strategy: object, terms: LossTerms, tokens: int, logging: bool) -> None:
        """Record that a micro-batch of ``tokens`` tokens starts now; if ``logging``, log the previous one's throughput,
        this one's metrics (``terms.metrics``) over its loss tokens, and, once, a warning when the strategy's weights
        are saturated (see ``SaturationWatch``; over the logging steps of the last 20 optimizer steps, at least one)."""
        now = time.perf_counter()
        last, self._last = self._last, (now, tokens)
        if not logging:
            return
        if last is not None:
            module.log("train/tokens_per_sec", torch.tensor(last[1] / (now - last[0])), prog_bar=True)
        every, accumulate = module.trainer.log_every_n_steps, module.trainer.accumulate_grad_batches
        steps = math.ceil(SATURATION_STEPS / every)
        if saturated := self.saturation.add(terms.metrics, terms.num_tokens, steps * accumulate):
            rank_zero_warn(saturation_message(strategy, *saturated, steps, every))
        metrics, loss_tokens = terms.metrics, terms.num_tokens
        for name, value in metrics.items():
            if name not in self:
                kind = MaxMetric if name.endswith("_max") else MinMetric if name.endswith("_min") else MeanMetric
                self[name] = kind().to(value.device)
            metric: Metric = self[name]
            if isinstance(metric, MeanMetric):
                metric(value, weight=loss_tokens)
            else:
                metric(value)
            module.log(f"train/{name}", metric, on_step=True, on_epoch=True, metric_attribute=f"diagnostics.{name}")


def log_nll(module: L.LightningModule, batch: dict[str, Any], metric: MeanMetric, name: str) -> None:
    """Accumulate an evaluation batch's token-mean negative log-likelihood in ``metric`` and log it as ``name``."""
    tokens = module.token_batch(batch)
    num_tokens = tokens.mask.sum()
    metric.update(nll_sum(tokens) / num_tokens.clamp(min=1), weight=num_tokens)
    module.log(name, metric, prog_bar=name == "val/loss", batch_size=len(batch["ids"]))
