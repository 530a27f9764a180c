"""Checks of the data that name the bad input (file, line or row, id) instead of failing deep inside a library."""

from __future__ import annotations

import json
import logging
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from .errors import PearError
from .render import example_id

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SHOWN = 3


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
    that is not a JSON object, no example at all, or else the reader's own error."""
    files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES) if path.is_dir() else [path]
    json_files = [f for f in files if DATA_SUFFIXES.get(f.suffix) == "json"]
    for file in json_files:
        if (problem := _bad_line(file)) is not None:
            return problem
    # `datasets` says "corresponds to no data" of files without rows; an empty JSON file stops it without a word.
    if "corresponds to no data" in str(err) or (json_files == files and not any(_has_text(f) for f in files)):
        return no_examples(path)
    cause = err.__cause__ or err
    return f"{path}: cannot be read as a dataset: {type(cause).__name__}: {' '.join(str(cause).split())}"


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


def check_unique_ids(data: Dataset, where: str) -> None:
    """Refuse examples that share an id: behaviour log-probs are matched to examples by id.

    Raises:
        PearError: naming how many ids are repeated, and the first of them.
    """
    ids = data.select_columns(["id"]).with_format("arrow")[:].column("id")
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    repeated = [str(c["values"]) for c in pc.value_counts(ids).to_pylist() if c["counts"] > 1]
    raise PearError(
        f"{where}: {len(repeated)} ids name more than one example (first: {', '.join(repeated[:SHOWN])}); behaviour "
        "log-probs are matched to examples by id, so give every example its own `id` (an example without one is "
        "named by a hash of its content: remove exact repeats)"
    )


def check_behavior_columns(raw: Dataset, path: str, token_ids_column: str, logprobs_column: str) -> None:
    """Refuse behaviour log-prob columns of the wrong type: token ids must be lists of integers and log-probs
    lists of numbers (a row may lack both: the join then counts it as misaligned).

    Raises:
        PearError: naming the file, the first bad row and its id.
    """
    for column, kind in ((token_ids_column, "integers"), (logprobs_column, "numbers")):
        arrow_type = raw.data.schema.field(column).type
        is_list = pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
        item = arrow_type.value_type if is_list else None
        if is_list and (pa.types.is_integer(item) or (kind == "numbers" and pa.types.is_floating(item))):
            continue
        for index, value in enumerate(raw[column]):
            if value is not None and not (isinstance(value, list) and all(_is_kind(v, kind) for v in value)):
                raise PearError(
                    f"{path} row {index + 1} (id {example_id(raw[index])}): `{column}` must be a list of {kind}, one "
                    f"per response token; found {json.dumps(value)[:60]}"
                )
        if not is_list:
            found = "no row has one" if pa.types.is_null(arrow_type) else "rows mix types (a list written as a string?)"
            raise PearError(f"{path}: `{column}` must be a list of {kind} in each row, one per response token; {found}")


def _is_kind(value: object, kind: str) -> bool:
    """Whether a value is an integer (integral floats too: JSON readers make them) or a number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return kind == "numbers" or isinstance(value, numbers.Integral) or float(value).is_integer()
