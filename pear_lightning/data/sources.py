"""Reading examples: any ``datasets`` source (JSON Lines, JSON, Parquet, a saved dataset, a folder, a hub name), and
one-line reasons when a file cannot be read, naming the file and line instead of failing deep inside a library."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, load_dataset, load_from_disk

from pear_lightning.errors import PearError, looks_local

# Local files never reach the network: datasets would ping its S3 bucket to count each load of its json / parquet
# readers (a hub name still downloads as usual).
datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # file suffix → datasets builder
# What `datasets` would also read from a folder, each as its own format.
OTHER_FORMATS = {".csv": "csv", ".tsv": "csv", ".txt": "text", ".arrow": "arrow", ".xml": "xml", ".sql": "sql"}
GENERATED = "generate"  # the `kind` in the manifest of a folder written by `python -m pear_lightning generate`


def generated_manifest(path: str | None) -> dict | None:
    """The manifest of a finished folder written by ``python -m pear_lightning generate``; None for other sources."""
    file = Path(path) / "manifest.json" if path else None
    if file is None or not file.is_file():
        return None
    manifest = json.loads(file.read_text())
    return manifest if manifest.get("kind") == GENERATED else None


def load_examples(path: str) -> Dataset:
    """Load examples from a JSONL / JSON / Parquet file, a saved dataset folder, a folder of data files,
    or (when online) a hub dataset name.

    Raises:
        PearError: if the path does not exist or cannot be read as a dataset.
    """
    local = Path(path)
    if local.is_dir():
        if (manifest := generated_manifest(path)) is not None:
            return _load_generated(local, manifest)
        progress = local / "progress.json"
        if progress.is_file() and json.loads(progress.read_text()).get("kind") == GENERATED:
            raise PearError(
                f"{path}: holds an unfinished `generate` output (no manifest.json); run the same generate command "
                "again to finish it"
            )
        if (local / "dataset_info.json").exists() or (local / "state.json").exists():
            dataset = read(local, lambda: load_from_disk(str(local)))
            return dataset["train"] if hasattr(dataset, "keys") else dataset
        check_one_format(local)
        return read(local, lambda: load_dataset(str(local), split="train"))
    if local.is_file():
        builder = DATA_SUFFIXES.get(local.suffix)
        if builder is None:
            raise PearError(f"{path}: unsupported file type {local.suffix!r}; use .jsonl, .json or .parquet")
        return read(local, lambda: load_dataset(builder, data_files=str(local), split="train"))
    if local.suffix in DATA_SUFFIXES or looks_local(path):
        raise PearError(f"{path}: file not found")
    try:
        return load_dataset(path, split="train")
    except Exception as err:  # the hub's errors vary by version; the path is the useful part
        raise PearError(f"{path}: no such file or folder, and not loadable as a hub dataset ({err})") from err


def check_one_format(folder: Path) -> None:
    """Refuse a data folder whose files are of several formats (``datasets`` would read one and skip the rest) or
    hold no data file at all.

    Raises:
        PearError: naming the folder and how many files of each format it holds.
    """
    files = [
        f for f in folder.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(folder).parts)
    ]
    formats: dict[str, int] = {}
    for f in files:
        kind = DATA_SUFFIXES.get(f.suffix) or OTHER_FORMATS.get(f.suffix)
        if kind is not None:
            formats[kind] = formats.get(kind, 0) + 1
    if len(formats) > 1:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(formats.items()))
        raise PearError(
            f"{folder}: holds data files of {len(formats)} formats ({counts}); only one would be read: keep one "
            "format per data folder (.jsonl/.json or .parquet)"
        )
    if not formats or next(iter(formats)) not in DATA_SUFFIXES.values():
        raise PearError(f"{folder}: holds no .jsonl, .json or .parquet file; put the examples in one of those formats")


def _load_generated(folder: Path, manifest: dict) -> Dataset:
    """The responses of a finished ``generate`` folder: its Parquet shards, in order."""
    missing = [s["file"] for s in manifest["shards"] if not (folder / s["file"]).is_file()]
    if missing:
        raise PearError(
            f"{folder}: shard {missing[0]} of this `generate` output is missing; run the generate command that made it "
            f"again (same options, --output {folder}) to write it anew"
        )
    files = [str(folder / s["file"]) for s in manifest["shards"] if s["rows"]]
    if not files:
        raise PearError(f"{folder}: holds no responses (the verifier kept none of {manifest['samples']} samples)")
    return read(folder, lambda: load_dataset("parquet", data_files=files, split="train"))


def read(path: Path, load: Callable[[], Dataset]) -> Dataset:
    """``load()`` a local data source; whatever the reader raises becomes one line naming the file at fault (see
    ``unreadable``), the same for every kind of source.

    Raises:
        PearError: if it cannot be read.
    """
    try:
        with quiet_reader():
            return load()
    except Exception as err:  # datasets wraps the reader's error; the bad file or line is the useful part
        raise PearError(unreadable(path, err)) from err


def no_examples(path: str | Path) -> str:
    """The message for a data file or dataset without a single example."""
    return f"{path}: holds no examples; give at least one (JSON Lines: one JSON object per line)"


@contextmanager
def quiet_reader() -> Iterator[None]:
    """Hide the ``datasets`` JSON reader's own error log while a file is read: ``unreadable`` says it better."""
    log = logging.getLogger("datasets.packaged_modules.json.json")
    level, log.level = log.level, logging.CRITICAL
    try:
        yield
    finally:
        log.level = level


def unreadable(path: Path, err: Exception) -> str:
    """Say, on one line, why ``datasets`` could not read a data file (or a folder of them): the first line
    that is not a JSON object, the first Parquet file that cannot be read, no example at all, or else the reader's
    own error."""
    cause = err.__cause__ or err
    reason = f"{type(cause).__name__}: {' '.join(str(cause).split())}"
    if (path / "state.json").exists():  # a saved dataset: its own JSON files are metadata, not examples
        return f"{path}: cannot be read as a saved dataset ({reason}); save it again with save_to_disk"
    files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES) if path.is_dir() else [path]
    json_files = [f for f in files if DATA_SUFFIXES.get(f.suffix) == "json"]
    for file in json_files:
        if (problem := _bad_line(file)) is not None:
            return problem
    for file in (f for f in files if f.suffix == ".parquet"):
        try:
            pq.ParquetFile(file).read()
        except (OSError, pa.ArrowException) as bad:
            return f"{file}: not a readable Parquet file ({' '.join(str(bad).split())}); replace or delete it"
    # `datasets` says "corresponds to no data" of files without rows; an empty JSON file stops it without a word.
    if "corresponds to no data" in str(err) or (json_files == files and not any(_has_text(f) for f in files)):
        return no_examples(path)
    return f"{path}: cannot be read as a dataset: {reason}"


def _bad_line(file: Path) -> str | None:
    """The first line of a JSON Lines file that is not a JSON object, described; None if every line is one
    (or the file is a single JSON array, which only the reader checks)."""
    first = True
    with open(file, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text:
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as bad:
                if first and text.startswith("["):
                    return None
                return f"{file} line {number}: not valid JSON ({bad.msg} at column {bad.colno}); fix or delete the line"
            if not isinstance(value, dict):
                if first and isinstance(value, list):
                    return None
                return f"{file} line {number}: a JSON {type(value).__name__}, not an object; each line is one example"
            first = False
    return None


def _has_text(file: Path) -> bool:
    """Whether a file holds anything but whitespace."""
    with open(file, "rb") as lines:
        return any(line.strip() for line in lines)
