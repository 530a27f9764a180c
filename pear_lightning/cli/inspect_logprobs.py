"""``python -m pear_lightning inspect_logprobs``: the run config's module and data, and the options of
``training.inspect.inspect_logprobs`` (its signature and docstring are the flags and their help), which it calls."""

from __future__ import annotations

from pear_lightning.cli.lightning import PearArgumentParser, PearCLI, tool_cli
from pear_lightning.training import inspect as inspection

FROM_RUN_CONFIG = {"module", "data"}


class InspectCLI(PearCLI):
    """The run's config plus the inspection's own options."""

    def add_arguments_to_parser(self, parser: PearArgumentParser) -> None:
        """Add ``inspect_logprobs``'s own arguments: ``--plot`` and ``--max_examples``."""
        super().add_arguments_to_parser(parser)
        parser.add_function_arguments(inspection.inspect_logprobs, skip=FROM_RUN_CONFIG)


def run(args: list[str]) -> None:
    """Run the ``inspect_logprobs`` command with ``args`` (the command name excluded)."""
    cli = tool_cli(InspectCLI, args, "inspect_logprobs", inspection.__doc__.splitlines()[0])
    inspection.inspect_logprobs(cli.model, cli.datamodule, cli.config.plot, cli.config.max_examples)
