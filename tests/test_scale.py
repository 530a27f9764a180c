"""Step-global loss normalisation: gradient accumulation and the number of devices do not change the update."""

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
import yaml
from conftest import DEMO, REPO, fit_quietly, write_jsonl

from pear_lightning import PearDataModule, PearModule
from pear_lightning.strategies import TokenIS, UniformSFT


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory):
    """The four shortest then the four longest demo responses (with behaviour log-probs): micro-batches of
    two differ about threefold in token count."""
    rows = sorted(map(json.loads, open(DEMO / "data" / "train.jsonl")), key=lambda r: len(r["token_ids"]))
    chosen = rows[:4] + rows[-4:]
    assert len(chosen[-1]["token_ids"]) > 2 * len(chosen[0]["token_ids"])
    return write_jsonl(tmp_path_factory.mktemp("uneven") / "train.jsonl", chosen)


@pytest.fixture(scope="module")
def alternating_data(uneven_data):
    """The same examples alternating short and long: a distributed sampler gives rank 0 the short ones."""
    rows = [json.loads(line) for line in open(uneven_data)]
    return write_jsonl(
        uneven_data.with_name("alternating.jsonl"), [r for pair in zip(rows[:4], rows[4:]) for r in pair]
    )


def one_step(model_dir, data_path, weighting, normaliser, batch_size, accumulate):
    """Parameters after one SGD step (lr 1, so the update is the gradient) with the given batching."""
    L.seed_everything(0)
    data = PearDataModule(
        train_path=str(data_path), tokenizer_name_or_path=str(model_dir), batch_size=batch_size, shuffle=False
    )
    module = PearModule(
        str(model_dir),
        weighting=weighting,
        loss_normalizer=normaliser,
        optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0}},
    )
    fit_quietly(module, data, max_steps=1, accumulate_grad_batches=accumulate, enable_checkpointing=False)
    return torch.cat([p.detach().flatten() for p in module.model.parameters()])


@pytest.mark.parametrize("normaliser", ["tokens", "weights"])
@pytest.mark.parametrize("weighting", [UniformSFT(), TokenIS(gamma=0.9)], ids=repr)
def test_gradient_accumulation_does_not_change_the_update(tiny_model_dir, uneven_data, weighting, normaliser):
    whole = one_step(tiny_model_dir, uneven_data, weighting, normaliser, batch_size=8, accumulate=1)
    accumulated = one_step(tiny_model_dir, uneven_data, weighting, normaliser, batch_size=2, accumulate=4)
    module = PearModule(str(tiny_model_dir))
    module.configure_model()
    start = torch.cat([p.detach().flatten() for p in module.model.parameters()])
    update_whole, update_accumulated = whole - start, accumulated - start
    assert update_whole.norm() > 0
    assert ((update_whole - update_accumulated).norm() / update_whole.norm()).item() < 1e-5
    # Lightning's own division by accumulate_grad_batches alone would be off by the uneven token counts:
    per_batch_mean = one_step_naive(tiny_model_dir, uneven_data, weighting, normaliser)
    assert ((update_whole - (per_batch_mean - start)).norm() / update_whole.norm()).item() > 1e-3


def one_step_naive(model_dir, data_path, weighting, normaliser):
    """The update Lightning gives by default: the mean over micro-batches of each micro-batch's own mean."""
    module = PearModule(str(model_dir), weighting=weighting, loss_normalizer=normaliser)
    module.configure_model()
    data = PearDataModule(train_path=str(data_path), tokenizer_name_or_path=str(model_dir), batch_size=2, shuffle=False)
    data.setup("fit")
    for batch in data.train_dataloader():
        loss = module.loss_terms(batch).mean
        (loss / 4).backward()
    with torch.no_grad():
        return torch.cat([(p - p.grad).flatten() for p in module.model.parameters()])


def cli_config(tmp_path, model_dir, data_path, devices, batch_size, name, normaliser):
    """A run config for one SGD step, written to a file."""
    config = {
        "seed_everything": 0,
        "model": {
            "model_name_or_path": str(model_dir),
            "weighting": {"class_path": "TokenIS", "init_args": {"gamma": 0.9}},
            "loss_normalizer": normaliser,
        },
        "data": {"train_path": str(data_path), "batch_size": batch_size, "shuffle": False},
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0}},
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "strategy": "ddp" if devices > 1 else "auto",
            "max_steps": 1,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / name),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path), "name": name},
            },
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def final_parameters(tmp_path, name):
    (checkpoint,) = (tmp_path / name / "version_0" / "checkpoints").glob("*.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return torch.cat([v.flatten() for k, v in sorted(state.items()) if k.startswith("model.")])


@pytest.mark.parametrize("normaliser", ["tokens", "weights"])
def test_two_data_parallel_ranks_give_the_update_of_one(tmp_path, tiny_model_dir, alternating_data, normaliser):
    runs = {"one": (1, 8), "two": (2, 4)}
    for name, (devices, batch_size) in runs.items():
        config = cli_config(tmp_path, tiny_model_dir, alternating_data, devices, batch_size, name, normaliser)
        result = subprocess.run(
            [sys.executable, "-m", "pear_lightning", "fit", "--config", str(config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    module = PearModule(str(tiny_model_dir))
    module.configure_model()
    start = torch.cat([v.flatten() for k, v in sorted(module.state_dict().items()) if k.startswith("model.")])
    one, two = final_parameters(tmp_path, "one") - start, final_parameters(tmp_path, "two") - start
    assert one.norm() > 0
    assert ((one - two).norm() / one.norm()).item() < 1e-5


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
