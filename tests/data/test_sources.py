"""Reading examples: JSON Lines, JSON, Parquet, saved datasets and folders of them load the same examples, and a
file that cannot be read as examples is refused in one line naming it (and the line, where there is one)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import GOOD, assert_refused, fit_args, write_jsonl
from conftest import MIXED_FORMS as ROWS
from conftest import tokenized_train as tokenized
from datasets import Dataset

from pear_lightning.data.sources import load_examples
from pear_lightning.errors import PearError


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


def test_an_unsupported_file_type_is_named(tmp_path):
    (tmp_path / "train.csv").write_text("a,b\n")
    with pytest.raises(PearError) as err:
        tokenized(tmp_path / "train.csv")
    assert str(err.value) == f"{tmp_path / 'train.csv'}: unsupported file type '.csv'; use .jsonl, .json or .parquet"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"id": "b", "prompt": "x" "completion": "y"}', "not valid JSON (Expecting ',' delimiter at column 27)"),
        ('{"id": "b", "prompt": "x", "completion": "y"', "not valid JSON (Expecting ',' delimiter at column 45)"),
        ('["b", "x", "y"]', "a JSON list, not an object; each line is one example"),
    ],
    ids=["missing-comma", "cut-short", "not-an-object"],
)
def test_a_malformed_jsonl_line_is_named_by_its_line_number(run_dir, tiny_model_dir, capsys, line, problem):
    path = run_dir / "train.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n" + line + "\n" + json.dumps(GOOD[1]) + "\n")
    expected = f"{path} line 2: {problem}" + ("; fix or delete the line" if "valid JSON" in problem else "")
    assert_refused(fit_args(run_dir, tiny_model_dir, path), capsys, run_dir, expected)


@pytest.mark.parametrize("kind", ["empty-file", "blank-lines", "no-rows-parquet"])
def test_an_empty_dataset_is_refused(run_dir, tiny_model_dir, capsys, kind):
    if kind == "no-rows-parquet":
        path = run_dir / "train.parquet"
        Dataset.from_dict({"prompt": [], "completion": []}).to_parquet(path)
    else:
        path = run_dir / "train.jsonl"
        path.write_text("" if kind == "empty-file" else "\n  \n\n")
    expected = f"{path}: holds no examples; give at least one (JSON Lines: one JSON object per line)"
    assert_refused(fit_args(run_dir, tiny_model_dir, path), capsys, run_dir, expected)


def test_a_data_path_that_does_not_exist_is_one_error(run_dir, tiny_model_dir, capsys):
    assert_refused(
        fit_args(run_dir, tiny_model_dir, "nowhere/train.jsonl"), capsys, run_dir, "nowhere/train.jsonl: file not found"
    )


def test_a_data_folder_of_two_formats_is_refused(run_dir, tiny_model_dir, capsys):
    folder = run_dir / "data"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", GOOD[:2])
    Dataset.from_list(GOOD[2:]).to_parquet(folder / "part-1.parquet")
    expected = (
        f"{folder}: holds data files of 2 formats (1 json, 1 parquet); only one would be read: keep one format per "
        "data folder (.jsonl/.json or .parquet)"
    )
    assert_refused(fit_args(run_dir, tiny_model_dir, folder), capsys, run_dir, expected)


# One error mapping for every data path: the same spoilt bytes (a Parquet part cut short) are the same one line
# naming the file, whether a file given directly, a part in a plain folder, or a shard of a `generate` folder.

PARQUET_ROWS = [{"id": f"r{i}", "prompt": f"Compute {i}+1.", "completion": f"#### {i + 1}"} for i in range(50)]


def truncated_parquet(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(PARQUET_ROWS), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def generate_folder(folder):
    part = truncated_parquet(folder / "part-00000.parquet")
    manifest = {"kind": "generate", "shards": [{"file": part.name, "prompts": 50, "rows": 50}], "samples": 50}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return part


@pytest.mark.parametrize("layout", ["file", "plain folder", "generate folder"])
def test_a_parquet_part_cut_short_is_one_line_naming_it_on_every_path(layout, tmp_path):
    folder = tmp_path / "data"
    if layout == "generate folder":
        part, source = generate_folder(folder), folder
    else:
        part = truncated_parquet(folder / "part-00000.parquet")
        source = part if layout == "file" else folder
    with pytest.raises(PearError) as refused:
        load_examples(str(source))
    message = str(refused.value)
    assert message.startswith(f"{part}: not a readable Parquet file (") and message.endswith("); replace or delete it")
    assert "\n" not in message


def test_a_spoilt_saved_dataset_is_one_line(tmp_path):
    saved = tmp_path / "saved"
    Dataset.from_list(PARQUET_ROWS).save_to_disk(str(saved))
    for arrow in saved.glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(PearError) as refused:
        load_examples(str(saved))
    message = str(refused.value)
    assert message.startswith(f"{saved}: cannot be read as a saved dataset (") and "\n" not in message
    assert message.endswith("); save it again with save_to_disk")
