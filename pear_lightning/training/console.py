"""What a run shows on the console: training progress in optimizer steps with the loss a user knows, and a
parameter count instead of a module table. On a terminal, a live bar (of any width, a terminal that reports none
included); into a file or a pipe, one plain line per logging step, with no carriage-return redraws or escape
codes."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelSummary, ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities import rank_zero_info
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

SHORT_NAMES = {"train/loss": "loss", "train/nll": "nll", "train/lr": "lr", "train/tokens_per_sec": "tok/s"}
ORDER = {name: rank for rank, name in enumerate(SHORT_NAMES)}  # then the rest (validation) as logged


class StepProgressBar(TQDMProgressBar):
    """Training progress as ``step N/total`` over the whole run, where total is ``trainer.max_steps`` (or the steps
    the epochs make), with elapsed time, the time left, and the logged progress-bar metrics under short names:
    ``loss`` (the weighted loss that is optimised), ``nll`` (the unweighted token-mean NLL), ``lr``, ``tok/s`` and
    the validation metrics. A resumed run starts at its checkpoint's step. Validation, test and predict bars are
    Lightning's."""

    BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar:16}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def init_train_tqdm(self) -> Tqdm:
        """The run's bar, counted in optimizer steps from the step the run starts at."""
        total = self.trainer.estimated_stepping_batches
        return fixed_width(
            Tqdm(
                desc="step",
                total=None if total == float("inf") else int(total),
                initial=self.trainer.global_step,
                unit="step",
                position=2 * self.process_position,
                disable=self.is_disabled,
                leave=True,
                dynamic_ncols=True,
                file=sys.stdout,
                smoothing=0,
                bar_format=self.BAR_FORMAT,
            )
        )

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """Keep counting across epochs (Lightning's bar restarts at each)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Open the bar; until it closes, Lightning's own messages are printed above it, not into its line."""
        super().on_train_start(trainer, pl_module)
        self.redirect = logging_redirect_tqdm([logging.getLogger("lightning.pytorch")])
        self.redirect.__enter__()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Give Lightning's messages their own handler back."""
        if getattr(self, "redirect", None) is not None:
            self.redirect.__exit__(None, None, None)
            self.redirect = None
        super().teardown(trainer, pl_module, stage)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Close the validation bar, and show the new validation metrics on the training bar now, not a step later."""
        super().on_validation_end(trainer, pl_module)
        bar = self.train_progress_bar if self._train_progress_bar is not None else None
        if bar is not None and not trainer.sanity_checking:
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def init_sanity_tqdm(self) -> Tqdm:
        return fixed_width(super().init_sanity_tqdm())

    def init_validation_tqdm(self) -> Tqdm:
        return fixed_width(super().init_validation_tqdm())

    def init_test_tqdm(self) -> Tqdm:
        return fixed_width(super().init_test_tqdm())

    def init_predict_tqdm(self) -> Tqdm:
        return fixed_width(super().init_predict_tqdm())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Advance to the trainer's optimizer step, once per step (micro-batches of an accumulated step do not)."""
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and step != bar.n and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The progress-bar metrics under short names (see ``short_metrics``)."""
        return short_metrics(trainer)


def short_metrics(trainer: L.Trainer) -> dict[str, Any]:
    """The progress-bar metrics under short names, without Lightning's ``v_num``; rates as whole numbers."""
    metrics = sorted(trainer.progress_bar_metrics.items(), key=lambda item: ORDER.get(item[0], len(ORDER)))
    return {SHORT_NAMES.get(name, name): f"{v:.0f}" if abs(v) >= 100 else v for name, v in metrics}


def fixed_width(bar: tqdm) -> tqdm:
    """A bar on a terminal that reports no width (some pseudo-terminals) is drawn 200 columns wide, not as nothing."""
    if terminal_width(bar.fp) == 0:
        bar.dynamic_ncols, bar.ncols = False, 200
    return bar


def terminal_width(stream: Any) -> int | None:
    """The columns of the terminal ``stream`` writes to (0 if it reports none), or None if it is no terminal."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return None


class StepProgressLines(ProgressBar):
    """Training progress for a log file or a pipe: one line per logging step (``trainer.log_every_n_steps``) and at
    the last step, ``step N/total (P%)``, the progress-bar metrics under short names (see ``StepProgressBar``), the
    time so far and left. A step that validates prints its line after the validation, with its metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled, self.pending, self.start, self.first = True, None, time.monotonic(), 0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    @property
    def is_enabled(self) -> bool:
        return self.enabled and self.trainer.is_global_zero

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the clock at the run's (or the resumed run's) first step."""
        self.start, self.first = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        """Mark a step for a line when it closes a logging step or the run."""
        step, total, every = trainer.global_step, self.total(trainer), max(trainer.log_every_n_steps, 1)
        if step != self.pending and (step % every == 0 or step == total) and step > self.first:
            self.pending = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        self.flush(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer, pl_module)

    def flush(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the marked step's line, if any."""
        if self.pending is None or trainer.sanity_checking:
            return
        step, self.pending = self.pending, None
        if self.is_enabled:
            print(self.line(trainer, pl_module, step), flush=True)

    def line(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> str:
        """``step 125/500 (25%) loss 0.279, nll 0.279, lr 0.003, tok/s 1797 | 1:02 elapsed, 3:05 left``."""
        total, elapsed = self.total(trainer), time.monotonic() - self.start
        done = step - self.first
        left = elapsed / done * (total - step) if total and done else None
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in short_metrics(trainer).items()
        )
        of = f"/{total} ({step / total:.0%})" if total else ""
        timing = f"{clock(elapsed)} elapsed" + (f", {clock(left)} left" if left is not None else "")
        return f"step {step}{of} {shown} | {timing}"

    @staticmethod
    def total(trainer: L.Trainer) -> int | None:
        total = trainer.estimated_stepping_batches
        return None if total == float("inf") else int(total)


def clock(seconds: float) -> str:
    """``1:02:03`` or ``2:03``: a duration as a clock."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ParameterSummary(Callback):
    """At the start of fit, one line: the model's class, its parameters, and how many of them train (with LoRA,
    the adapters' share). Replaces Lightning's module table, which lists the metric holders as layers and
    estimates FLOPs it cannot count for every precision."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the line on rank 0."""
        model = getattr(pl_module, "model", pl_module)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        base = getattr(model, "get_base_model", lambda: model)()
        what = "LoRA adapters" if base is not model else "all weights"
        name = type(model).__name__ + (f" ({type(base).__name__})" if base is not model else "")  # wrappers: FSDP, peft
        rank_zero_info(
            f"model: {name}, {total:,} parameters; training {trainable:,} ({trainable / max(total, 1):.2%}, {what})"
        )


def console_settings(trainer_config: dict[str, Any]) -> dict[str, Any]:
    """Trainer arguments: the configured ``callbacks`` plus this project's progress (a bar on a terminal, lines
    otherwise) and summary, each unless the config turns it off (``enable_progress_bar`` / ``enable_model_summary:
    false``) or brings its own; Lightning's summary is turned off where ours replaces it."""
    configured = trainer_config.get("callbacks") or []
    callbacks = list(configured) if isinstance(configured, list) else [configured]
    settings: dict[str, Any] = {"callbacks": callbacks}
    if trainer_config.get("enable_progress_bar") is not False and not _has(callbacks, ProgressBar):
        callbacks.append(StepProgressBar() if terminal_width(sys.stdout) is not None else StepProgressLines())
    if trainer_config.get("enable_model_summary") is not False and not _has(callbacks, ModelSummary):
        callbacks.append(ParameterSummary())
        settings["enable_model_summary"] = False
    return settings


def say(trainer: L.Trainer, message: str) -> None:
    """Print a line on rank 0 between progress-bar updates (not into the bar's line)."""
    bar = trainer.progress_bar_callback
    if bar is None or not bar.is_enabled:
        rank_zero_info(message)
    elif trainer.is_global_zero:
        tqdm.write(message, file=sys.stdout)  # clears the open bars, prints, redraws them


def _has(callbacks: list[Callback], kind: type) -> bool:
    return any(isinstance(callback, kind) for callback in callbacks)
