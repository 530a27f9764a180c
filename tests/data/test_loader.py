"""The training loader: resumable mid-epoch (a run stopped inside an epoch and resumed from its checkpoint sees the
same batches and ends exactly where an uninterrupted run ends), and a packed loader yields the padded one's examples in
the same order."""

import lightning as L
import pytest
import torch
from conftest import adamw, demo_rows, fit_quietly, mixed_examples, write_jsonl
from lightning.pytorch.callbacks import ModelCheckpoint

from pear_lightning import PearDataModule, PearModule
from pear_lightning.strategies import TokenIS


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("resume") / "train.jsonl", demo_rows(16))


def fit(model_dir, data_path, root, max_steps, ckpt_path=None):
    """Shuffled batches of 4 (4 per epoch), AdamW with a schedule, a checkpoint every 3 steps (mid-epoch)."""
    L.seed_everything(0)
    module = PearModule(
        str(model_dir),
        weighting=TokenIS(gamma=0.9),
        optimizer=adamw(1e-3),
        lr_scheduler={
            "class_path": "torch.optim.lr_scheduler.LinearLR",
            "init_args": {"start_factor": 0.1, "total_iters": 6},
        },
    )
    data = PearDataModule(train_path=str(data_path), tokenizer_name_or_path=str(model_dir), batch_size=4)
    seen = []
    record = L.Callback()
    record.on_train_batch_start = lambda trainer, module, batch, idx: seen.append(batch["ids"])
    every_3_steps = ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1, save_on_train_epoch_end=False)
    fit_quietly(
        module, data, ckpt_path, max_steps=max_steps, default_root_dir=str(root), callbacks=[every_3_steps, record]
    )
    return {k: v.clone() for k, v in module.model.state_dict().items()}, seen


def test_resuming_mid_epoch_restores_model_optimizer_schedule_and_data_position(tmp_path, tiny_model_dir, data_path):
    straight, straight_batches = fit(tiny_model_dir, data_path, tmp_path / "straight", max_steps=7)
    _, first_batches = fit(tiny_model_dir, data_path, tmp_path / "stopped", max_steps=3)  # stopped inside epoch 0
    checkpoint = tmp_path / "stopped" / "epoch=0-step=3.ckpt"
    resumed, resumed_batches = fit(
        tiny_model_dir, data_path, tmp_path / "stopped", max_steps=7, ckpt_path=str(checkpoint)
    )
    assert first_batches + resumed_batches == straight_batches  # the same examples, in the same order
    assert straight_batches[:4] != straight_batches[4:]  # epochs really are shuffled differently
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)  # bitwise on CPU fp32


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory, tokenizer):
    """Sixteen examples of mixed length with behaviour log-probs, in a JSONL file."""
    return write_jsonl(tmp_path_factory.mktemp("mixed") / "train.jsonl", mixed_examples(tokenizer, 16, seed=1))


def test_the_packed_loader_yields_the_padded_loader_s_examples_in_the_same_order(tiny_model_dir, mixed_data):
    batches = {}
    for packing in (False, True):
        data = PearDataModule(
            train_path=str(mixed_data),
            tokenizer_name_or_path=str(tiny_model_dir),
            batch_size=4,
            max_length=256,
            packing=packing,
        )
        data.setup("fit")
        batches[packing] = [batch for batch in data.train_dataloader()]
    assert [b["ids"] for b in batches[True]] == [b["ids"] for b in batches[False]]
    assert sum(b["input_ids"].numel() for b in batches[True]) < sum(b["input_ids"].numel() for b in batches[False])
