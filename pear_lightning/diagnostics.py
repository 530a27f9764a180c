"""What a training step logs besides its loss: the strategy's diagnostics and the token throughput."""

from __future__ import annotations

import time

import lightning as L
import torch
from torchmetrics import Metric
from torchmetrics.aggregation import MaxMetric, MeanMetric, MinMetric


class StrategyDiagnostics(torch.nn.ModuleDict):
    """Logs a strategy's metrics as ``train/<name>``: per step as this rank sees them (no sync), and per epoch
    aggregated over steps and ranks by torchmetrics (``*_max`` / ``*_min`` as max / min, the rest as means
    weighted by loss tokens). One aggregator per metric name, made on first use; the module holds this as
    its ``diagnostics`` attribute (Lightning finds the aggregators by that name)."""

    def log(self, module: L.LightningModule, metrics: dict[str, torch.Tensor], num_tokens: torch.Tensor) -> None:
        """Update the aggregators with one micro-batch's metrics and log them through ``module``."""
        for name, value in metrics.items():
            if name not in self:
                kind = MaxMetric if name.endswith("_max") else MinMetric if name.endswith("_min") else MeanMetric
                self[name] = kind().to(value.device)
            metric: Metric = self[name]
            if isinstance(metric, MeanMetric):
                metric(value, weight=num_tokens)
            else:
                metric(value)
            module.log(f"train/{name}", metric, on_step=True, on_epoch=True, metric_attribute=f"diagnostics.{name}")


def logging_step(trainer: L.Trainer) -> bool:
    """Whether the current training batch's step is one the loggers write (every ``trainer.log_every_n_steps``)."""
    every = trainer.log_every_n_steps
    return every > 0 and (trainer.global_step + 1) % every == 0


class TokenThroughput:
    """Non-padding tokens per second of wall time, from one training step to the next (forward, backward,
    optimizer and data loading)."""

    def __init__(self) -> None:
        self._last: tuple[float, int] | None = None

    def step(self, num_tokens: int) -> float | None:
        """Record that a step with ``num_tokens`` starts now; return the previous step's tokens per second."""
        now = time.perf_counter()
        rate = None if self._last is None else self._last[1] / (now - self._last[0])
        self._last = (now, num_tokens)
        return rate

    def log(self, module: L.LightningModule, num_tokens: int, logging: bool) -> None:
        """Record a step (see ``step``) and, if ``logging``, log the previous one's rate as ``train/tokens_per_sec``.

        Every ``module.log`` costs milliseconds of Python, so values go out on logging steps only, and as CPU tensors:
        a float would be copied to the module's device, a copy that waits for the GPU to finish its queued work.
        """
        if (rate := self.step(num_tokens)) is not None and logging:
            module.log("train/tokens_per_sec", torch.tensor(rate))
