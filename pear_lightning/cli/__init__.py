"""cli: ``python -m pear_lightning <command>``. The table of commands and their one-line errors (``commands``),
LightningCLI over the module and data (``lightning``), the checks run before a command starts (``preflight``), the
strategy plugins (``plugins``), and one thin wrapper per command beside LightningCLI's own, which parses the run
config and calls the command's typed function. It may import every stage; nothing imports it."""

from pear_lightning.cli.commands import main

__all__ = ["main"]
