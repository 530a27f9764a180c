"""Reliability, second pass: every input checked before the first step, every output writable before the last.

One test (or parametrized case) per kind of mistake, by class; each asserts one `error:` line, exit status 2, and
nothing trained or written. The README's bad-input table lists them.
"""


import pytest
from conftest import GOOD, assert_refused, fit_args, run_cli, write_jsonl

# 1. Behaviour log-prob columns are checked as data, every row, when the data is loaded.


# 2. Files and checkpoints that are not what they claim.


# 3. Settings that parse but would fail at run time, after training started or ended.


def test_a_schedule_without_a_length_lasts_the_run(run_dir, tiny_model_dir, capsys):
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    schedule = ["--lr_scheduler", "pear_lightning.OneCycleLR"]
    code, _, err = run_cli(fit_args(run_dir, tiny_model_dir, path, "--trainer.max_steps", "3", *schedule), capsys)
    assert code == 0, err


# 4. Outputs that cannot be written.


# 5. Chat-template edge cases.


# 6. Command edge cases.


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_an_evaluation_command_without_its_data_is_refused(run_dir, tiny_model_dir, capsys, command):
    split = {"validate": "val", "test": "test", "predict": "predict"}[command]
    args = [command, *fit_args(run_dir, tiny_model_dir, write_jsonl(run_dir / "train.jsonl", GOOD))[1:]]
    expected = (
        f"{command}: data.{split}_path is not set, so there is nothing to {command}; give it a .jsonl, .json or "
        ".parquet file or folder"
    )
    assert_refused(args, capsys, run_dir, expected)


# 9. Strategies the step accounting cannot serve.
