"""The optimizer step: its loss is normalised over the whole step, so gradient accumulation, packing and the number
of data-parallel ranks do not change the update; a NaN or inf in the loss or the gradient never reaches the weights,
the optimizer or the schedule (the step is skipped with a warning naming its examples, counted, and too many stop the
run); and a training strategy whose gradients are not the parameters' ``.grad`` is refused."""

import copy
import math
import os
import re
import subprocess
import sys
import warnings

import lightning as L
import pytest
import torch
import yaml
from conftest import REPO, adamw, demo_rows, fit_quietly, mixed_examples, write_jsonl
from lightning.pytorch.strategies import DeepSpeedStrategy, Strategy

from pear_lightning import PearDataModule, PearModule
from pear_lightning.errors import PearError
from pear_lightning.strategies import TokenBatch, TokenIS, UniformSFT
from pear_lightning.training.step import check_strategy

BATCH, ACCUMULATE = 2, 2  # two micro-batches of two examples per optimizer step


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    """Twelve demo chats (no behaviour log-probs): three optimizer steps in file order."""
    rows = [{"id": r["id"], "messages": r["messages"]} for r in demo_rows(12)]
    return write_jsonl(tmp_path_factory.mktemp("guard") / "train.jsonl", rows)


def poison(module: PearModule, bad_ids: set[str], where: str) -> None:
    """Make micro-batches holding one of ``bad_ids`` non-finite: their log-probs (so their loss) are NaN, or, with
    ``where="gradient"``, their loss is finite but the gradient flowing back through the log-probs is NaN."""
    score = module.token_batch

    def poisoned(batch: dict) -> TokenBatch:
        tokens = score(batch)
        if not bad_ids & set(batch["ids"]):
            return tokens
        if where == "loss":
            return TokenBatch(logp=tokens.logp + math.nan, mask=tokens.mask, behavior_logp=tokens.behavior_logp)
        tokens.logp.register_hook(lambda grad: torch.full_like(grad, math.nan))
        return tokens

    module.token_batch = poisoned


def snapshot(trainer: L.Trainer, module: PearModule) -> dict:
    """Weights, optimizer state and schedule, copied."""
    optimizer = trainer.optimizers[0]
    return {
        "params": {k: v.detach().clone() for k, v in module.model.named_parameters()},
        "optimizer": copy.deepcopy(optimizer.state_dict()["state"]),
        "lr": optimizer.param_groups[0]["lr"],
        "schedule": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
    }


def fit(model_dir, data_path, bad_ids, where="loss", max_nonfinite_steps=3):
    """Three AdamW steps (weight decay, a linear warm-up) of two micro-batches each; the state after every step."""
    L.seed_everything(0)
    module = PearModule(
        str(model_dir),
        max_nonfinite_steps=max_nonfinite_steps,
        optimizer=adamw(1e-3, weight_decay=0.1),
        lr_scheduler={
            "class_path": "torch.optim.lr_scheduler.LinearLR",
            "init_args": {"start_factor": 0.1, "total_iters": 6},
        },
    )
    poison(module, bad_ids, where)
    data = PearDataModule(
        train_path=str(data_path), tokenizer_name_or_path=str(model_dir), batch_size=BATCH, shuffle=False
    )
    states = []
    record = L.Callback()
    record.on_train_batch_end = lambda trainer, module, out, batch, idx: (
        states.append(snapshot(trainer, module)) if (idx + 1) % ACCUMULATE == 0 else None
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit_quietly(
            module,
            data,
            max_steps=3,
            accumulate_grad_batches=ACCUMULATE,
            enable_checkpointing=False,
            callbacks=[record],
        )
    skipped = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    return states, skipped, trainer


def assert_same(a: dict, b: dict) -> None:
    torch.testing.assert_close(a["params"], b["params"], rtol=0, atol=0)
    torch.testing.assert_close(a["optimizer"], b["optimizer"], rtol=0, atol=0)
    assert (a["lr"], a["schedule"]) == (b["lr"], b["schedule"])


# The second step is made of micro-batches (train-00004, train-00005) and (train-00006, train-00007).
@pytest.mark.parametrize(
    ("where", "bad_id", "reported"),
    [
        ("loss", "train-00006", ["train-00006", "train-00007"]),  # the NaN micro-batch only
        ("gradient", "train-00004", ["train-00004", "train-00005", "train-00006", "train-00007"]),  # the whole step
    ],
)
def test_a_nonfinite_step_changes_neither_weights_nor_optimizer_nor_schedule(
    tiny_model_dir, data_path, where, bad_id, reported
):
    (first, second, third), skipped, trainer = fit(tiny_model_dir, data_path, {bad_id}, where)
    assert_same(second, first)  # bitwise: the skipped step left no trace
    # ... while the steps around it really do train (AdamW with weight decay moves every weight):
    assert all(not torch.equal(third["params"][k], v) for k, v in second["params"].items())
    assert all(third["optimizer"][k]["step"] == v["step"] + 1 for k, v in second["optimizer"].items())
    assert third["lr"] > second["lr"] and third["schedule"] == second["schedule"] + 1
    assert skipped == [
        f"non-finite loss or gradient at global step 1: optimizer step skipped (1 of at most 3); examples: {reported}"
    ]
    assert trainer.global_step == 3  # a skipped step still counts: its data was consumed
    assert trainer.callback_metrics["train/skipped_steps"].item() == 1


@pytest.mark.parametrize("limit", [0, 1])
def test_the_run_stops_after_max_nonfinite_steps(tiny_model_dir, data_path, limit):
    every = {f"train-{i:05d}" for i in range(12)}
    with pytest.raises(PearError) as error:
        fit(tiny_model_dir, data_path, every, "loss", max_nonfinite_steps=limit)
    ids = [f"train-{i:05d}" for i in range(4 * limit, 4 * limit + 4)]
    assert str(error.value) == (
        f"training stopped at global step {limit}: {limit + 1} optimizer steps had a non-finite loss or gradient, "
        f"more than model.max_nonfinite_steps={limit}; the last one's examples: {ids}. Check these examples (and "
        "their behaviour log-probs), lower the learning rate, or raise model.max_nonfinite_steps"
    )


SENTINEL = -7.25  # a behaviour log-prob that marks the poisoned example

POISON = f"""
import torch
from pear_lightning.strategies import UniformSFT


class InfiniteOnSentinel(UniformSFT):
    \"\"\"UniformSFT, plus an infinite constant (no gradient) on the losses of a batch marked by the sentinel.\"\"\"

    def token_losses(self, batch):
        losses = super().token_losses(batch)
        if (batch.behavior_logp == {SENTINEL}).any():
            losses = losses + torch.where(batch.mask, torch.inf, 0.0)
        return losses
"""


def test_every_data_parallel_rank_skips_when_one_rank_is_nonfinite(tmp_path, tiny_model_dir):
    """Two ranks, one example each; rank 1's loss is infinite but no gradient is (the infinity is a constant),
    so only the all-reduced decision makes rank 0 skip too: a rank stepping alone would fork the replicas."""
    (tmp_path / "poison.py").write_text(POISON)
    rows = demo_rows(2)
    rows[1]["logprobs"][0] = SENTINEL  # rank 1 gets the second example
    config = {
        "model": {
            "model_name_or_path": str(tiny_model_dir),
            "weighting": "poison.InfiniteOnSentinel",
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3, "weight_decay": 0.1}},
        },
        "data": {"train_path": str(write_jsonl(tmp_path / "train.jsonl", rows)), "batch_size": 1, "shuffle": False},
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "strategy": "ddp",
            "max_steps": 1,
            "limit_val_batches": 0,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
        },
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "pear_lightning", "fit", "--config", str(tmp_path / "run.yaml")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank, ids in [(0, []), (1, [rows[1]["id"]])]:  # rank 0 names none of its examples: they are fine
        assert (
            f"non-finite loss or gradient at global step 0, rank {rank}: optimizer step skipped (1 of at most 3); "
            f"examples: {ids}"
        ) in result.stderr
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    start = PearModule(str(tiny_model_dir))
    start.configure_model()
    torch.testing.assert_close(saved, start.state_dict(), rtol=0, atol=0)  # rank 0 did not step either


def test_the_skipped_step_count_survives_a_checkpoint(tiny_model_dir):
    saved = PearModule(str(tiny_model_dir))
    saved.configure_model()
    saved.books.skipped_steps = 2
    checkpoint = {"state_dict": saved.state_dict()}
    saved.on_save_checkpoint(checkpoint)
    resumed = PearModule(str(tiny_model_dir))
    resumed.configure_model()
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.books.skipped_steps == 2


def test_a_negative_max_nonfinite_steps_is_refused(tiny_model_dir):
    with pytest.raises(PearError, match=re.escape("model.max_nonfinite_steps must be >= 0, got -1")):
        PearModule(str(tiny_model_dir), max_nonfinite_steps=-1)


# Step-global loss normalisation.


def one_sgd_step(model_dir, data_path, weighting, normaliser, batch_size, accumulate, max_length=1024, packing=False):
    """Parameters after one SGD step (lr 1, so the update is the gradient) with the given batching."""
    L.seed_everything(0)
    data = PearDataModule(
        train_path=str(data_path),
        tokenizer_name_or_path=str(model_dir),
        batch_size=batch_size,
        max_length=max_length,
        packing=packing,
        shuffle=False,
    )
    module = PearModule(
        str(model_dir),
        weighting=weighting,
        loss_normalizer=normaliser,
        optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0}},
    )
    fit_quietly(module, data, max_steps=1, accumulate_grad_batches=accumulate, enable_checkpointing=False)
    return torch.cat([p.detach().flatten() for p in module.model.parameters()])


def initial_parameters(model_dir):
    module = PearModule(str(model_dir))
    module.configure_model()
    return torch.cat([p.detach().flatten() for p in module.model.parameters()])


@pytest.mark.parametrize("normaliser", ["tokens", "weights"])
@pytest.mark.parametrize("weighting", [UniformSFT(), TokenIS(gamma=0.9)], ids=repr)
def test_gradient_accumulation_does_not_change_the_update(tiny_model_dir, uneven_data, weighting, normaliser):
    whole = one_sgd_step(tiny_model_dir, uneven_data, weighting, normaliser, batch_size=8, accumulate=1)
    accumulated = one_sgd_step(tiny_model_dir, uneven_data, weighting, normaliser, batch_size=2, accumulate=4)
    start = initial_parameters(tiny_model_dir)
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


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory, tokenizer):
    """Sixteen examples of mixed length with behaviour log-probs, in a JSONL file."""
    return write_jsonl(tmp_path_factory.mktemp("mixed") / "train.jsonl", mixed_examples(tokenizer, 16, seed=1))


def test_a_packed_training_step_updates_the_model_as_a_padded_one(tiny_model_dir, mixed_data):
    before = initial_parameters(tiny_model_dir)
    args = (tiny_model_dir, mixed_data, TokenIS(gamma=0.9), "tokens")
    padded = one_sgd_step(*args, batch_size=16, accumulate=1, max_length=256) - before
    for accumulate in (1, 4):  # the step-global normaliser sums packed micro-batches as it sums padded ones
        step = one_sgd_step(*args, batch_size=16 // accumulate, accumulate=accumulate, max_length=256, packing=True)
        packed = step - before
        assert padded.norm() > 0
        assert ((packed - padded).norm() / padded.norm()).item() < 1e-5


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


# Strategies the step accounting cannot serve.


class OwnStrategy(Strategy):
    """A strategy of the user's own, of no kind the step accounting knows."""


OwnStrategy.__abstractmethods__ = frozenset()  # its methods are never called here


@pytest.mark.parametrize("cls", [DeepSpeedStrategy, OwnStrategy], ids=["deepspeed", "unknown-strategy"])
def test_a_strategy_whose_gradients_are_not_param_grad_is_refused(cls):
    strategy = cls.__new__(cls)  # DeepSpeed need not be installed to be refused
    with pytest.raises(PearError) as err:
        check_strategy(strategy)
    assert str(err.value) == (
        f"trainer.strategy: {cls.__name__} cannot be used: the loss of an optimizer step is normalised by rescaling "
        "the parameters' .grad before the update, and this strategy keeps its gradients elsewhere (the rescale would "
        "silently do nothing); use auto (one device), ddp, fsdp or ModelParallelStrategy (FSDP2)"
    )
