"""PearDataModule: chat and prompt/completion rows side by side, truncation to max_length counted and reported, and
its own settings checked before anything loads."""

import pytest
from conftest import GOOD, assert_refused, fit_args, write_jsonl
from conftest import MIXED_FORMS as ROWS
from conftest import tokenized_train as tokenized

from pear_lightning.errors import PearError


def test_mixed_chat_and_prompt_completion_rows_load(tmp_path):
    data = tokenized(write_jsonl(tmp_path / "train.jsonl", ROWS))
    assert data["id"] == ["a", "b", "c"] and all(any(m) for m in data["loss_mask"])


def test_truncated_examples_are_counted_and_empty_ones_skipped(tmp_path, caplog):
    long_prompt = {"id": "long", "prompt": "Compute " + "1+" * 40 + "1.", "completion": "#### 41"}
    path = write_jsonl(tmp_path / "train.jsonl", ROWS + [long_prompt])
    with caplog.at_level("INFO"):
        data = tokenized(path, max_length=30)
    assert data["id"] == ["a", "b", "c"]
    assert (
        "train ("
        + str(path)
        + "): 1 of 4 examples truncated to max_length=30; 1 skipped because no response token was left"
        in caplog.text
    )


def test_every_example_empty_after_truncation_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(PearError) as err:
        tokenized(path, max_length=5)
    assert str(err.value) == (
        f"{path}: none of its 3 examples has a response token within max_length=5; "
        "raise data.max_length or shorten the prompts"
    )


def test_a_data_setting_out_of_range_is_one_error(run_dir, tiny_model_dir, capsys):
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    args = fit_args(run_dir, tiny_model_dir, path, "--data.batch_size", "0")
    assert_refused(args, capsys, run_dir, "data: batch_size must be >= 1 and max_length >= 2, got 0 and 64")
