"""Checks run before a command starts, so that it is refused before it writes or trains anything: settings that
parse but would fail later (after the first step, or after the last), and outputs that could not be written."""

from __future__ import annotations

import math
import netrc
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from transformers import AutoConfig, AutoModelForCausalLM

from pear_lightning.atomic import check_writable
from pear_lightning.data.cache import MAKE_CACHE, read_manifest
from pear_lightning.errors import LOAD_ERRORS, PearError, load_error, refuse_missing
from pear_lightning.training.module import PearModule
from pear_lightning.training.schedule import build_optimization
from pear_lightning.training.step import check_strategy

# Trainer settings Lightning accepts but fails on (or silently misuses) later: (rule, what is allowed).
TRAINER_RULES = {
    "accumulate_grad_batches": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "gradient_clip_val": (lambda v: v is None or v >= 0, "null or >= 0"),
    "log_every_n_steps": (lambda v: v is None or v >= 1, ">= 1"),
    "val_check_interval": (lambda v: v is None or v > 0, "> 0 (batches, or a fraction of an epoch)"),
    "check_val_every_n_epoch": (lambda v: v is None or v >= 1, "null or >= 1"),
}


def check_fit(trainer: Trainer, module: PearModule) -> None:
    """Everything ``fit`` can check before it starts: the trainer's settings and strategy, the optimizer and the
    schedule, the model path and LoRA, and every folder it will write to.

    Raises:
        PearError: naming the first setting or folder that would fail, and what to do.
    """
    check_strategy(trainer.strategy)
    check_trainer(trainer)
    check_optimization(module.hparams.optimizer, module.hparams.lr_scheduler, trainer.max_steps)
    refuse_missing("model.model_name_or_path", module.hparams.model_name_or_path)
    if module.hparams.lora is not None:
        check_lora(module.hparams.model_name_or_path, module.hparams.lora, module.hparams.trust_remote_code)
    check_outputs(trainer)


def check_trainer(trainer: Trainer) -> None:
    """Refuse trainer settings outside what a run can use (see ``TRAINER_RULES``)."""
    for name, (allowed, what) in TRAINER_RULES.items():
        value = getattr(trainer, name)
        if not allowed(value):
            raise PearError(f"trainer.{name}={value!r}: must be {what}")


def check_optimization(optimizer: dict[str, Any] | None, scheduler: dict[str, Any] | None, max_steps: int) -> None:
    """Build the optimizer (and the schedule over it) on a stand-in parameter, so that their own checks run now;
    refuse a schedule shorter than ``max_steps`` (torch's OneCycleLR stops the run with an error past its end)."""
    run_steps = max_steps if max_steps >= 0 else math.inf
    _, schedule = build_optimization([torch.nn.Parameter(torch.zeros(1))], optimizer, scheduler, lambda: run_steps)
    total = getattr(schedule, "total_steps", None)
    if total is not None and run_steps > total:
        raise PearError(
            f"lr_scheduler: {scheduler['class_path'].rpartition('.')[2]} lasts total_steps={total} optimizer steps, "
            f"fewer than trainer.max_steps={max_steps}: it would stop the run with an error after step {total}; leave "
            "total_steps unset (it is then the run's length) or make it cover max_steps"
        )


def check_lora(path: str, lora: dict[str, Any], trust_remote_code: bool) -> None:
    """Refuse LoRA settings peft would accept and then fail on, or that would train nothing: a rank below 1, a
    scale or dropout out of range, target modules that match no module of the model (checked on the model's
    architecture built on the meta device: no weight is loaded)."""
    if not (isinstance(lora["r"], int) and lora["r"] >= 1):
        raise PearError(f"model.lora.r={lora['r']!r}: the adapters' rank must be an integer >= 1")
    if not lora["alpha"] > 0 or not 0 <= lora["dropout"] < 1:
        raise PearError(
            f"model.lora: alpha must be > 0 and dropout in [0, 1), got {lora['alpha']} and {lora['dropout']}"
        )
    targets = lora["target_modules"]
    if targets == "all-linear":
        return
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as err:
        raise load_error("model.model_name_or_path", path, "a model config", err) from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    peft_config = LoraConfig(r=lora["r"], target_modules=targets)
    if not any(check_target_module_exists(peft_config, name) for name, _ in model.named_modules()):
        linear = sorted(
            {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise PearError(
            f"model.lora.target_modules={targets!r}: matches no module of {path}; its linear layers are named "
            f"{linear} (or use all-linear)"
        )


def check_service(logger: Any) -> None:
    """Refuse a logger that needs a service it cannot reach: W&B online without an API key (``wandb login`` writes
    one to ~/.netrc) would otherwise stop the run at its first log, or wait for a key typed in.

    Raises:
        PearError: naming the logger and how to log in or go offline.
    """
    if type(logger).__name__ != "WandbLogger" or getattr(logger, "_offline", False):
        return
    if os.environ.get("WANDB_MODE") in ("offline", "disabled") or os.environ.get("WANDB_API_KEY"):
        return
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    if not logged_in:
        raise PearError(
            "trainer.logger (WandbLogger): not logged in to W&B (no WANDB_API_KEY, no api.wandb.ai entry in ~/.netrc): "
            "run `wandb login`, or log offline (--trainer.logger.init_args.offline true, or WANDB_MODE=offline)"
        )


def check_outputs(trainer: Trainer) -> None:
    """Refuse a run whose logs, config or checkpoints could not be written, before the first step (a checkpoint
    folder is otherwise found unwritable only when the first checkpoint is due)."""
    places = [("trainer.default_root_dir", trainer.default_root_dir)]
    for logger in trainer.loggers:
        folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        places.append((f"trainer.logger ({type(logger).__name__})", folder))
        check_service(logger)
    places += [("ModelCheckpoint dirpath", c.dirpath) for c in trainer.checkpoint_callbacks if c.dirpath]
    for setting, folder in places:
        if folder is not None and "://" not in str(folder):
            check_writable(Path(folder), setting)


def check_teacher(kind: str, logprobs_path: str | None, mixture: bool = False) -> None:
    """Refuse, before ``fit`` starts, a distillation loss (``model.loss`` kl or nll+kl) without a cache that can hold
    the teacher's top-k (a folder with no finished cache is left to the cache's own error).

    Raises:
        PearError: naming ``model.loss``, the cache, and how to make one with a teacher.
    """
    if kind == "nll":
        return
    if mixture:
        raise PearError(
            f"model.loss {kind}: distillation reads one cache of the teacher's top-k for all the training data, and "
            "data.mixture has a cache per source; train on one source (data.train_path with its data.logprobs_path) "
            "or with model.loss nll"
        )
    if not logprobs_path:
        raise PearError(
            f"model.loss {kind}: needs the teacher's top-k log-probs and data.logprobs_path is not set; {MAKE_CACHE}"
        )
    manifest = read_manifest(Path(logprobs_path)) if Path(logprobs_path).is_dir() else None
    if manifest is not None and not manifest.get("teacher"):
        raise PearError(
            f"model.loss {kind}: data.logprobs_path={logprobs_path} holds behaviour log-probs only (it was made "
            f"without --teacher_top_k); {MAKE_CACHE}"
        )
