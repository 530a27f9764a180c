"""The command line, ``python -m pear_lightning <command>``: one table of commands, one-line errors."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import datasets
import transformers

from pear_lightning.cli.lightning import DEBUG_ENV, PearArgumentParser, PearCLI
from pear_lightning.cli.plugins import format_strategies, load_strategies
from pear_lightning.cli.tools import TOOLS
from pear_lightning.data.datamodule import PearDataModule
from pear_lightning.demo import demo_config
from pear_lightning.errors import PearError
from pear_lightning.training.module import PearModule

DEBUG_FLAG = "--debug"
DESCRIPTION = (
    "Supervised fine-tuning with per-token weighting strategies (PEAR, arXiv 2602.01058). "
    f"Errors are one line; {DEBUG_FLAG} (anywhere on the line) or {DEBUG_ENV}=1 shows their traceback."
)


def lightning(args: list[str]) -> None:
    """LightningCLI's own commands, over PearModule and PearDataModule."""
    ours = ", ".join(command for command in COMMANDS if command not in LIGHTNING_COMMANDS)
    others = f"Commands beside LightningCLI's: {ours} (python -m pear_lightning --help says what each does)."
    PearCLI(
        PearModule,
        PearDataModule,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_class=PearArgumentParser,
        parser_kwargs={
            "prog": "python -m pear_lightning",
            "description": DESCRIPTION,
            **{command: {"epilog": others} for command in LIGHTNING_COMMANDS},
        },
        args=args,
    )


def strategies(args: list[str]) -> None:
    """Print the installed weighting strategies."""
    print(format_strategies(load_strategies()))


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
INTERRUPTED = {  # what a command stopped by Ctrl-C leaves, and how to go on
    "fit": "the checkpoints written so far are kept: go on with --ckpt_path last (or a checkpoint's path)",
    "generate": "the finished shards are kept: run the same command again to go on where it stopped",
    "cache_logprobs": "the finished shards are kept: run the same command again to go on where it stopped",
    "export": "nothing was written (the folder appears only when complete): run it again",
}
RERUN = "nothing was written: run it again"  # the other commands
# command → (what it does, how it runs with the arguments after it; LightningCLI's commands get the whole line)
COMMANDS: dict[str, tuple[str, Callable[[list[str]], None]]] = {
    "fit": ("train a model (LightningCLI)", lightning),
    "validate": ("validation loss of a model or checkpoint (LightningCLI)", lightning),
    "test": ("test loss of a model or checkpoint (LightningCLI)", lightning),
    "predict": ("per-token log-probs of the predict data (LightningCLI)", lightning),
    "generate": ("sample responses with their token ids and sampling-distribution log-probs", TOOLS["generate"].run),
    "cache_logprobs": ("score the data with the behaviour model into a checked cache", TOOLS["cache_logprobs"].run),
    "inspect_logprobs": (
        "quantiles of the behaviour log-probs, step-0 log-ratios and weights",
        TOOLS["inspect_logprobs"].run,
    ),
    "export": ("a checkpoint as a Hugging Face model folder, for the RL stage", TOOLS["export"].run),
    "strategies": ("the installed weighting strategies, their origin and arguments", strategies),
}


def overview() -> str:
    """The top-level help: every command, one line each."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (what, _) in COMMANDS.items()]
    return "\n".join(
        [
            "usage: python -m pear_lightning <command> [--config CONFIG] [options]",
            "",
            DESCRIPTION,
            "",
            "commands:",
            *lines,
            "",
            "python -m pear_lightning <command> --help lists a command's options.",
        ]
    )


def _named_config(arg: str, before: str) -> str:
    """``--config demo`` names the demo config that ships in the package (see ``demo.demo_config``)."""
    if arg == "--config=demo" or (arg == "demo" and before == "--config"):
        if not Path("demo").exists():
            text = demo_config()
            return f"--config={text}" if arg.startswith("--config=") else text
    return arg


class _DropAdverts(logging.Filter):
    """Lightning prints advertisements for its cloud products on every run; they are not about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def main(args: list[str] | None = None) -> None:
    """Run one command (see ``COMMANDS``); a ``PearError`` is printed as one line (a traceback with ``--debug`` or
    PEAR_DEBUG=1), and so is a Ctrl-C, saying what was kept and how to go on (exit status 130)."""
    # Warnings from Lightning's own use of its dependencies, which the user can do nothing about.
    warnings.filterwarnings("ignore", message=".*jsonargparse.*deprecat", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())
    if not sys.stderr.isatty():  # into a file: no carriage-return bars of datasets' or transformers' loading
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    argv = sys.argv[1:] if args is None else list(args)
    if DEBUG_FLAG in argv:
        os.environ[DEBUG_ENV] = "1"  # also for the processes a multi-device run starts
        argv = [a for a in argv if a != DEBUG_FLAG]
    argv = [_named_config(a, before) for before, a in zip(["", *argv], argv)]
    if argv[:1] in ([], ["-h"], ["--help"]):
        print(overview())
        return
    try:
        _, run = COMMANDS.get(argv[0], (None, lightning))
        if run is not strategies:
            load_strategies()  # before any parser is built, so that strategies are known by their short names
        run(argv if run is lightning else argv[1:])
    except PearError as err:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"{argv[0]}: stopped (Ctrl-C); {INTERRUPTED.get(argv[0], RERUN)}", file=sys.stderr)
        sys.exit(130)
