"""Shared fixtures: an offline, throw-away Hugging Face home, the demo tokenizer, tiny models."""

import os
import tempfile

# Before anything imports huggingface_hub: never reach for the network, never touch the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="pear-test-hf-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402

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


def save_tiny_llama(path: Path, tokenizer, model_class=LlamaForCausalLM, **overrides) -> Path:
    """Save a freshly initialised (seed 0) two-layer Llama with ``tokenizer`` in ``path``; ``overrides``
    change its config, ``model_class`` the architecture (one with Llama's config fields, e.g. Qwen2)."""
    config = model_class.config_class(
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
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A folder with a freshly initialised two-layer Llama and the demo tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


def conversation(question: str, answer: str) -> list[dict[str, str]]:
    """A one-turn chat."""
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def demo_rows(count: int | None = None, split: str = "train") -> list[dict]:
    """The first ``count`` examples of the demo's ``split``, with their behaviour ``token_ids`` and ``logprobs``."""
    with open(DEMO / "data" / f"{split}.jsonl") as lines:
        return [json.loads(line) for line in lines][:count]


def adamw(lr: float, **init_args) -> dict:
    """An ``optimizer`` setting of PearModule: AdamW with ``lr`` and ``init_args``."""
    return {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr, **init_args}}


def fit_quietly(module, data, ckpt_path=None, **trainer_args) -> L.Trainer:
    """``Trainer.fit`` on the CPU with only what a test asks for: no logger, progress bar, model summary or
    validation unless ``trainer_args`` say otherwise; returns the trainer."""
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
    }
    trainer = L.Trainer(**{**defaults, **trainer_args})
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A temporary folder for a command's outputs, run from the repository root (the demo config's paths are
    relative to it), with pytest's own arguments out of the CLI's way and no debug mode."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["pear_lightning"])
    monkeypatch.delenv("PEAR_DEBUG", raising=False)
    return tmp_path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the command line in this process; return its exit status, stdout and stderr."""
    from pear_lightning.cli.commands import main

    try:
        main(args)
        code = 0
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def in_process(args: list[str]) -> None:
    """Run the command line in this process with pytest's own arguments out of its way (for module fixtures)."""
    from pear_lightning.cli.commands import main

    argv, sys.argv = sys.argv, ["pear_lightning"]
    try:
        main(args)
    finally:
        sys.argv = argv


def assert_refused(args: list[str], capsys, run_dir: Path, expected: str) -> None:
    """The command stops with exit status 2, ``error: <expected>`` as its one error line, no traceback, and
    nothing trained under ``run_dir``."""
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [f"error: {expected}"]
    assert "Traceback" not in err
    assert not list(run_dir.glob("**/*.ckpt")) and not list(run_dir.glob("**/metrics.csv"))


GOOD = [{"id": f"g{i}", "prompt": f"Compute {i}+1.", "completion": f"#### {i + 1}"} for i in range(4)]  # valid rows


def fit_args(run_dir, model, train, *extra):
    """A one-step CPU run with a CSV logger under ``run_dir/runs`` (no demo config, no callbacks)."""
    return [
        "fit",
        "--model.model_name_or_path",
        str(model),
        "--data.train_path",
        str(train),
        "--data.batch_size",
        "2",
        "--data.max_length",
        "64",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_steps",
        "1",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(run_dir / "runs"),
        "--trainer.default_root_dir",
        str(run_dir / "runs"),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *extra,
    ]
