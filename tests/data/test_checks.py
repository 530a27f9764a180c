"""The checks of the data's own columns, before anything is joined or trained: ids that name one example each,
response ``token_ids`` of this tokenizer, and ``token_ids`` / ``logprobs`` of the right types."""

import pytest
from conftest import STUDENT, assert_refused, demo_rows, fit_args, write_jsonl
from transformers import AutoTokenizer

from pear_lightning import PearDataModule
from pear_lightning.errors import PearError

DUPLICATE_IDS = (
    "1 ids name more than one example (first: val-00000); behaviour log-probs are matched to examples by id, so "
    "give every example its own `id` (an example without one is named by a hash of its content: remove exact repeats)"
)


def test_duplicate_ids_with_behaviour_logprobs_are_refused(run_dir, tiny_model_dir, capsys):
    rows = demo_rows(4, "val")
    rows[3]["id"] = rows[0]["id"]
    path = write_jsonl(run_dir / "train.jsonl", rows)
    args = fit_args(run_dir, tiny_model_dir, path, "--model.weighting", "TokenIS")
    assert_refused(args, capsys, run_dir, f"{path}: {DUPLICATE_IDS}")


def test_token_ids_outside_the_vocabulary_are_named(tmp_path):
    size = len(AutoTokenizer.from_pretrained(STUDENT))
    rows = demo_rows(3, "val")
    rows[2]["token_ids"][4] = size
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(PearError) as err:
        PearDataModule(train_path=str(path), tokenizer_name_or_path=str(STUDENT)).tokenized("train")
    assert str(err.value) == (
        f"{path} row 3 (id {rows[2]['id']}): `token_ids` holds {size}, not a token id of this tokenizer (its ids run "
        f"from 0 to {size - 1}); the response ids must come from the tokenizer of data.tokenizer_name_or_path"
    )


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            {"logprobs": -0.5},
            "row 2 (id val-00001): `logprobs` must be a list of numbers, one per response token; found -0.5",
        ),
        (
            {"token_ids": [1.5, 2]},
            "row 2 (id val-00001): `token_ids` must be a list of integers, one per response token; found [1.5, 2.0]",
        ),
    ],
    ids=["logprobs-is-a-number", "token-ids-are-fractions"],
)
def test_a_behaviour_column_of_the_wrong_type_is_named_with_its_row(run_dir, tiny_model_dir, capsys, change, problem):
    rows = demo_rows(4, "val")
    rows[1].update(change)
    path = write_jsonl(run_dir / "train.jsonl", rows)
    args = fit_args(run_dir, tiny_model_dir, path, "--model.weighting", "TokenIS")
    assert_refused(args, capsys, run_dir, f"{path} {problem}")
