"""LoRA adapters through peft: the settings the config exposes, and applying them to a loaded model."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel


@dataclass
class LoraSettings:
    """LoRA adapters on a frozen base model; only the adapters are trained and checkpointed.

    Args:
        r: rank of each adapter.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapters' input.
        target_modules: module names to adapt (``q_proj``, ``v_proj``…), or ``all-linear``.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: "all-linear")


def apply_lora(model: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters (kept in the model's fp32 even under bf16-mixed)."""
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
