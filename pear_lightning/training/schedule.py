"""The optimizer and its learning-rate schedule, built from the config; schedules whose length and peak the config
need not repeat.

A schedule that takes ``total_steps`` and leaves it unset gets the run's number of optimizer steps
(``trainer.max_steps``, or what the epochs come to), so ``max_steps`` is stated once. ``OneCycleLR``
here is torch's, with its peak defaulting to the optimizer's learning rate, so ``lr`` is stated once.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any

from lightning.pytorch.cli import instantiate_class
from torch import nn
from torch.optim import Optimizer, lr_scheduler

from pear_lightning.errors import PearError

DEFAULT_OPTIMIZER = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-5}}


class OneCycleLR(lr_scheduler.OneCycleLR):
    """torch's ``OneCycleLR`` (warm-up, then cosine annealing; momentum cycled inversely) whose peak is the
    optimizer's learning rate unless ``max_lr`` is given, and whose length is the run's unless ``total_steps`` is.

    Args:
        optimizer: the optimizer (set by the CLI).
        max_lr: the peak learning rate; default: the optimizer's ``lr``.
        total_steps: the schedule's length in optimizer steps; default: the run's.
        **kwargs: the rest of torch's ``OneCycleLR`` arguments (``pct_start``, ``div_factor``...).
    """

    def __init__(
        self, optimizer: Optimizer, max_lr: float | None = None, total_steps: int | None = None, **kwargs: Any
    ) -> None:
        peak = max_lr if max_lr is not None else [group["lr"] for group in optimizer.param_groups]
        if total_steps is not None:
            check_phases(total_steps, kwargs.get("pct_start", 0.3), kwargs.get("three_phase", False))
        super().__init__(optimizer, max_lr=peak, total_steps=total_steps, **kwargs)


def check_phases(total: int, pct_start: float, three_phase: bool) -> None:
    """Refuse a length and warm-up fraction whose phases torch's OneCycleLR cannot compute: it divides by each
    phase's length, from its start to its end step, and a phase of 0 steps (the warm-up when ``pct_start × total``
    is 1, the decay when ``pct_start`` is 1) divides by zero.

    Raises:
        ValueError: naming both numbers and what to change.
    """
    warm = float(pct_start * total) - 1
    ends = [warm, 2 * warm, total - 1] if three_phase else [warm, total - 1]
    starts = [0.0, *ends[:-1]]
    if any(end == start for start, end in zip(starts, ends)):
        other = 2 / total if 2 / total < 1 else 0.5
        raise ValueError(
            f"pct_start {pct_start:g} of {total} steps leaves a phase of 0 steps (warm-up ends at step "
            f"{warm:g}), which torch's OneCycleLR cannot schedule (it divides by the phase's length): set "
            f"pct_start to another value (e.g. {other:g}) or change trainer.max_steps"
        )


def with_run_length(config: dict[str, Any], run_steps: Callable[[], float]) -> dict[str, Any]:
    """A scheduler's ``{class_path, init_args}`` with ``total_steps`` set to ``run_steps()`` where the class takes
    that argument, the config leaves it unset and the run's length is known (not infinite)."""
    module, _, name = config["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    init_args = dict(config.get("init_args") or {})
    unset = "total_steps" in inspect.signature(cls).parameters and init_args.get("total_steps") is None
    if unset and math.isfinite(steps := run_steps()):
        init_args["total_steps"] = int(steps)
    return {**config, "init_args": init_args}


def build_optimization(
    params: list[nn.Parameter],
    optimizer: dict[str, Any] | None,
    scheduler: dict[str, Any] | None,
    run_steps: Callable[[], float],
) -> tuple[Optimizer, lr_scheduler.LRScheduler | None]:
    """The configured optimizer over ``params`` (default AdamW(lr=1e-5)) and its schedule, if any, lasting
    ``run_steps()`` optimizer steps where the config leaves the length unset.

    Raises:
        PearError: naming the setting whose class refuses its arguments (a negative learning rate...).
    """
    config = optimizer or DEFAULT_OPTIMIZER
    try:
        built = instantiate_class(params, config)
    except (ValueError, TypeError) as err:
        raise PearError(f"optimizer: {_name(config)}: {err}") from err
    if not scheduler:
        return built, None
    try:
        return built, instantiate_class(built, with_run_length(scheduler, run_steps))
    except (ValueError, TypeError, ZeroDivisionError) as err:
        raise PearError(f"lr_scheduler: {_name(scheduler)}: {err}") from err


def _name(config: dict[str, Any]) -> str:
    return config["class_path"].rpartition(".")[2]
