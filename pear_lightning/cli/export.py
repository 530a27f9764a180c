"""``python -m pear_lightning export``: the run config's module and tokenizer, and the options of
``training.export.export`` (its signature and docstring are the flags and their help), which it calls."""

from __future__ import annotations

from pear_lightning.cli.lightning import PearArgumentParser, PearCLI, tool_cli
from pear_lightning.training import export as exporting

FROM_RUN_CONFIG = {"module", "tokenizer"}


class ExportCLI(PearCLI):
    """The run's config plus the export's own options."""

    def add_arguments_to_parser(self, parser: PearArgumentParser) -> None:
        """Add ``export``'s own arguments: ``--checkpoint``, ``--output`` and ``--adapter_only``."""
        super().add_arguments_to_parser(parser)
        parser.add_function_arguments(exporting.export, skip=FROM_RUN_CONFIG)


def run(args: list[str]) -> None:
    """Run the ``export`` command with ``args`` (the command name excluded)."""
    cli = tool_cli(ExportCLI, args, "export", exporting.__doc__.splitlines()[0])
    c = cli.config
    exporting.export(cli.model, c.checkpoint, c.output, cli.datamodule.load_tokenizer(), c.adapter_only)
