"""What a training step computes for its logs: the strategy's diagnostics on logging steps only."""

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
