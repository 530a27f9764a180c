"""The commands beside LightningCLI's own: each is a typed function of a stage (``behavior.generate.generate``,
``behavior.score.cache_logprobs``, ``training.inspect.inspect_logprobs``, ``training.export.export``) whose signature
and docstring are its flags and their help; the run config (``--config``, ``--model.*``, ``--data.*``,
``--trainer.*``) gives the arguments named in its ``from_run``, the command line the rest."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pear_lightning.behavior import generate, score
from pear_lightning.cli.lightning import PearArgumentParser, PearCLI, tool_cli
from pear_lightning.training import export
from pear_lightning.training import inspect as inspection

FromRun = dict[str, Callable[[PearCLI], Any]]


@dataclass(frozen=True)
class Tool:
    """A command that calls ``function``; ``from_run`` gives the arguments the run config decides, by name."""

    function: Callable[..., Any]
    from_run: FromRun

    def own(self) -> list[str]:
        """The function's parameters that are the command's own flags."""
        return [name for name in inspect.signature(self.function).parameters if name not in self.from_run]

    def run(self, args: list[str]) -> None:
        """Parse ``args`` (the command name excluded) and call the function."""
        command = self.function.__name__
        description = inspect.getmodule(self.function).__doc__.splitlines()[0]
        cli = tool_cli(_parser_for(self), args, command, description)
        self.function(
            **{name: cli.config_init[name] for name in self.own()},
            **{name: given(cli) for name, given in self.from_run.items()},
        )


def _parser_for(tool: Tool) -> type[PearCLI]:
    """PearCLI with the tool's own flags added beside the run config's."""

    class ToolCLI(PearCLI):
        def add_arguments_to_parser(self, parser: PearArgumentParser) -> None:
            super().add_arguments_to_parser(parser)
            parser.add_function_arguments(tool.function, skip=set(tool.from_run))

    return ToolCLI


def _hparam(name: str) -> Callable[[PearCLI], Any]:
    return lambda cli: cli.model.hparams[name]


SCORING: FromRun = {name: _hparam(name) for name in ("logprob_chunk_size", "trust_remote_code", "attn_implementation")}
TOOLS = {
    "generate": Tool(
        generate.generate,
        {
            "model": _hparam("model_name_or_path"),
            "tokenizer": lambda cli: cli.datamodule.tokenizer_name_or_path,
            "precision": lambda cli: str(cli.trainer.precision),
            "accelerator": lambda cli: cli.trainer.strategy.root_device.type,
            "trust_remote_code": _hparam("trust_remote_code"),
            "attn_implementation": _hparam("attn_implementation"),
        },
    ),
    "cache_logprobs": Tool(
        score.cache_logprobs,
        {
            "data": lambda cli: cli.datamodule,
            "model": _hparam("model_name_or_path"),
            "trainer": lambda cli: cli.trainer,
            **SCORING,
        },
    ),
    "inspect_logprobs": Tool(
        inspection.inspect_logprobs, {"module": lambda cli: cli.model, "data": lambda cli: cli.datamodule}
    ),
    "export": Tool(
        export.export, {"module": lambda cli: cli.model, "tokenizer": lambda cli: cli.datamodule.load_tokenizer()}
    ),
}
