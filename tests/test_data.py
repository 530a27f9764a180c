"""PearDataModule: loading from every supported source, truncation accounting, the behaviour log-prob join."""

import json

import pytest
from conftest import DEMO, STUDENT, conversation, write_jsonl
from datasets import Dataset

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


def test_missing_file_is_named():
    with pytest.raises(PearError) as err:
        tokenized("no/such/train.jsonl")
    assert str(err.value) == "no/such/train.jsonl: file not found"


def test_unsupported_file_type_is_named(tmp_path):
    (tmp_path / "train.csv").write_text("a,b\n")
    with pytest.raises(PearError, match=r"train.csv: unsupported file type '.csv'; use .jsonl, .json or .parquet$"):
        tokenized(tmp_path / "train.csv")


def test_the_demo_data_joins_its_behaviour_logprobs_token_exactly():
    data = tokenized(DEMO / "data" / "val.jsonl")
    rows = [json.loads(line) for line in open(DEMO / "data" / "val.jsonl")]
    assert len(data) == len(rows)
    for row, tokens in zip(rows, data):
        assert [t for t, m in zip(tokens["input_ids"], tokens["loss_mask"]) if m] == row["token_ids"]
        assert tokens["behavior_logprobs"] == pytest.approx(row["logprobs"])


def demo_rows(count=5):
    return [json.loads(line) for line in open(DEMO / "data" / "val.jsonl")][:count]


def test_a_changed_token_id_stops_before_training(tmp_path):
    rows = demo_rows()
    rows[1]["token_ids"][3] += 1
    rows[3]["token_ids"] = rows[3]["token_ids"][:-1]
    rows[3]["logprobs"] = rows[3]["logprobs"][:-1]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(PearError) as err:
        tokenized(path)
    n1, n3 = len(rows[1]["token_ids"]), len(rows[3]["token_ids"])
    assert str(err.value) == (
        f"{path}: 2 of 5 examples have behaviour log-probs that do not line up with the trainer's response tokens "
        f"(first: id {rows[1]['id']}: token ids differ from the trainer's at response token 3 ({n1} given, {n1} trained); "
        f"id {rows[3]['id']}: token ids differ from the trainer's at response token {n3} ({n3} given, {n3 + 1} trained)). "
        "The `token_ids` must be the response tokens as this tokenizer and chat template produce them; "
        "re-score the data with the behaviour model"
    )


def test_nan_logprob_and_length_mismatch_stop_before_training(tmp_path):
    rows = demo_rows()
    rows[0]["logprobs"][2] = float("nan")
    rows[2]["logprobs"] = rows[2]["logprobs"][:-1]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json writes NaN, as vLLM dumps may
    with pytest.raises(PearError, match=r": 2 of 5 examples have behaviour log-probs") as err:
        tokenized(path)
    n2 = len(rows[2]["token_ids"])
    assert f"id {rows[0]['id']}: a log-prob is NaN or infinite" in str(err.value)
    assert f"id {rows[2]['id']}: {n2} token ids but {n2 - 1} log-probs" in str(err.value)


def test_logprobs_without_token_ids_are_refused(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "token_ids"} for r in demo_rows()]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(PearError, match=r"has `logprobs` but no `token_ids`; the behaviour log-probs must come with"):
        tokenized(path)


def test_truncation_keeps_the_logprobs_of_the_kept_prefix(tmp_path):
    rows = demo_rows(1)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    full = tokenized(path)[0]
    cut = tokenized(path, max_length=len(full["input_ids"]) - 4)[0]
    kept = sum(cut["loss_mask"])
    assert cut["truncated"] and kept == sum(full["loss_mask"]) - 3  # the 4th token cut is the template's newline
    assert cut["behavior_logprobs"] == pytest.approx(rows[0]["logprobs"][:kept])
