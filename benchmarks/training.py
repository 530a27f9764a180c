"""The pear_lightning arm the throughput benchmarks share: the examples as files and as the trainer's tokens, and a
timed ``Trainer.fit`` of PearModule on them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from pear_lightning import PearDataModule, PearModule
from pear_lightning.strategies import WeightingStrategy

from .common import write_jsonl

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "pear_lightning" / "demo" / "assets" / "student"
LR = 1e-4


@dataclass
class TrainingData:
    """The same examples as text for PearDataModule (with and without behaviour log-prob columns) and as
    the trainer's tokens for the other arms."""

    plain_path: Path
    behavior_path: Path
    input_ids: list[list[int]]
    loss_masks: list[list[bool]]

    def timed_tokens(self, batch_size: int, warmup: int, steps: int | None = None) -> int:
        """Non-padding tokens of the steps after ``warmup`` (examples in order), of ``steps`` in all."""
        end = None if steps is None else steps * batch_size
        return sum(len(ids) for ids in self.input_ids[warmup * batch_size : end])


def training_data(root: Path, model_dir: Path, rows: list[dict], max_length: int) -> TrainingData:
    """Write ``rows`` as JSONL, tokenise them as the trainer does, and add behaviour log-prob columns (any
    values, aligned with the trainer's response tokens, as TokenIS needs) to a second file."""
    plain_path = write_jsonl(root / "plain.jsonl", rows)
    data = PearDataModule(train_path=str(plain_path), tokenizer_name_or_path=str(model_dir), max_length=max_length)
    tokenized = data.tokenized("train")
    input_ids, loss_masks = tokenized["input_ids"], tokenized["loss_mask"]
    generator = torch.Generator().manual_seed(0)
    for row, ids, mask in zip(rows, input_ids, loss_masks):
        row["token_ids"] = [t for t, m in zip(ids, mask) if m]
        row["logprobs"] = (-torch.rand(len(row["token_ids"]), generator=generator)).tolist()
    return TrainingData(plain_path, write_jsonl(root / "with_logprobs.jsonl", rows), input_ids, loss_masks)


class StepTimes(L.Callback):
    """Wall-clock time at the end of every training batch (after its optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def fit_pear(
    model_dir: Path,
    data: TrainingData,
    weighting: WeightingStrategy,
    batch_size: int,
    max_length: int,
    max_steps: int,
    device: str,
    precision: str = "32-true",
    packing: bool = False,
    num_workers: int = 0,
    **module_args,
) -> list[float]:
    """``Trainer.fit`` of PearModule with ``weighting`` on ``data`` in order, with ``num_workers`` data-loader
    processes; the end time of every step."""
    path = data.behavior_path if weighting.requires_behavior_logp else data.plain_path
    datamodule = PearDataModule(
        train_path=str(path),
        tokenizer_name_or_path=str(model_dir),
        batch_size=batch_size,
        max_length=max_length,
        packing=packing,
        shuffle=False,
        num_workers=num_workers,
    )
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": LR, "weight_decay": 0.0}}
    module = PearModule(str(model_dir), weighting=weighting, optimizer=optimizer, **module_args)
    timer = StepTimes()
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        precision=precision,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=datamodule)
    return timer.times


def train_loop(
    model: nn.Module, data: TrainingData, batch_size: int, device: str, steps: int | None = None, autocast: bool = False
) -> list[float]:
    """The hand-written loop: padded batches of ``data`` in order, the model's full logits (under bf16 ``autocast`` if
    asked), ``F.cross_entropy`` over the response tokens, AdamW(lr=LR) over the trainable parameters, for ``steps``
    steps (all the data if None); the end time of every step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    pad, times = model.config.pad_token_id, []
    examples = list(zip(data.input_ids, data.loss_masks))[: None if steps is None else steps * batch_size]
    for start in range(0, len(examples), batch_size):
        rows = examples[start : start + batch_size]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows], device=device)
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows], device=device)
        labels = [[t if m else -100 for t, m in zip(ids, mask)] + [-100] * (width - len(ids)) for ids, mask in rows]
        labels = torch.tensor(labels, device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    return times
