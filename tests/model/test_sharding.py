"""Sharded (FSDP2) training and checkpoints on 2 CPU ranks: FSDP2 with LoRA trains; an interrupted sharded save never
replaces the last complete one, resume continues from it, and export gathers it into one Hugging Face folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TESTS, demo_rows, write_jsonl
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoModelForCausalLM

from pear_lightning.model.checkpoint_io import use_atomic_checkpoints


def run(args: list[str], fault: str = "") -> subprocess.CompletedProcess:
    """``python -m pear_lightning <args>`` in a subprocess, armed with ``fault`` (see tests/faultpoints.py)."""
    env = {
        **os.environ,
        "PEAR_FAULT": fault,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),  # faultpoints
    }
    return subprocess.run(
        [sys.executable, "-m", "pear_lightning", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, tiny_model_dir):
    """A 2-rank FSDP2 config writing a sharded ``last.ckpt`` after every step."""
    root = tmp_path_factory.mktemp("sharded")
    config = {
        "seed_everything": 0,
        "model": {"model_name_or_path": str(tiny_model_dir)},
        "data": {"train_path": str(write_jsonl(root / "train.jsonl", demo_rows(8))), "batch_size": 2, "shuffle": False},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "max_steps": 2,
            "limit_val_batches": 0,
            "strategy": {
                "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
            },
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "default_root_dir": str(root),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(root / "ckpt"),
                        "save_top_k": 0,
                        "save_last": True,
                        "every_n_train_steps": 1,
                    },
                },
                {"class_path": "faultpoints.KillSwitch"},
            ],
        },
    }
    path = root / "fsdp2.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path


def meta(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "meta.pt", weights_only=True)


def test_an_interrupted_sharded_save_keeps_the_last_checkpoint_and_resume_finishes(sharded_run):
    root, config = sharded_run
    killed = run(["fit", "--config", str(config)], fault="shards:2")  # both ranks die writing step 2's shards
    assert killed.returncode != 0
    last = root / "ckpt" / "last.ckpt"
    assert last.is_dir() and meta(last)["global_step"] == 1  # step 1's checkpoint, complete and in place
    assert (root / "ckpt" / ".last.ckpt.partial").is_dir()  # the torn save, never swapped in
    resumed = run(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert meta(last)["global_step"] == 2
    assert not (root / "ckpt" / ".last.ckpt.partial").exists()


def test_export_gathers_a_sharded_checkpoint(sharded_run, tiny_model_dir, tmp_path):
    root, config = sharded_run
    last = root / "ckpt" / "last.ckpt"
    if not last.exists():  # this test alone: make the checkpoint
        assert run(["fit", "--config", str(config)]).returncode == 0
    output = tmp_path / "exported"
    exported = run(["export", "--config", str(config), "--checkpoint", str(last), "--output", str(output)])
    assert exported.returncode == 0, exported.stderr[-3000:]
    dcp_to_torch_save(last, tmp_path / "reference.pt")  # torch's own conversion, as the reference
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)["state_dict"]
    model = AutoModelForCausalLM.from_pretrained(output)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[f"model.{name}"], rtol=0, atol=0)
    assert any(not torch.equal(v, initial.state_dict()[k]) for k, v in model.state_dict().items())  # it trained


def test_fsdp_sharded_saves_are_staged_too():
    strategy = FSDPStrategy(state_dict_type="sharded")
    trainer = type("Trainer", (), {"strategy": strategy})()
    save = strategy.save_checkpoint
    use_atomic_checkpoints(trainer)
    assert strategy.save_checkpoint is not save and strategy.save_checkpoint.__name__ == "save_staged"


def test_fsdp2_with_lora_trains_on_two_cpu_ranks(tmp_path, tiny_model_dir, alternating_data):
    config = {
        "model": {
            "model_name_or_path": str(tiny_model_dir),
            "weighting": "TokenIS",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        },
        "data": {"train_path": str(alternating_data), "batch_size": 2},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "max_steps": 2,
            "limit_val_batches": 0,
            "log_every_n_steps": 1,
            "strategy": {
                "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
            },
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path), "name": "fsdp2"},
            },
        },
    }
    path = tmp_path / "fsdp2.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "pear_lightning", "fit", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The model really is sharded: FSDP2 wraps its class, which the parameter summary names.
    assert "model: FSDPPeftModelForCausalLM (LlamaForCausalLM)" in result.stderr
    lines = (tmp_path / "fsdp2" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    losses = [
        float(row.split(",")[header.index("train/loss")])
        for row in lines[1:]
        if row.split(",")[header.index("train/loss")]
    ]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)
