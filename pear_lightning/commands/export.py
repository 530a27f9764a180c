"""``python -m pear_lightning export``: a trained checkpoint as a Hugging Face model folder for the RL stage.

The folder holds safetensors weights, the config, the generation config and the tokenizer, and
loads with ``AutoModelForCausalLM.from_pretrained`` (so in vLLM, verl, TRL and OpenRLHF). A LoRA
run is merged into its base model, unless ``--adapter_only`` asks for the adapter alone (a peft
folder). A sharded checkpoint (FSDP, FSDP2) is gathered in this one process. The folder is written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from ..atomic import atomic_write_folder
from ..checkpoint_io import is_sharded, load_sharded_weights, read_checkpoint, sharded_weights
from ..errors import PearError, failure_reason
from ..lightning_cli import PearArgumentParser, PearCLI, tool_cli
from ..module import PearModule
from ..preflight import check_new_path


class ExportCLI(PearCLI):
    """The run's config plus the export's own options."""

    def add_arguments_to_parser(self, parser: PearArgumentParser) -> None:
        """Add ``--checkpoint``, ``--output`` and ``--adapter_only``."""
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--checkpoint",
            type=str,
            required=True,
            help="A checkpoint written by fit: a .ckpt file, or a sharded run's checkpoint folder.",
        )
        parser.add_argument("--output", type=str, required=True, help="The model folder to write; must not exist.")
        parser.add_argument("--adapter_only", type=bool, default=False, help="With LoRA, write the adapter alone.")


def run(args: list[str]) -> None:
    """Run the ``export`` command with ``args`` (the command name excluded)."""
    cli = tool_cli(ExportCLI, args, "export", __doc__.splitlines()[0])
    output, checkpoint = Path(cli.config.output), cli.config.checkpoint
    check_new_path(output, "--output", "export writes a new folder")
    state = read_checkpoint(checkpoint, "--checkpoint")
    module: PearModule = cli.model
    module.configure_model()
    if is_sharded(Path(checkpoint)):  # FSDP / FSDP2: gather the shards in this one process
        top, shapes = sharded_weights(Path(checkpoint))
        module.on_load_checkpoint({**state, "state_dict": shapes})
        own = module.state_dict()
        state["state_dict"] = load_sharded_weights(Path(checkpoint), top, {k: own[k] for k in shapes})
    else:
        module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"], strict=module.hparams.lora is None)
    model = module.model
    if module.hparams.lora is not None and not cli.config.adapter_only:
        model = model.merge_and_unload()
    tokenizer = cli.datamodule.load_tokenizer()

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    try:
        atomic_write_folder(output, write)
    except OSError as err:
        raise PearError(
            f"could not write the model folder {output} ({failure_reason(err)}); nothing was left behind: free space "
            f"in {output.parent} and export again"
        ) from err
    rank_zero_info(f"exported {checkpoint} to {output}")
