"""What a training step logs: its loss every step; on logging steps (every ``trainer.log_every_n_steps``) the rest,
the strategy's diagnostics (and, under distillation, the KL's) and the token throughput. Every ``module.log`` costs
milliseconds of Python and the diagnostics cost device syncs, so they wait for the steps the loggers write. Values go
out as CPU tensors: a float would be copied to the module's device, a copy that waits for the GPU to finish its queued
work."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import Metric
from torchmetrics.aggregation import MaxMetric, MeanMetric, MinMetric

from pear_lightning.strategies import TokenBatch, WeightingStrategy
from pear_lightning.training.loss import LossTerms, nll_sum
from pear_lightning.training.step import StepTotals

SATURATION_STEPS = 20  # the optimizer steps whose logging steps the clip watch looks back over (at least one)
SCALE_LIMIT = 10.0  # a mean weight above this (or below its inverse) rescales a `tokens`-normalised loss that much
WATCHED = (  # token means of an IS strategy's metrics that the clip watch sums over a window, weighted by loss tokens
    "log_ratio_at_lower_clip",
    "log_ratio_at_upper_clip",
    "log_weight_at_lower_clip",
    "log_weight_at_upper_clip",
    "weight_mean",
    "log_ratio_mean",
)


class ClipWatch:
    """Watches every clip of an importance-sampling strategy, window by window of micro-batches: the fraction of
    loss tokens whose per-token log-ratio sits at either bound of ``log_ratio_clip``, whose log-weight sits at either
    bound of ``log_weight_clip``, and the weights' mean. Says once, when a fraction passes ``threshold`` (or, under
    the ``tokens`` normaliser, the mean weight leaves [1/10, 10]), what it means and what to change. The sums stay on
    the device; one copy to the host per window.

    Args:
        threshold: the fraction of loss tokens at one clip (per-token ratio, or log-weight at either bound) above
            which to warn; 1 never warns (nor does the weights' scale then).
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.sums: torch.Tensor | None = None  # each WATCHED mean times loss tokens, and the loss tokens
        self.seen = 0
        self.warned = False

    def add(self, metrics: dict[str, torch.Tensor], loss_tokens: torch.Tensor, window: int) -> dict[str, float] | None:
        """Count one micro-batch; at the end of a window of ``window`` micro-batches, return the window's token means
        of ``WATCHED`` if they call for a warning (see ``clip_findings``), the first time only."""
        if self.warned or self.threshold >= 1 or not all(name in metrics for name in WATCHED):
            return None
        counts = torch.stack([*(metrics[name].double() * loss_tokens for name in WATCHED), loss_tokens.double()])
        self.sums, self.seen = (counts if self.sums is None else self.sums + counts), self.seen + 1
        if self.seen < window:
            return None
        *sums, tokens = self.sums.tolist()
        self.sums, self.seen = None, 0
        means = {name: total / max(tokens, 1) for name, total in zip(WATCHED, sums)}
        self.warned = any(clip_findings(means, self.threshold))
        return means if self.warned else None


def clip_findings(means: dict[str, float], threshold: float) -> tuple[bool, bool, bool, bool]:
    """Which clips decide the weights more than ``threshold`` of the time: the per-token ratio at its upper bound, at
    its lower bound, the log-weight at a bound; and whether the mean weight is off scale (out of [1/10, 10])."""
    return (
        means["log_ratio_at_upper_clip"] > threshold,
        means["log_ratio_at_lower_clip"] > threshold,
        means["log_weight_at_upper_clip"] + means["log_weight_at_lower_clip"] > threshold,
        not 1 / SCALE_LIMIT <= means["weight_mean"] <= SCALE_LIMIT,
    )


def clip_message(strategy: object, means: dict[str, float], threshold: float, normalizer: str, seen: str) -> str:
    """One warning: every clip's fraction and the mean weight over ``seen``, what the ones past ``threshold`` mean, and
    what to change."""
    (r_low, r_high), (w_low, w_high) = strategy.log_ratio_clip, strategy.log_weight_clip
    ratio_up, ratio_down, weight, scale = clip_findings(means, threshold)
    w_up, w_down, mean = means["log_weight_at_upper_clip"], means["log_weight_at_lower_clip"], means["weight_mean"]
    parts = [
        f"{type(strategy).__name__}: over {seen}, {means['log_ratio_at_upper_clip']:.0%} of the loss tokens had their "
        f"log-ratio log π_θ − log π_β at the upper clip {r_high:g} and {means['log_ratio_at_lower_clip']:.0%} at the "
        f"lower clip {r_low:g} (mean log-ratio {means['log_ratio_mean']:+.2f}); {w_up + w_down:.0%} had their "
        f"log-weight at a clip bound ({w_up:.0%} at the upper bound {w_high:g}, a weight of e^{w_high:g} ≈ "
        f"{math.exp(w_high):.0f}; {w_down:.0%} at the lower bound {w_low:g}); the mean weight was {mean:.3g}."
    ]
    if ratio_up:
        parts.append(
            "π_β gives the data far less probability than the student, so the upper clip, not π_θ/π_β, sets the "
            "weights: check that the behaviour log-probs are those of the model and sampling settings that generated "
            "the data (cache_logprobs with that model, data.sampling); if they are, raise the upper bound of "
            "--model.weighting.log_ratio_clip."
        )
    if ratio_down:
        parts.append(
            f"π_β gives the data far more probability than the student, so the weights are only a length discount, "
            f"e^({r_low:g} × the tokens after each one): lower the bound (--model.weighting.log_ratio_clip '[-1, "
            f"{r_high:g}]') to measure the ratios, clip at 0 ('[0, {r_high:g}]') to leave those tokens at weight 1, "
            "or train with UniformSFT until the student is closer to π_β."
        )
    if weight:
        parts.append(
            "The weights are saturated and carry little of π_θ/π_β (on long responses the suffix sums of the per-token "
            "log-ratios reach a bound within a few dozen tokens). Consider model.loss_normalizer: weights (only "
            "relative weights matter), a lower upper bound (--model.weighting.log_weight_clip), a smaller gamma, or "
            "BlockIS with shorter blocks."
        )
    if scale and normalizer == "tokens":
        parts.append(
            f"With model.loss_normalizer: tokens the loss and its gradient are {mean:.3g}× those of the same tokens "
            "under SFT, as a learning rate that much higher or lower would be: set model.loss_normalizer: weights, "
            "or narrow the clips."
        )
    return " ".join(parts)


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


def token_sources(batch: dict[str, Any]) -> torch.Tensor | None:
    """Each token's mixture source in a collated batch: [R, T], from ``batch["source"]`` (each example's source index)
    by row or, packed, by segment (padding gets a row's first); None for a batch without sources."""
    source = batch.get("source")
    if source is None:
        return None
    segments = batch.get("segment_ids")
    return source[segments.clamp(min=0)] if segments is not None else source[:, None].expand_as(batch["loss_mask"])


def source_masks(batch: dict[str, Any], names: list[str]) -> dict[str, torch.Tensor]:
    """The [R, T] token mask of each mixture source present in a collated batch, by name (``names``, by source index);
    none for a batch without sources."""
    of_token = token_sources(batch)
    if of_token is None:
        return {}
    present = sorted(set(batch["source"].tolist()))
    return {names[s] if s < len(names) else f"source{s}": of_token == s for s in present}


def source_metrics(
    strategy: WeightingStrategy, tokens: TokenBatch, weights: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The strategy's metrics over the loss tokens of ``mask`` only (one source's), from the batch's weights: each
    sequence's weights are its own, so a source's are what they would be in a batch of its examples alone."""
    with torch.no_grad():
        return strategy.metrics(replace(tokens, mask=tokens.mask & mask), weights)


class StepDiagnostics(torch.nn.ModuleDict):
    """Logs, for the training micro-batches of logging steps, the strategy's metrics as ``train/<name>`` (and, for a
    mixture, each source's as ``train/<source>/<name>``, over its examples' tokens) and the token throughput as
    ``train/tokens_per_sec``; watches the overall metrics for saturated weights.

    Metrics are logged per step as this rank sees them (the logging step's last micro-batch; a mixture source it lacks:
    NaN), and per epoch aggregated over the logging steps and ranks by
    torchmetrics (``*_max`` / ``*_min`` as max / min, the rest as means weighted by loss tokens): one aggregator per
    metric name, made on first use. The module holds this as its ``diagnostics`` attribute (Lightning finds the
    aggregators by that name). Throughput is non-padding tokens per second of wall time from one micro-batch to the
    next (forward, backward, optimizer and data loading).
    """

    def __init__(self, saturation_warning: float = 0.5) -> None:
        super().__init__()
        self._last: tuple[float, int] | None = None  # when the previous micro-batch started, and its tokens
        self.clips = ClipWatch(saturation_warning)
        self._source_metrics: dict[str, list[str]] = {}  # the metric names logged for each mixture source so far

    def log(
        self,
        module: L.LightningModule,
        strategy: object,
        terms: LossTerms,
        tokens: int,
        logging: bool,
        sources: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Record that a micro-batch of ``tokens`` tokens starts now; if ``logging``, log the previous one's throughput,
        this one's metrics (``terms.metrics``) over its loss tokens and those of each of its ``sources`` (name: token
        mask, see ``source_masks``) over theirs, and, once, a warning when a clip decides the strategy's weights (see
        ``ClipWatch``; over the logging steps of the last 20 optimizer steps, at least one)."""
        now = time.perf_counter()
        last, self._last = self._last, (now, tokens)
        if not logging:
            return
        if last is not None:
            module.log("train/tokens_per_sec", torch.tensor(last[1] / (now - last[0])), prog_bar=True)
        every, accumulate = module.trainer.log_every_n_steps, module.trainer.accumulate_grad_batches
        steps = math.ceil(SATURATION_STEPS / every)
        if means := self.clips.add(terms.metrics, terms.num_tokens, steps * accumulate):
            seen = (
                f"the last {steps} optimizer steps"
                if every == 1
                else f"{steps} logging step(s), one every {every} steps"
            )
            normalizer = module.hparams.loss_normalizer
            rank_zero_warn(clip_message(strategy, means, self.clips.threshold, normalizer, seen))
        for name, value in terms.metrics.items():
            metric = self._aggregator(name, value, terms.num_tokens)
            module.log(f"train/{name}", metric, on_step=True, on_epoch=True, metric_attribute=f"diagnostics.{name}")
        self._log_sources(module, strategy, terms, sources or {})

    def _log_sources(
        self, module: L.LightningModule, strategy: object, terms: LossTerms, sources: dict[str, torch.Tensor]
    ) -> None:
        """Each source's metrics over its tokens: the step's value as ``train/<source>/<name>_step``, and the epoch's
        aggregate as ``..._epoch``. A source seen before that this micro-batch lacks gets NaN for the step (Lightning
        would repeat its last value); its epoch aggregate counts only the steps that had it."""
        for source, mask in sources.items():
            own = source_metrics(strategy, terms.tokens, terms.weights, mask)
            self._source_metrics[source], loss_tokens = list(own), (terms.tokens.mask & mask).sum().float()
            for name, value in own.items():
                key = f"{source}/{name}"
                metric = self._aggregator(key, value, loss_tokens, update_only=True)
                where = f"diagnostics.{key}"
                module.log(f"train/{key}_epoch", metric, on_step=False, on_epoch=True, metric_attribute=where)
                module.log(f"train/{key}_step", value, on_step=True, on_epoch=False)
        for source in self._source_metrics.keys() - sources.keys():
            for name in self._source_metrics[source]:
                module.log(f"train/{source}/{name}_step", torch.tensor(math.nan), on_step=True, on_epoch=False)

    def _aggregator(
        self, key: str, value: torch.Tensor, loss_tokens: torch.Tensor, update_only: bool = False
    ) -> Metric:
        """``key``'s epoch aggregate (made on first use), with ``value`` counted in it."""
        if key not in self:
            kind = MaxMetric if key.endswith("_max") else MinMetric if key.endswith("_min") else MeanMetric
            self[key] = kind().to(value.device)
        metric: Metric = self[key]
        add = metric.update if update_only else metric  # forward also keeps the step's value, for on_step logging
        if isinstance(metric, MeanMetric):
            add(value, weight=loss_tokens)
        else:
            add(value)
        return metric


def log_nll(module: L.LightningModule, batch: dict[str, Any], metric: MeanMetric, name: str) -> None:
    """Accumulate an evaluation batch's token-mean negative log-likelihood in ``metric`` and log it as ``name``."""
    tokens = module.token_batch(batch)
    num_tokens = tokens.mask.sum()
    metric.update(nll_sum(tokens) / num_tokens.clamp(min=1), weight=num_tokens)
    module.log(name, metric, prog_bar=name == "val/loss", batch_size=len(batch["ids"]))
