"""The non-finite guard: a NaN or inf in the loss or the gradient never reaches the weights, the optimizer or the
schedule; the step is skipped with a warning naming its examples, counted, and too many stop the run."""

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
from conftest import REPO, adamw, demo_rows, fit_quietly, write_jsonl

from pear_lightning import PearDataModule, PearModule
from pear_lightning.errors import PearError
from pear_lightning.strategies import TokenBatch

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


def test_a_negative_limit_is_refused(tiny_model_dir):
    with pytest.raises(PearError, match=re.escape("model.max_nonfinite_steps must be >= 0, got -1")):
        PearModule(str(tiny_model_dir), max_nonfinite_steps=-1)
