"""Checks of the examples and their behaviour log-prob columns that name the bad input (file, row, id)."""

from __future__ import annotations

import json
import numbers
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from pear_lightning.data.render import example_id
from pear_lightning.errors import PearError

SHOWN = 3  # ids named in a message


def repeated_ids(ids: pa.ChunkedArray | pa.Array) -> list[str]:
    """The ids that occur more than once in an id column (one vectorised pass; empty when all are unique)."""
    if pc.count_distinct(ids).as_py() == len(ids):
        return []
    return [str(c["values"]) for c in pc.value_counts(ids).to_pylist() if c["counts"] > 1]


def check_unique_ids(data: Dataset, where: str) -> None:
    """Refuse examples that share an id: behaviour log-probs are matched to examples by id.

    Raises:
        PearError: naming how many ids are repeated, and the first of them.
    """
    repeated = repeated_ids(data.select_columns(["id"]).with_format("arrow")[:].column("id"))
    if not repeated:
        return
    raise PearError(
        f"{where}: {len(repeated)} ids name more than one example (first: {', '.join(repeated[:SHOWN])}); behaviour "
        "log-probs are matched to examples by id, so give every example its own `id` (an example without one is "
        "named by a hash of its content: remove exact repeats)"
    )


def response_ids(value: Any, column: str, vocab_size: int, where: str) -> list[int] | None:
    """A row's generator token ids, checked, as integers; None when the row has none.

    Raises:
        PearError: naming the row when they are not a list of integers or not ids of the tokenizer.
    """
    if value is None:
        return None
    if not (isinstance(value, list) and all(_is_kind(v, "integers") for v in value)):
        raise PearError(
            f"{where}: `{column}` must be a list of integers, one per response token; found {json.dumps(value)[:60]}"
        )
    ids = [int(v) for v in value]
    outside = [v for v in ids if not 0 <= v < vocab_size]
    if outside:
        raise PearError(
            f"{where}: `{column}` holds {outside[0]}, not a token id of this tokenizer (its ids run from 0 to "
            f"{vocab_size - 1}); the response ids must come from the tokenizer of data.tokenizer_name_or_path"
        )
    return ids


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
