"""``python -m pear_lightning cache_logprobs``: the run config's data, model and trainer, and the options of
``behavior.score.cache_logprobs`` (its signature and docstring are the flags and their help), which it calls."""

from __future__ import annotations

import inspect

from pear_lightning.behavior import score
from pear_lightning.cli.lightning import PearArgumentParser, PearCLI, tool_cli

FROM_RUN_CONFIG = {"data", "model", "trainer", "logprob_chunk_size", "trust_remote_code", "attn_implementation"}


class CacheCLI(PearCLI):
    """The run's config plus the cache's own options."""

    def add_arguments_to_parser(self, parser: PearArgumentParser) -> None:
        """Add ``cache_logprobs``'s own arguments: the output folder, the shard size, the splits and the teacher."""
        super().add_arguments_to_parser(parser)
        parser.add_function_arguments(score.cache_logprobs, skip=FROM_RUN_CONFIG)


def run(args: list[str]) -> None:
    """Run the ``cache_logprobs`` command with ``args`` (the command name excluded)."""
    cli = tool_cli(CacheCLI, args, "cache_logprobs", score.__doc__.splitlines()[0])
    own = [name for name in inspect.signature(score.cache_logprobs).parameters if name not in FROM_RUN_CONFIG]
    hp = cli.model.hparams
    score.cache_logprobs(
        cli.datamodule,
        model=hp.model_name_or_path,
        trainer=cli.trainer,
        **{name: cli.config_init[name] for name in own},
        logprob_chunk_size=hp.logprob_chunk_size,
        trust_remote_code=hp.trust_remote_code,
        attn_implementation=hp.attn_implementation,
    )
