"""What a training step computes and logs: the loss every step, the rest on logging steps only."""

from collections import Counter

import pytest
from conftest import DEMO, fit_quietly

from pear_lightning import PearDataModule, PearModule
from pear_lightning.strategies import TokenIS


class CountingTokenIS(TokenIS):
    """TokenIS that counts how often its diagnostics are computed."""

    calls = 0

    def metrics(self, batch, weights):
        CountingTokenIS.calls += 1
        return super().metrics(batch, weights)


@pytest.mark.parametrize(
    "every, accumulate, steps, expected",
    [
        (1, 1, 6, 6),  # every step logs
        (3, 1, 6, 2),  # steps 3 and 6
        (2, 2, 3, 2),  # step 2: both of its micro-batches
        (10, 1, 6, 0),  # no step logs
    ],
)
def test_diagnostics_are_computed_on_logging_steps_only(tiny_model_dir, every, accumulate, steps, expected):
    CountingTokenIS.calls = 0
    data = PearDataModule(
        train_path=str(DEMO / "data" / "train.jsonl"), tokenizer_name_or_path=str(tiny_model_dir), batch_size=4
    )
    module = PearModule(str(tiny_model_dir), weighting=CountingTokenIS())
    fit_quietly(
        module,
        data,
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=every,
        enable_checkpointing=False,
    )
    assert CountingTokenIS.calls == expected


def test_throughput_and_skipped_steps_are_logged_on_logging_steps_and_the_loss_every_step(tiny_model_dir, monkeypatch):
    data = PearDataModule(
        train_path=str(DEMO / "data" / "train.jsonl"), tokenizer_name_or_path=str(tiny_model_dir), batch_size=4
    )
    module = PearModule(str(tiny_model_dir))
    logged = Counter()
    log = module.log

    def counting_log(name, value, *args, **kwargs):
        logged[name] += 1
        assert not isinstance(value, float)  # a float would be copied to the device, waiting for it
        return log(name, value, *args, **kwargs)

    monkeypatch.setattr(module, "log", counting_log)
    fit_quietly(module, data, max_steps=6, log_every_n_steps=3, enable_checkpointing=False)
    assert logged == {"train/loss": 6, "train/skipped_steps": 2, "train/tokens_per_sec": 2}
