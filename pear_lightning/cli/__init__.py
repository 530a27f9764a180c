"""cli: ``python -m pear_lightning <command>``. The table of commands and their one-line errors (``commands``),
LightningCLI over the module and data (``lightning``), the checks run before a command starts (``preflight``), the
strategy plugins (``plugins``), and the commands beside LightningCLI's own (``tools``), each the typed function of a
stage, given the run config's model, data and trainer. It may import every stage; nothing imports it."""

from pear_lightning.cli.commands import main

__all__ = ["main"]
