"""The command line: LightningCLI over PearModule and PearDataModule (``python -m pear_lightning``)."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from typing import NoReturn

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, LRSchedulerTypeTuple
from torch.optim import Optimizer

from .data import PearDataModule
from .errors import PearError
from .module import PearModule
from .plugins import format_strategies, load_strategies

DEBUG_ENV = "PEAR_DEBUG"
DESCRIPTION = "Supervised fine-tuning with per-token weighting strategies (PEAR, arXiv 2602.01058)."


class PearArgumentParser(LightningArgumentParser):
    """Reports a bad command line or config as one ``error:`` line, naming the known strategies when
    the weighting is the problem (a traceback with PEAR_DEBUG=1)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print one clear error and exit with status 2."""
        if not self.exit_on_error or os.environ.get(DEBUG_ENV) == "1":
            super().error(message, ex)
        if 'Parser key "model.weighting"' in message:
            detail = message.strip().splitlines()[-1].strip(" -")
            known = ", ".join(sorted(load_strategies()))
            message = (
                f"model.weighting: not a known weighting strategy ({detail}). Installed strategies: {known}; "
                "give one of their names or a full class path "
                "(python -m pear_lightning fit --model.weighting.help NAME)"
            )
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


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


def _as_dict(namespace: Namespace | None) -> dict | None:
    """A parsed ``class_path`` / ``init_args`` group as the plain dict ``instantiate_class`` takes."""
    return namespace.as_dict() if namespace else None


class _DropAdverts(logging.Filter):
    """Lightning prints advertisements for its cloud products on every run; they are not about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


# Commands of our own beside LightningCLI's; each module imports this one, so they load only when asked for.
TOOLS = {
    "cache_logprobs": "pear_lightning.scoring:cache_logprobs",
    "inspect_logprobs": "pear_lightning.inspection:inspect_logprobs",
    "export": "pear_lightning.export:export",
}


def tool_cli(cli_class: type[PearCLI], args: list[str], command: str, description: str) -> PearCLI:
    """Parse a tool's ``args`` (a run config plus the tool's own options) into a model, data and trainer,
    without running anything, logging, checkpointing or saving a config."""
    return cli_class(
        PearModule,
        PearDataModule,
        run=False,
        args=[*args, "--trainer.logger=false", "--trainer.enable_checkpointing=false"],
        save_config_callback=None,
        auto_configure_optimizers=False,
        parser_class=PearArgumentParser,
        parser_kwargs={"prog": f"python -m pear_lightning {command}", "description": description},
    )


def main(args: list[str] | None = None) -> None:
    """Run the command line; a ``PearError`` is printed as one line (a traceback with PEAR_DEBUG=1).

    ``strategies`` lists the installed weighting strategies, ``cache_logprobs`` scores the data with
    a behaviour model, ``inspect_logprobs`` summarises the behaviour log-probs and the step-0
    weights, ``export`` writes a checkpoint as a Hugging Face model folder; everything else is
    LightningCLI's (``fit``, ``validate``, ``test``, ``predict``).
    """
    # Warnings from Lightning's own use of its dependencies, which the user can do nothing about.
    warnings.filterwarnings("ignore", message=".*jsonargparse.*deprecat", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())
    argv = sys.argv[1:] if args is None else args
    try:
        strategies = load_strategies()
        if argv[:1] == ["strategies"]:
            print(format_strategies(strategies))
            return
        if argv[:1] and argv[0] in TOOLS:
            module, function = TOOLS[argv[0]].split(":")
            getattr(importlib.import_module(module), function)(argv[1:])
            return
        PearCLI(
            PearModule,
            PearDataModule,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_class=PearArgumentParser,
            parser_kwargs={"prog": "python -m pear_lightning", "description": DESCRIPTION},
            args=args,
        )
    except PearError as err:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
