"""A mixture's per-source diagnostics: each source's weight metrics are those of its examples alone (padded or packed),
are logged as ``train/<source>/<metric>`` on the logging steps that train it, and ``inspect_logprobs`` reports each
source on its own."""

import csv

import lightning as L
import pytest
import torch
from conftest import STUDENT, demo_rows, fit_quietly, write_jsonl
from lightning.pytorch.loggers import CSVLogger

from pear_lightning import PearDataModule, PearModule
from pear_lightning.data.collate import collate
from pear_lightning.data.mixture import MixtureSource
from pear_lightning.strategies import TokenBatch, TokenIS
from pear_lightning.training.diagnostics import source_masks, source_metrics
from pear_lightning.training.inspect import inspect_logprobs

SOURCES = [0, 1, 1, 0, 2, 0, 1, 2, 0, 0, 1, 2]  # the source of each of the twelve mixed_rows


def scored(rows, pad_id, pack_length=None):
    """A collated batch and its TokenBatch, log π_θ made up from log π_β (so it does not depend on the layout)."""
    batch = collate(rows, pad_id, pack_length)
    behavior = batch["behavior_logp"]
    logp = torch.where(batch["loss_mask"], 0.8 * behavior - 0.05, torch.zeros_like(behavior))
    return batch, TokenBatch(logp, batch["loss_mask"], behavior, batch.get("segment_ids"))


@pytest.mark.parametrize("pack_length", [None, 256], ids=["padded", "packed"])
def test_a_sources_metrics_are_those_of_its_examples_alone(mixed_rows, tokenizer, pack_length):
    rows = [{**row, "source": s} for row, s in zip(mixed_rows, SOURCES)]
    strategy = TokenIS(gamma=0.95, log_ratio_clip=(-0.2, 0.2))
    batch, tokens = scored(rows, tokenizer.pad_token_id, pack_length)
    masks = source_masks(batch, ["a", "b", "c"])
    assert sorted(masks) == ["a", "b", "c"]
    weights = strategy.weights(tokens)
    for index, name in enumerate(["a", "b", "c"]):
        _, alone = scored([r for r in rows if r["source"] == index], tokenizer.pad_token_id, pack_length)
        expected = strategy.metrics(alone, strategy.weights(alone))
        got = source_metrics(strategy, tokens, weights, masks[name])
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6)
    assert source_masks(collate(mixed_rows, tokenizer.pad_token_id), ["a"]) == {}  # no sources, no masks


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    return [
        MixtureSource("early", str(write_jsonl(root / "early.jsonl", demo_rows(6))), 1),
        MixtureSource("late", str(write_jsonl(root / "late.jsonl", demo_rows(6, "val"))), 1),
    ]


def test_each_source_is_logged_on_the_logging_steps_that_train_it(two_sources, tiny_model_dir, tmp_path):
    """One example per micro-batch: each logging step trains one source; its columns get its values, the other's NaN
    (not the last value it had), and each source's epoch aggregate is written."""
    L.seed_everything(0)
    data = PearDataModule(mixture=two_sources, tokenizer_name_or_path=str(tiny_model_dir), batch_size=1)
    trained = []
    record = L.Callback()
    record.on_train_batch_start = lambda trainer, module, batch, i: trained.append(batch["source"].item())
    logger = CSVLogger(tmp_path, name="run")
    module = PearModule(str(tiny_model_dir), weighting=TokenIS())
    fit_quietly(module, data, max_steps=8, log_every_n_steps=2, logger=logger, callbacks=[record])
    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    steps = {int(r["step"]): r for r in rows if r.get("train/ess_step")}
    assert sorted(steps) == [1, 3, 5, 7]  # steps 2, 4, 6, 8
    for step, row in steps.items():
        source = ["early", "late"][trained[step]]
        other = {"early": "late", "late": "early"}[source]
        for name in ("ess", "log_ratio_mean", "log_weight_clipped"):  # the only source of the batch: the same values
            assert float(row[f"train/{source}/{name}_step"]) == pytest.approx(float(row[f"train/{name}_step"]), 1e-6)
        assert row[f"train/{other}/ess_step"] in ("", "nan")  # empty until the source was first logged
    assert {trained[s] for s in steps} == {0, 1}  # both sources were logged
    assert any(row[f"train/{s}/ess_step"] == "nan" for row in steps.values() for s in ("early", "late"))
    epoch = [r for r in rows if r.get("train/ess_epoch")]
    assert epoch and epoch[-1]["train/early/ess_epoch"] and epoch[-1]["train/late/ess_epoch"]


def test_inspect_logprobs_reports_each_source(two_sources, capsys):
    data = PearDataModule(mixture=two_sources, tokenizer_name_or_path=str(STUDENT), batch_size=4)
    report = inspect_logprobs(PearModule(str(STUDENT), weighting=TokenIS()), data, max_examples=12)
    lines = report.splitlines()
    assert lines[0] == f"12 examples of data.mixture (sources early, late), π_θ = {STUDENT}"
    for name in ("early", "late"):
        at = lines.index(f"source {name}: 6 examples")
        assert lines[at + 2].startswith(f"{name}: log π_β ") and lines[at + 3].startswith(f"{name}: δ ")
        metrics = [line for line in lines[at:] if line.startswith(f"{name}: TokenIS (config): ")]
        assert len(metrics) == 1 and " ess " in metrics[0]
