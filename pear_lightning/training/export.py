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
from transformers import PreTrainedTokenizerBase

from pear_lightning.atomic import atomic_write_folder, check_new_path
from pear_lightning.errors import PearError, failure_reason
from pear_lightning.model.checkpoint_io import is_sharded, load_sharded_weights, read_checkpoint, sharded_weights
from pear_lightning.training.module import PearModule


def export(
    module: PearModule,
    checkpoint: str,
    output: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    adapter_only: bool = False,
) -> Path:
    """Write ``module``'s model with the weights of ``checkpoint`` as a Hugging Face folder (see the module).

    Args:
        module: the run's module (its model, LoRA setup), not yet loaded.
        checkpoint: a checkpoint written by fit: a .ckpt file, or a sharded run's checkpoint folder.
        output: the model folder to write; must not exist.
        tokenizer: the run's tokenizer, written beside the model.
        adapter_only: with LoRA, write the adapter alone.

    Returns:
        The folder written.

    Raises:
        PearError: if the output exists or cannot be written, the checkpoint is not one of this model, or
            ``adapter_only`` is asked of a run without LoRA.
    """
    output = Path(output)
    if adapter_only and module.hparams.lora is None:
        raise PearError(
            "--adapter_only: this run fine-tunes every weight (model.lora is not set), so there is no adapter to "
            "write; export without --adapter_only for the full model, or give the LoRA run's config"
        )
    check_new_path(output, "--output", "export writes a new folder")
    state = read_checkpoint(checkpoint, "--checkpoint")
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
    if module.hparams.lora is not None and not adapter_only:
        model = model.merge_and_unload()

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
    return output
