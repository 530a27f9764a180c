"""Shared fixtures: an offline, throw-away Hugging Face home, the demo tokenizer, tiny models."""

import os
import tempfile

# Before anything imports huggingface_hub: never reach for the network, never touch the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="pear-test-hf-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pear_lightning" / "demo"
STUDENT = DEMO / "assets" / "student"
BEHAVIOR = DEMO / "assets" / "behavior"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines and return the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tokenizer():
    """The demo's byte-level BPE tokenizer with its ChatML template."""
    return AutoTokenizer.from_pretrained(STUDENT)


def save_tiny_llama(path: Path, tokenizer, **overrides) -> Path:
    """Save a freshly initialised (seed 0) two-layer Llama with ``tokenizer`` in ``path``; ``overrides``
    change its config."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A folder with a freshly initialised two-layer Llama and the demo tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


def conversation(question: str, answer: str) -> list[dict[str, str]]:
    """A one-turn chat."""
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
