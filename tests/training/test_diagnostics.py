"""What a training step computes and logs: the loss every step, the rest on logging steps only."""

import warnings
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


def test_the_loss_is_logged_every_step_and_the_rest_on_logging_steps(tiny_model_dir, monkeypatch):
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
    on_logging_steps = ("train/skipped_steps", "train/tokens_per_sec", "train/nll", "train/lr")
    assert logged == {"train/loss": 6, **dict.fromkeys(on_logging_steps, 2)}


@pytest.mark.parametrize(
    "every, steps, warns",
    [
        (1, 20, True),  # every step logs: the window is the last 20 optimizer steps
        (10, 10, False),  # the window is 2 logging steps (20 optimizer steps); only 1 so far
        (20, 20, True),  # the window is the one logging step of 20 optimizer steps
    ],
)
def test_the_saturation_warning_reads_the_logging_steps_of_20_optimizer_steps(tiny_model_dir, every, steps, warns):
    # An untrained model's log-probs sit far below the behaviour's: every clipped suffix sum reaches the lower bound
    # of -0.01, so all loss tokens but each sequence's last are at a clip bound.
    data = PearDataModule(
        train_path=str(DEMO / "data" / "train.jsonl"), tokenizer_name_or_path=str(tiny_model_dir), batch_size=4
    )
    module = PearModule(str(tiny_model_dir), weighting=TokenIS(log_weight_clip=(-0.01, 5.0)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_quietly(module, data, max_steps=steps, log_every_n_steps=every, enable_checkpointing=False)
    saturated = [str(w.message) for w in caught if "weights are saturated" in str(w.message)]
    assert len(saturated) == warns
    if warns:
        seen = "the last 20 optimizer steps" if every == 1 else "1 logging step(s), one every 20 steps"
        assert f"over {seen}" in saturated[0] and "at the lower bound -0.01" in saturated[0]
