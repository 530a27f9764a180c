"""The models and the baseline of ``gpu_throughput``: random-init models of published shapes, and the hand-written
LoRA loop (peft + autocast + the model's logits + ``F.cross_entropy`` + AdamW) that pear is measured against."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PretrainedConfig, Qwen2Config

from pear_lightning.model.lora import LoraSettings

from .training import DEMO_TOKENIZER, TrainingData, train_loop

# Published shapes (each hub repository's config.json): config class, vocabulary, hidden size, MLP size, layers,
# attention heads, key-value heads, rope theta, tied embeddings. The tiny one is for --tiny.
SHAPES = {
    "smollm2-135m": (LlamaConfig, 49_152, 576, 1536, 30, 9, 3, 1e5, True),
    "qwen2.5-1.5b": (Qwen2Config, 151_936, 1536, 8960, 28, 12, 2, 1e6, True),
    "qwen2.5-7b": (Qwen2Config, 152_064, 3584, 18_944, 28, 28, 4, 1e6, False),
    "tiny": (LlamaConfig, 1024, 64, 128, 2, 4, 2, 1e4, False),
}
# Dense bf16 tensor-core peaks, TFLOP/s, matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100": 756.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0}  # fmt: skip
LORA = LoraSettings(r=16, alpha=32, dropout=0.05, target_modules="all-linear")


def peak_tflops(device: str, override: float | None) -> float | None:
    """The GPU's dense bf16 peak: ``override``, else looked up by name; None when unknown."""
    if override or device != "cuda":
        return override
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def shape_config(shape: str, pad_token_id: int, eos_token_id: int) -> PretrainedConfig:
    """The model config of ``shape`` (see ``SHAPES``) with the tokenizer's special ids."""
    config_class, vocab, hidden, mlp, layers, heads, kv_heads, theta, tied = SHAPES[shape]
    sizes = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads)  # fmt: skip
    ids = dict(pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    return config_class(**sizes, **ids, rope_theta=theta, tie_word_embeddings=tied, max_position_embeddings=32_768)


def build_model(shape: str, folder: Path, device: str) -> int:
    """Save a randomly initialised (seed 0) model of ``shape`` with the demo tokenizer in ``folder``; its size."""
    tokenizer = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    torch.manual_seed(0)
    with torch.device(device):  # initialising billions of weights on the CPU would take minutes
        config = shape_config(shape, tokenizer.pad_token_id, tokenizer.eos_token_id)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return parameters


def run_loop(model_dir: Path, data: TrainingData, batch_size: int, steps: int, device: str) -> list[float]:
    """The hand-written LoRA loop on ``data`` in order; the end time of every step."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    settings = dict(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout, target_modules=LORA.target_modules)
    config = LoraConfig(**settings, task_type="CAUSAL_LM")
    model = get_peft_model(model, config).train()
    return train_loop(model, data, batch_size, device, steps, autocast=device == "cuda")
