"""PearCLI: LightningCLI over PearModule and PearDataModule, its one-line errors, and the parsing every command
shares (a run config plus the command's own options)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, LRSchedulerTypeTuple
from torch.optim import Optimizer

from pear_lightning.atomic import atomic_write
from pear_lightning.cli.plugins import load_strategies, skipped_strategies
from pear_lightning.cli.preflight import check_fit, check_outputs, check_teacher
from pear_lightning.data.datamodule import PearDataModule
from pear_lightning.errors import PearError
from pear_lightning.model.checkpoint_io import read_checkpoint, use_atomic_checkpoints
from pear_lightning.strategies import WeightingStrategy
from pear_lightning.training.console import console_settings
from pear_lightning.training.module import PearModule
from pear_lightning.training.step import check_strategy

DEBUG_ENV = "PEAR_DEBUG"
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")  # what Lightning's ckpt_path takes besides a path


class PearArgumentParser(LightningArgumentParser):
    """Reports a bad command line or config as one ``error:`` line, naming the known strategies when
    the weighting is the problem (a traceback with PEAR_DEBUG=1)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print one clear error and exit with status 2."""
        if not self.exit_on_error or os.environ.get(DEBUG_ENV) == "1":
            super().error(message, ex)
        if 'Parser key "model.weighting"' in message:
            message = _weighting_error(message)
        sys.stderr.write(f"error: {' '.join(line.strip() for line in message.strip().splitlines() if line.strip())}\n")
        sys.exit(2)

    def save(self, cfg: Namespace, path: str | os.PathLike, *args: Any, multifile: bool = True, **kwargs: Any) -> None:
        """Save a config; one local file (as LightningCLI's config.yaml) is written atomically."""
        if multifile or "://" in str(path):
            super().save(cfg, path, *args, multifile=multifile, **kwargs)
            return
        if not kwargs.get("overwrite", False) and os.path.isfile(path):
            raise ValueError(f"Refusing to overwrite existing file: {path}")
        save, kwargs = super().save, {**kwargs, "overwrite": True}  # the temporary file is ours to overwrite
        atomic_write(Path(path), lambda tmp: save(cfg, str(tmp), *args, multifile=False, **kwargs))


def _weighting_error(message: str) -> str:
    """Rewrite jsonargparse's error about ``model.weighting``: a known strategy given a bad argument, a plugin
    strategy that failed to import, or an unknown name (listing the installed ones)."""
    known = re.search(r"Problem with given class_path '(?:[\w.]*\.)?(\w+)':(.*)", message, re.DOTALL)
    if known:
        name, detail = known.group(1), " ".join(known.group(2).split())
        return f"model.weighting: {name}: {detail} {_arguments_help(name)}"
    detail = message.strip().splitlines()[-1].strip(" -")
    installed = ", ".join(sorted(load_strategies()))
    broken = [problem for name, problem in skipped_strategies().items() if re.search(rf"\b{name}\b", detail)]
    if broken:
        return f"model.weighting: {broken[0]}; fix or reinstall that plugin, or use an installed strategy: {installed}"
    return (
        f"model.weighting: not a known weighting strategy ({detail}). Installed strategies: {installed}; "
        "give one of their names or a full class path (python -m pear_lightning fit --model.weighting.help NAME)"
    )


class PearCLI(LightningCLI):
    """LightningCLI with ``optimizer:`` / ``lr_scheduler:`` handed to the module, so the optimizer is
    built over the trainable parameters after the model exists, and the tokenizer taken from the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the optimizer and scheduler groups, and link the model's path to the tokenizer's."""
        parser.add_optimizer_args((Optimizer,))
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple)
        parser.link_arguments("optimizer", "model.optimizer", compute_fn=_as_dict)
        parser.link_arguments("lr_scheduler", "model.lr_scheduler", compute_fn=_as_dict)
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.add_instantiator(_build_weighting, WeightingStrategy)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse the command line, then refuse a ``--ckpt_path`` that is not a checkpoint written by fit before
        anything is built or written (Lightning reads its hyperparameters next)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt and ckpt.split(":")[0] not in CKPT_KEYWORDS and "://" not in ckpt:
            read_checkpoint(ckpt, "--ckpt_path")

    def instantiate_classes(self) -> None:
        """Build the configured classes; one that cannot be built (an optional package missing, bad arguments) is one
        error naming the class and, where its package says, what to install."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            problem = unbuildable(str(err))
            if problem is None:
                raise
            raise PearError(problem) from err

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Build the trainer, with this project's progress bar and summary (``console``), atomic checkpoint writes
        and ``weights_only`` loads (``checkpoint_io``); a setting Lightning refuses is one error."""
        kwargs = {**console_settings(self._get(self.config_init, "trainer", default={})), **kwargs}
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as err:
            raise PearError(f"trainer: {' '.join(str(err).split())}") from err
        use_atomic_checkpoints(trainer)
        if trainer.strategy.root_device.type == "cuda" and isinstance(self.model, PearModule):
            # Now, not in the module's setup: Lightning's hint about it comes before that.
            torch.set_float32_matmul_precision(self.model.hparams.float32_matmul_precision)
        return trainer

    def before_fit(self) -> None:
        """Check everything fit can before it starts (``preflight.check_fit``, ``preflight.check_teacher``)."""
        check_fit(self.trainer, self.model)
        check_teacher(self.model.hparams.loss, self.datamodule.logprobs_path, bool(self.datamodule.mixture))

    def before_validate(self) -> None:
        """Refuse ``validate`` without validation data, or with logs it could not write."""
        self._check_evaluation("validate", "val")

    def before_test(self) -> None:
        """Refuse ``test`` without test data, or with logs it could not write."""
        self._check_evaluation("test", "test")

    def before_predict(self) -> None:
        """Refuse ``predict`` without predict data, or with logs it could not write."""
        self._check_evaluation("predict", "predict")

    def _check_evaluation(self, command: str, split: str) -> None:
        check_strategy(self.trainer.strategy)
        if not self.datamodule.paths[split]:
            raise PearError(
                f"{command}: data.{split}_path is not set, so there is nothing to {command}; give it a .jsonl, "
                ".json or .parquet file or folder"
            )
        check_outputs(self.trainer)


def unbuildable(message: str) -> str | None:
    """One line from jsonargparse's report of a ``class_path`` it could not build (the class, the first line of the
    reason, the packages whose install its hints name), or None if the report names none."""
    problem = re.search(r"Problem with given class_path '([\w.]+)':\s*\n\s*(.+)", message)
    if problem is None:
        return None
    name, reason = problem.groups()
    packages = list(dict.fromkeys(re.findall(r"pip install -U '([^']+)'", message)))
    install = "; to install: " + " or ".join(f"pip install '{p}'" for p in packages) if packages else ""
    return f"{name} cannot be built: {reason.split(' HINT:')[0].strip().rstrip('.')}{install}"


def _build_weighting(cls: type[WeightingStrategy], *args: Any, **kwargs: Any) -> WeightingStrategy:
    """Build a weighting strategy; arguments it refuses (``ValueError``) become one error naming them."""
    try:
        return cls(*args, **kwargs)
    except ValueError as err:
        raise PearError(f"model.weighting: {cls.__name__}: {err} {_arguments_help(cls.__name__)}") from err


def _arguments_help(strategy: str) -> str:
    """Where a strategy's arguments are listed."""
    return f"(python -m pear_lightning fit --model.weighting.help {strategy} lists its arguments)"


def _as_dict(namespace: Namespace | None) -> dict | None:
    """A parsed ``class_path`` / ``init_args`` group as the plain dict ``instantiate_class`` takes."""
    return namespace.as_dict() if namespace else None


def tool_cli(cli_class: type[PearCLI], args: list[str], command: str, description: str) -> PearCLI:
    """Parse a tool's ``args`` (a run config plus the tool's own options) into a model, data and trainer,
    without running anything, logging, checkpointing or saving a config."""
    return cli_class(
        PearModule,
        PearDataModule,
        run=False,
        # Checkpointing is left as the run config has it (Lightning refuses a ModelCheckpoint callback with
        # enable_checkpointing=false); ModelCheckpoint saves nothing outside fit.
        args=[*args, "--trainer.logger=false"],
        save_config_callback=None,
        auto_configure_optimizers=False,
        parser_class=PearArgumentParser,
        parser_kwargs={"prog": f"python -m pear_lightning {command}", "description": description},
    )
