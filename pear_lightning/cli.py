"""The command line: LightningCLI over PearModule and PearDataModule (``python -m pear_lightning``)."""

from __future__ import annotations

import os
import sys
import warnings

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, LRSchedulerTypeTuple
from torch.optim import Optimizer

from .data import PearDataModule
from .errors import PearError
from .module import PearModule
from .plugins import load_strategies

DEBUG_ENV = "PEAR_DEBUG"


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


def main(args: list[str] | None = None) -> None:
    """Run the command line; a ``PearError`` is printed as one line (a traceback with PEAR_DEBUG=1)."""
    # Lightning 2.6 calls jsonargparse APIs that newer jsonargparse deprecates; the warning is not the user's.
    warnings.filterwarnings("ignore", message=".*jsonargparse.*deprecat", category=DeprecationWarning)
    try:
        load_strategies()
        PearCLI(
            PearModule,
            PearDataModule,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "python -m pear_lightning"},
            args=args,
        )
    except PearError as err:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
