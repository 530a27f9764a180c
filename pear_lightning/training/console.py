"""What a run shows on the console: training progress in optimizer steps with the loss a user knows, and a
parameter count instead of a module table."""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelSummary, ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities import rank_zero_info
from tqdm import tqdm

SHORT_NAMES = {"train/loss": "loss", "train/nll": "nll", "train/lr": "lr", "train/tokens_per_sec": "tok/s"}


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
        return Tqdm(
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

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """Keep counting across epochs (Lightning's bar restarts at each)."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Advance to the trainer's optimizer step, once per step (micro-batches of an accumulated step do not)."""
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and step != bar.n and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The progress-bar metrics under short names, without Lightning's ``v_num``; rates as whole numbers."""
        metrics = trainer.progress_bar_metrics
        return {SHORT_NAMES.get(name, name): f"{v:.0f}" if abs(v) >= 100 else v for name, v in metrics.items()}


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
    """Trainer arguments: the configured ``callbacks`` plus this project's progress bar and summary, each unless the
    config turns it off (``enable_progress_bar`` / ``enable_model_summary: false``) or brings its own; Lightning's
    summary is turned off where ours replaces it."""
    configured = trainer_config.get("callbacks") or []
    callbacks = list(configured) if isinstance(configured, list) else [configured]
    settings: dict[str, Any] = {"callbacks": callbacks}
    if trainer_config.get("enable_progress_bar") is not False and not _has(callbacks, ProgressBar):
        callbacks.append(StepProgressBar())
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
