"""What a training step logs besides its loss: the strategy's diagnostics and the token throughput."""

from __future__ import annotations

import time

import lightning as L
import torch
from torchmetrics import Metric
from torchmetrics.aggregation import MaxMetric, MeanMetric, MinMetric


class StepDiagnostics(torch.nn.ModuleDict):
    """Logs, for every training micro-batch, the strategy's metrics as ``train/<name>`` and the token throughput as
    ``train/tokens_per_sec``.

    Metrics are logged per step as this rank sees them (no sync), and per epoch aggregated over steps and ranks by
    torchmetrics (``*_max`` / ``*_min`` as max / min, the rest as means weighted by loss tokens): one aggregator per
    metric name, made on first use. The module holds this as its ``diagnostics`` attribute (Lightning finds the
    aggregators by that name). Throughput is non-padding tokens per second of wall time from one micro-batch to the
    next (forward, backward, optimizer and data loading).
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: tuple[float, int] | None = None  # when the previous micro-batch started, and its tokens

    def log(
        self, module: L.LightningModule, metrics: dict[str, torch.Tensor], loss_tokens: torch.Tensor, tokens: int
    ) -> None:
        """Log one micro-batch: the strategy's ``metrics`` over its ``loss_tokens``, and its ``tokens``' throughput."""
        now = time.perf_counter()
        if self._last is not None:
            module.log("train/tokens_per_sec", self._last[1] / (now - self._last[0]))
        self._last = (now, tokens)
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
