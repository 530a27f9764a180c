"""``python -m pear_lightning generate``: the run config's model, tokenizer, precision and accelerator, and the options
of ``behavior.generate.generate`` (its signature and docstring are the flags and their help), which it calls."""

from __future__ import annotations

import inspect

from pear_lightning.behavior import generate as generation
from pear_lightning.cli.lightning import PearArgumentParser, PearCLI, tool_cli

FROM_RUN_CONFIG = {"model", "tokenizer", "precision", "accelerator", "trust_remote_code", "attn_implementation"}


class GenerateCLI(PearCLI):
    """The run's config (the model to sample from, its tokenizer and chat template) plus the generation's options."""

    def add_arguments_to_parser(self, parser: PearArgumentParser) -> None:
        """Add ``generate``'s own arguments: the prompts, the output folder, the sampling distribution and the rest."""
        super().add_arguments_to_parser(parser)
        parser.add_function_arguments(generation.generate, skip=FROM_RUN_CONFIG)


def run(args: list[str]) -> None:
    """Run the ``generate`` command with ``args`` (the command name excluded)."""
    cli = tool_cli(GenerateCLI, args, "generate", generation.__doc__.splitlines()[0])
    own = [name for name in inspect.signature(generation.generate).parameters if name not in FROM_RUN_CONFIG]
    hp, trainer = cli.model.hparams, cli.trainer
    generation.generate(
        **{name: cli.config_init[name] for name in own},
        model=hp.model_name_or_path,
        tokenizer=cli.datamodule.tokenizer_name_or_path,
        precision=str(trainer.precision),
        accelerator=trainer.strategy.root_device.type,
        trust_remote_code=hp.trust_remote_code,
        attn_implementation=hp.attn_implementation,
    )
