"""The behaviour log-prob cache on disk: Parquet shards plus a manifest, written atomically, read back checked.

Layout of a cache folder::

    manifest.json                 written last: its presence means the cache is complete
    progress.json                 while being written: the inputs, so that a resumed run can check them
    <split>-<k>.parquet           shard k of a split: id, token_ids (int32 lists), logprobs (float32 lists), and,
                                  made with a teacher, its top-k columns (see ``teacher``)

The log-probs are log q(y), in fp32, of the response tokens exactly as the trainer tokenises them
(chat template and ``max_length`` included), where q is the behaviour model's distribution processed
as the data was sampled (each split's ``sampling`` in the manifest: temperature, top-k, top-p, min-p;
at temperature 1 without truncation, the raw log-softmax).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, concatenate_datasets
from transformers import PreTrainedTokenizerBase

from pear_lightning.data.sources import generated_manifest
from pear_lightning.errors import PearError
from pear_lightning.sampling import SamplingSettings

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
SCHEMA = pa.schema([("id", pa.string()), ("token_ids", pa.list_(pa.int32())), ("logprobs", pa.list_(pa.float32()))])
TEACHER_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob")
MAKE_CACHE = (
    "make the cache with the teacher's top-k log-probs: `python -m pear_lightning cache_logprobs --config <this run's "
    "config> --model.model_name_or_path <behaviour model> --teacher <teacher model> --teacher_top_k 20 --output <dir>` "
    "and set data.logprobs_path to it"
)
TEACHER_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}  # of the teacher's top-k log-probs


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of what decides token ids: vocabulary, merges, normalisation, special tokens and chat template."""
    content = {
        "backend": json.loads(tokenizer.backend_tokenizer.to_str()),
        "special_tokens": tokenizer.special_tokens_map,
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def data_fingerprint(path: str) -> str:
    """Hash of a data file's bytes, or of every file in a data folder (names included)."""
    local = Path(path)
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    if not all(f.exists() for f in files):
        return f"name:{path}"  # a hub dataset: only its name is known here
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(local) if local.is_dir() else f.name).encode())
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def model_fingerprint(config: dict[str, Any]) -> str:
    """Hash of a model's configuration (architecture and sizes), to record which model scored the data."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_table(rows: list[dict[str, Any]], teacher_dtype: str | None = None) -> pa.Table:
    """One shard of scored examples (``id``, ``token_ids``, ``logprobs``); with ``teacher_dtype``, with the teacher's
    top-k columns (see ``teacher``)."""
    schema = SCHEMA
    if teacher_dtype is not None:
        types = (pa.list_(pa.int32()), pa.list_(TEACHER_DTYPES[teacher_dtype]), pa.list_(pa.float32()))
        schema = pa.schema([*SCHEMA, *(pa.field(c, t) for c, t in zip(TEACHER_COLUMNS, types))])
    return pa.Table.from_pylist(rows, schema=schema)


def shard_rows(path: Path) -> int | None:
    """The number of rows of a complete shard, or None if it is missing or unreadable."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException):
        return None


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a complete cache, or None."""
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def load_cache(
    folder: str,
    split: str,
    tokenizer: PreTrainedTokenizerBase,
    data_path: str,
    sampling: SamplingSettings,
    setting: str = "data.logprobs_path",
    sampling_setting: str = "data.sampling",
) -> Dataset:
    """Load one split of a cache, memory-mapped, after checking that it was made for this tokenizer and data, under
    the distribution that sampled the data (``sampling``), and, for a ``generate`` folder, by the model that sampled it.

    Args:
        folder: the cache folder.
        split: the split of the cache to load.
        tokenizer: the run's tokenizer.
        data_path: the examples the cache must have scored.
        sampling: the distribution that sampled them.
        setting: how messages name the cache folder's setting.
        sampling_setting: how messages name the setting that declares ``sampling``.

    Raises:
        PearError: if the folder holds no complete cache, the tokenizer, data file, sampling settings or (for a
            ``generate`` folder) the model that sampled the data differ from the ones it was made with, or a shard is
            missing, unreadable or of the wrong size.
    """
    root = Path(folder)
    redo = f"re-run `python -m pear_lightning cache_logprobs --config <this run's config> --output {folder}`"
    manifest = read_manifest(root)
    if manifest is None:
        state = "an unfinished cache (no manifest.json)" if (root / PROGRESS).exists() else "no cache"
        raise PearError(f"{setting}={folder}: holds {state}; {redo}")
    if manifest["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise PearError(
            f"{setting}={folder}: made with another tokenizer or chat template (fingerprint "
            f"{manifest['tokenizer_fingerprint']}, this run's is {tokenizer_fingerprint(tokenizer)}); its token ids "
            f"would not line up: {redo}"
        )
    entry = manifest["splits"].get(split)
    if entry is None:
        raise PearError(f"{setting}={folder}: has no `{split}` split (it has {sorted(manifest['splits'])}); {redo}")
    if entry["data_fingerprint"] != data_fingerprint(data_path):
        raise PearError(
            f"{setting}={folder}: the {split} data {data_path} changed since the cache was made from "
            f"{entry['data_path']} (fingerprint {entry['data_fingerprint']}, now {data_fingerprint(data_path)}); {redo}"
        )
    scored = SamplingSettings(**entry.get("sampling", {}))  # caches from before the setting scored the raw distribution
    if scored != sampling:
        raise PearError(
            f"{setting}={folder}: scored the {split} data under {scored.describe()}, but it was sampled with "
            f"{sampling.describe()}; those log-probs are not π_β of this data. Set {sampling_setting} to how the data "
            f"was really sampled (a `generate` folder records it) and {redo}"
        )
    check_sampled_by(manifest, f"{setting}={folder}", split, data_path)
    parts = []
    for shard in manifest["shards"][split]:
        path = root / shard["file"]
        rows = shard_rows(path)
        if rows is None:
            raise PearError(f"{setting}={folder}: shard {shard['file']} is missing, cut short or unreadable; {redo}")
        if rows != shard["rows"]:
            raise PearError(
                f"{setting}={folder}: shard {shard['file']} holds {rows} rows where the manifest records "
                f"{shard['rows']}; {redo}"
            )
        parts.append(Dataset.from_parquet(str(path), split="train"))
    return concatenate_datasets(parts)


def check_sampled_by(manifest: dict[str, Any], where: str, split: str, data_path: str) -> None:
    """Refuse a cache (named ``where``) scored by another model than the one that sampled a ``generate`` folder: its
    log-probs are not π_β of that data. Models are compared by their config's fingerprint, which precision leaves as
    it is.

    Raises:
        PearError: naming both models.
    """
    generated = generated_manifest(data_path)
    sampler = generated and generated.get("model_config_fingerprint")
    scorer = manifest.get("behavior_model_config_fingerprint")
    if sampler and scorer and sampler != scorer:
        raise PearError(
            f"{where}: scored the {split} data with {manifest['behavior_model']} (config {scorer}), but {data_path} "
            f"was sampled from {generated['model']} (config {sampler}); those log-probs are not π_β of this data: "
            f"re-score it with the model that sampled it (`cache_logprobs --model.model_name_or_path "
            f"{generated['model']}`)"
        )
