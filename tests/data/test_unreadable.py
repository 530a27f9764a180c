"""One error mapping for every data path: the same spoilt bytes (a Parquet part cut short) are the same one line
naming the file, whether they are a file given directly, a part in a plain folder, or a shard of a ``generate``
folder; a spoilt saved dataset is one line too."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

from pear_lightning.data.sources import load_examples
from pear_lightning.errors import PearError

ROWS = [{"id": f"r{i}", "prompt": f"Compute {i}+1.", "completion": f"#### {i + 1}"} for i in range(50)]


def truncated_parquet(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(ROWS), path)
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
    Dataset.from_list(ROWS).save_to_disk(str(saved))
    for arrow in saved.glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(PearError) as refused:
        load_examples(str(saved))
    message = str(refused.value)
    assert message.startswith(f"{saved}: cannot be read as a saved dataset (") and "\n" not in message
    assert message.endswith("); save it again with save_to_disk")
