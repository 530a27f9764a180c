"""``python -m pear_lightning export``: a trained checkpoint as a Hugging Face model folder for the RL stage.

The folder holds safetensors weights, the config, the generation config and the tokenizer, and
loads with ``AutoModelForCausalLM.from_pretrained`` (so in vLLM, verl, TRL and OpenRLHF). A LoRA
run is merged into its base model, unless ``--adapter_only`` asks for the adapter alone (a peft
folder). The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from ..atomic import atomic_write_folder
from ..errors import PearError
from ..lightning_cli import PearArgumentParser, PearCLI, tool_cli
from ..module import PearModule


class ExportCLI(PearCLI):
    """The run's config plus the export's own options."""

    def add_arguments_to_parser(self, parser: PearArgumentParser) -> None:
        """Add ``--checkpoint``, ``--output`` and ``--adapter_only``."""
        super().add_arguments_to_parser(parser)
        parser.add_argument("--checkpoint", type=str, required=True, help="A checkpoint written by fit (.ckpt).")
        parser.add_argument("--output", type=str, required=True, help="The model folder to write; must not exist.")
        parser.add_argument("--adapter_only", type=bool, default=False, help="With LoRA, write the adapter alone.")


def run(args: list[str]) -> None:
    """Run the ``export`` command with ``args`` (the command name excluded)."""
    cli = tool_cli(ExportCLI, args, "export", __doc__.splitlines()[0])
    output, checkpoint = Path(cli.config.output), cli.config.checkpoint
    if output.exists():
        raise PearError(f"--output {output}: exists already; export writes a new folder, choose another name")
    if not Path(checkpoint).is_file():
        raise PearError(f"--checkpoint {checkpoint}: file not found")
    module: PearModule = cli.model
    module.configure_model()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"], strict=module.hparams.lora is None)
    model = module.model
    if module.hparams.lora is not None and not cli.config.adapter_only:
        model = model.merge_and_unload()
    tokenizer = cli.datamodule.load_tokenizer()

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    atomic_write_folder(output, write)
    rank_zero_info(f"exported {checkpoint} to {output}")
