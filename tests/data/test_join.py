"""PearDataModule: loading from every supported source, truncation accounting, the behaviour log-prob join."""

import json

import pytest
from conftest import DEMO, STUDENT, conversation, demo_rows, write_jsonl
from datasets import Dataset
from transformers import AutoTokenizer

from pear_lightning import PearDataModule
from pear_lightning.errors import PearError

ROWS = [
    {"id": "a", "messages": conversation("Compute 1+2.", "1+2=3. #### 3")},
    {"id": "b", "prompt": "Compute 2+2.", "completion": "2+2=4. #### 4"},
    {"id": "c", "messages": conversation("Compute 5-1.", "5-1=4. #### 4")},
]


def tokenized(path, **kwargs):
    data = PearDataModule(train_path=str(path), tokenizer_name_or_path=str(STUDENT), **kwargs)
    return data.tokenized("train")


def test_jsonl_parquet_saved_dataset_and_folder_load_the_same_examples(tmp_path):
    # Parquet and saved datasets need one schema; JSONL may mix chat and prompt/completion rows.
    rows = [{"id": r["id"], "prompt": "Compute 1+2.", "completion": f"#### {i}"} for i, r in enumerate(ROWS)]
    jsonl = write_jsonl(tmp_path / "train.jsonl", rows)
    Dataset.from_list(rows).to_parquet(tmp_path / "train.parquet")
    Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "part-0.jsonl", rows)
    expected = tokenized(jsonl).to_list()
    assert [r["id"] for r in expected] == ["a", "b", "c"]
    for path in ("train.parquet", "saved", "folder"):
        assert tokenized(tmp_path / path).to_list() == expected, path


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


def test_unsupported_file_type_is_named(tmp_path):
    (tmp_path / "train.csv").write_text("a,b\n")
    with pytest.raises(PearError, match=r"train.csv: unsupported file type '.csv'; use .jsonl, .json or .parquet$"):
        tokenized(tmp_path / "train.csv")


def joined(path, **kwargs):
    """Set up a data module on ``path`` and collate all of it into one batch."""
    data = PearDataModule(train_path=str(path), tokenizer_name_or_path=str(STUDENT), batch_size=10_000, **kwargs)
    data.setup("fit")
    return data, next(iter(data.train_dataloader()))


def test_the_demo_data_joins_its_behaviour_logprobs_token_exactly():
    _, batch = joined(DEMO / "data" / "val.jsonl")
    rows = {r["id"]: r for r in map(json.loads, open(DEMO / "data" / "val.jsonl"))}
    assert sorted(batch["ids"]) == sorted(rows)
    for i, ex_id in enumerate(batch["ids"]):
        mask = batch["loss_mask"][i]
        assert batch["input_ids"][i][mask].tolist() == rows[ex_id]["token_ids"]
        assert batch["behavior_logp"][i][mask].tolist() == pytest.approx(rows[ex_id]["logprobs"], abs=1e-7)
        assert (batch["behavior_logp"][i][~mask] == 0).all()


ADVICE = (
    "Re-score the data with `python -m pear_lightning cache_logprobs` and this run's config (same tokenizer, "
    "chat template and max_length), or set data.drop_misaligned true to train without them"
)


def test_logprobs_that_do_not_line_up_stop_before_training(tmp_path):
    rows = demo_rows(5, "val")
    rows[1]["logprobs"] = rows[1]["logprobs"][:-1]  # one log-prob short of the ids
    # Two assistant turns: the text is rendered, and the ids (of the last turn only) cannot stand for both.
    rows[3]["messages"] = rows[3]["messages"] + rows[3]["messages"]
    # The sampler stopped on <|im_end|> and the dump left it out: it is trained, but the data has no log-prob for it.
    rows[4].update(token_ids=rows[4]["token_ids"][:-1], logprobs=rows[4]["logprobs"][:-1], finish_reason="stop")
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(PearError) as err:
        joined(path)
    assert str(err.value) == (
        f"{path}: 3 of 5 examples cannot be joined to their behaviour log-probs: 3 whose token_ids differ from the "
        "trainer's response tokens, or whose logprobs are not one per token (first: row 2 (id "
        f"{rows[1]['id']}), row 4 (id {rows[3]['id']}), row 5 (id {rows[4]['id']})). {ADVICE}"
    )


def test_nan_logprob_stops_before_training(tmp_path):
    rows = demo_rows(5, "val")
    rows[0]["logprobs"][2] = float("nan")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json writes NaN, as some generators' dumps do
    with pytest.raises(PearError) as err:
        joined(path)
    assert str(err.value) == (
        f"{path}: 1 of 5 examples cannot be joined to their behaviour log-probs: 1 with NaN, infinite or positive "
        f"log-probs (a log-probability is finite and <= 0) (first: row 1 (id {rows[0]['id']})). {ADVICE}"
    )


def test_misaligned_examples_can_be_dropped_and_counted_up_to_a_fraction(tmp_path, caplog):
    rows = demo_rows(5, "val")
    rows[2]["logprobs"] = rows[2]["logprobs"][1:]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level("INFO"):
        _, batch = joined(path, drop_misaligned=True, max_drop_fraction=0.2)
    assert sorted(batch["ids"]) == sorted(r["id"] for i, r in enumerate(rows) if i != 2)
    assert f"{path}: dropped 1 of 5 examples that cannot be joined" in caplog.text
    with pytest.raises(PearError, match=r"1 of 5 examples cannot be joined, more than data.max_drop_fraction=0.1: "):
        joined(path, drop_misaligned=True, max_drop_fraction=0.1)


def test_logprobs_without_token_ids_are_refused(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "token_ids"} for r in demo_rows(5, "val")]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(PearError, match=r"has `logprobs` but no `token_ids`; the behaviour log-probs must come with"):
        joined(path)


def test_truncation_keeps_the_logprobs_of_the_kept_prefix(tmp_path):
    rows = demo_rows(1, "val")
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    _, full = joined(path)
    _, cut = joined(path, max_length=full["input_ids"].shape[1] - 4)
    kept = int(cut["loss_mask"].sum())
    assert kept == int(full["loss_mask"].sum()) - 3  # the 4th token cut is the template's newline
    assert cut["behavior_logp"][0][cut["loss_mask"][0]].tolist() == pytest.approx(rows[0]["logprobs"][:kept])


def test_a_row_whose_text_retokenises_differently_trains_on_its_generator_ids(tmp_path, caplog):
    """The sampler drew "Start" one letter at a time; the text would re-tokenise as one token. The row is trained on
    the drawn ids with their log-probs, where re-tokenising would have refused it."""
    tokenizer = AutoTokenizer.from_pretrained(STUDENT)
    rows = demo_rows(3, "val")
    text = "Start with 2+2=4. #### 4"
    letters = tokenizer.convert_tokens_to_ids(["Ġ" if c == " " else c for c in text]) + [tokenizer.eos_token_id]
    rows[1].update(messages=conversation("Compute 2+2.", text), token_ids=letters, logprobs=[-0.25] * len(letters))
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level("INFO"):
        _, batch = joined(path)
    i = batch["ids"].index(rows[1]["id"])
    assert batch["input_ids"][i][batch["loss_mask"][i]].tolist() == letters
    assert batch["behavior_logp"][i][batch["loss_mask"][i]].tolist() == [-0.25] * len(letters)
    assert f"train ({path}): 3 of 3 examples train on their generator's `token_ids` (not re-tokenised)" in caplog.text


def test_token_ids_outside_the_vocabulary_are_named(tmp_path):
    size = len(AutoTokenizer.from_pretrained(STUDENT))
    rows = demo_rows(3, "val")
    rows[2]["token_ids"][4] = size
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(PearError) as err:
        tokenized(path)
    assert str(err.value) == (
        f"{path} row 3 (id {rows[2]['id']}): `token_ids` holds {size}, not a token id of this tokenizer (its ids run "
        f"from 0 to {size - 1}); the response ids must come from the tokenizer of data.tokenizer_name_or_path"
    )
