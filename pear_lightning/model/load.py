"""The model a run trains: loaded in fp32 (QLoRA: a 4-bit base), with gradient checkpointing, LoRA and FSDP2 sharding
as configured; and the check that a checkpoint belongs to it."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from pear_lightning.errors import LOAD_ERRORS, PearError, load_error, refuse_missing
from pear_lightning.model import attention  # noqa: F401  (registers pear_varlen with transformers)
from pear_lightning.model.lora import LoraSettings, apply_lora
from pear_lightning.model.sharding import shard_model


def load_model(
    path: str,
    trust_remote_code: bool = False,
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    load_in_4bit: bool = False,
    device_mesh: DeviceMesh | None = None,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, bool]:
    """Load a causal LM for training, in train mode (``from_pretrained`` returns eval mode: dropout would stay off).

    Args:
        path: a hub name or a local folder.
        trust_remote_code: allow the folder or repository to run its own code.
        lora: wrap the model with fresh LoRA adapters (the base model frozen).
        gradient_checkpointing: recompute each decoder layer in backward.
        load_in_4bit: QLoRA's NF4 base model through bitsandbytes (needs ``lora`` and a CUDA GPU).
        device_mesh: ``ModelParallelStrategy``'s mesh: shard the model with FSDP2.
        attn_implementation: transformers' attention implementation, or ``pear_varlen`` (see ``attention``).

    Returns:
        The model, and whether the memory-lean (chunked) log-prob path can reach its lm_head.
    """
    refuse_missing("model.model_name_or_path", path)
    options = _quantization(load_in_4bit, lora)
    if attn_implementation:
        options["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=trust_remote_code, **options
        )
    except LOAD_ERRORS as err:
        raise load_error("model.model_name_or_path", path, "a causal LM", err) from err
    except ImportError as err:  # an optional backend the settings ask for: flash-attn, bitsandbytes, remote code's
        setting = f"model.attn_implementation={attn_implementation}" if attn_implementation else "model"
        raise PearError(
            f"{setting}: loading {path} needs a package that is not installed ({' '.join(str(err).split())}); "
            "install it, or choose settings that do not need it (model.attn_implementation sdpa or pear_varlen)"
        ) from err
    if gradient_checkpointing:
        _checkpoint_activations(model)
    if lora is not None:
        model = apply_lora(model, lora)
    # A tied lm_head under FSDP2 is reachable only through the model's own forward.
    chunkable = device_mesh is None or shard_model(model, device_mesh)
    return model.train(), chunkable


POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def position_limit(config: Any) -> int | None:
    """The number of positions a model config declares (learned position embeddings, or a RoPE model's trained
    context), or None if it declares none."""
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(model: str, config: Any, tokens: int, what: str, fix: str) -> None:
    """Refuse a sequence of ``tokens`` tokens (``what`` says whose) longer than the positions of ``model``.

    Raises:
        PearError: naming both numbers and ``fix`` (formatted with the ``limit``): past its positions a model with
            learned positions fails, and a RoPE model runs on positions it was never trained on.
    """
    limit = position_limit(config)
    if limit is not None and tokens > limit:
        field = next(name for name in POSITION_FIELDS if getattr(config, name, None) == limit)
        raise PearError(
            f"{what} has {tokens} tokens, more than the {limit} positions of model {model} (its config's {field}; a "
            "model with learned positions fails past them, a RoPE model runs on positions it was never trained on): "
            + fix.format(limit=limit)
        )


def check_example_positions(model: str, config: Any, longest: tuple[int, str, str] | None) -> None:
    """Refuse data whose longest tokenised example (tokens, id, path; see ``PearDataModule.longest``) is longer than
    the positions of ``model``."""
    if longest is not None:
        tokens, example, path = longest
        fix = "set data.max_length to at most {limit} (longer examples are cut, and counted), or use a model with more"
        check_positions(model, config, tokens, f"example {example} of {path}", fix)


def _checkpoint_activations(model: PreTrainedModel) -> None:
    """Recompute each decoder layer in backward, through transformers 5's ``activation_checkpointing_enable`` where
    it exists (its ``gradient_checkpointing_enable`` is deprecated), the older name otherwise."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _quantization(load_in_4bit: bool, lora: LoraSettings | None) -> dict[str, Any]:
    """``from_pretrained`` arguments for QLoRA's 4-bit base model, or none."""
    if not load_in_4bit:
        return {}
    if lora is None:
        raise PearError("model.load_in_4bit is QLoRA: it needs model.lora (a 4-bit base model cannot be trained)")
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise PearError("model.load_in_4bit needs a CUDA GPU and bitsandbytes (pip install bitsandbytes)")
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def trainable_keys(model: nn.Module, prefix: str) -> set[str]:
    """State-dict keys of the trainable parameters of ``model`` (held by its parent under ``prefix``)."""
    return {f"{prefix}{name}" for name, param in model.named_parameters() if param.requires_grad}


def check_checkpoint(expected: set[str], state: dict[str, torch.Tensor], saved: dict[str, Any], setup: str) -> None:
    """Refuse a checkpoint whose weights are not exactly ``expected``, with the shapes of ``state``.

    Raises:
        PearError: naming how many weights are missing, unexpected or of another shape, and the first of them.
    """
    found = set(saved)
    wrong_shape = sorted(k for k in expected & found if saved[k].shape != state[k].shape)
    if expected == found and not wrong_shape:
        return
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    raise PearError(
        f"the checkpoint was not made by this model and setup ({setup}): {len(missing)} weights missing, "
        f"{len(unexpected)} unexpected, {len(wrong_shape)} of another shape (first: "
        f"{(missing + unexpected + wrong_shape)[:3]}); resume with the config that made it"
    )
