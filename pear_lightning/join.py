"""The token-exact join of behaviour log-probs to tokenised examples, vectorised with Arrow and numpy.

A behaviour table has one row per example: ``id``, ``token_ids`` (the response tokens the
log-probs score) and ``logprobs``. An example joins when its id is in the table exactly once, the
cached ``token_ids`` equal the trainer's response tokens (a truncated example may match a longer
cached response on its kept prefix, whose log-probs do not depend on the rest), and the log-probs
of those tokens are finite. Rows are checked in chunks, so memory stays bounded at any scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_info

from .errors import PearError

CHUNK_ROWS = 8192
SHOWN = 3


@dataclass
class JoinProblems:
    """Ids of the examples that cannot be joined, by reason."""

    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    non_finite: list[str] = field(default_factory=list)

    def count(self) -> int:
        """Examples with any problem."""
        return len(self.missing) + len(self.mismatched) + len(self.non_finite)

    def describe(self) -> str:
        """One clause per kind of problem, with counts and the first ids."""
        parts = []
        for ids, what in (
            (self.missing, "missing from the behaviour log-probs"),
            (self.mismatched, "whose cached token_ids differ from the trainer's response tokens (ids or length)"),
            (self.non_finite, "with NaN or infinite log-probs"),
        ):
            if ids:
                parts.append(f"{len(ids)} {what} (first: {', '.join(ids[:SHOWN])})")
        return "; ".join(parts)


def _lists(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and flat values of a list column."""
    array = pa.concat_arrays(column.chunks) if isinstance(column, pa.ChunkedArray) else column
    offsets = np.asarray(array.offsets)
    values = np.asarray(array.values)
    return offsets - offsets[0], values[offsets[0] : offsets[-1]]


def _check_chunk(data: pa.Table, behavior: pa.Table, rows: np.ndarray, found: np.ndarray, problems: JoinProblems):
    """Check one chunk of examples against their behaviour rows (``rows`` valid where ``found``)."""
    ids = data.column("id").to_pylist()
    problems.missing += [i for i, ok in zip(ids, found) if not ok]
    mask_offsets, mask = _lists(data.column("loss_mask"))
    _, input_ids = _lists(data.column("input_ids"))
    mask = mask.astype(bool)
    response = input_ids[mask]
    mask_count = np.concatenate([[0], np.cumsum(mask)])
    n = mask_count[mask_offsets[1:]] - mask_count[mask_offsets[:-1]]  # response tokens per example
    starts = mask_count[mask_offsets[:-1]]  # where each example's response starts in `response`
    taken = behavior.take(pa.array(np.where(found, rows, 0)))
    cached_offsets, cached = _lists(taken.column("token_ids"))
    _, logprobs = _lists(taken.column("logprobs"))
    m = np.diff(cached_offsets)
    truncated = np.asarray(data.column("truncated").to_numpy(zero_copy_only=False), dtype=bool)
    length_ok = (m == n) | (truncated & (m >= n))
    compared = np.where(found & length_ok, n, 0)  # tokens to compare per example
    k = np.arange(compared.sum()) - np.repeat(np.cumsum(compared) - compared, compared)
    position = np.repeat(cached_offsets[:-1], compared) + k
    trainer_position = np.repeat(starts, compared) + k
    owner = np.repeat(np.arange(len(ids)), compared)
    differs = np.bincount(owner, weights=cached[position] != response[trainer_position], minlength=len(ids)) > 0
    bad_value = np.bincount(owner, weights=~np.isfinite(logprobs[position]), minlength=len(ids)) > 0
    mismatched = found & (~length_ok | differs)
    problems.mismatched += [i for i, bad in zip(ids, mismatched) if bad]
    problems.non_finite += [i for i, bad in zip(ids, found & ~mismatched & bad_value) if bad]
    return found & ~mismatched & ~bad_value


def join_behavior(
    data: Dataset, behavior: Dataset, where: str, drop_misaligned: bool = False, max_drop_fraction: float = 0.01
) -> Dataset:
    """Return ``data`` with a ``behavior_row`` column: the index of each example's row in ``behavior``.

    Args:
        data: tokenised examples (``id``, ``input_ids``, ``loss_mask``, ``truncated``).
        behavior: the behaviour log-probs (``id``, ``token_ids``, ``logprobs``).
        where: names the data and the log-probs in messages.
        drop_misaligned: drop and count the examples that do not join, instead of stopping.
        max_drop_fraction: with ``drop_misaligned``, stop anyway if more than this fraction is dropped.

    Raises:
        PearError: if the behaviour table has duplicate ids, or examples do not join (and may not be dropped).
    """
    behavior_ids = behavior.with_format("arrow")[:].column("id")
    if pc.count_distinct(behavior_ids).as_py() != len(behavior_ids):
        counts = pc.value_counts(behavior_ids).to_pylist()
        dupes = [str(c["values"]) for c in counts if c["counts"] > 1]
        first = ", ".join(dupes[:SHOWN])
        raise PearError(
            f"{where}: the behaviour log-probs list {len(dupes)} ids more than once (first: {first}); each example "
            "needs exactly one row: re-make them with `python -m pear_lightning cache_logprobs`"
        )
    behavior_table = behavior.with_format("arrow")[:].select(["token_ids", "logprobs"])
    problems = JoinProblems()
    rows_all, keep = [], []
    for start in range(0, len(data), CHUNK_ROWS):
        chunk = data.with_format("arrow")[start : start + CHUNK_ROWS]
        index = pc.index_in(chunk.column("id"), value_set=behavior_ids)
        found = np.asarray(index.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        rows = np.asarray(index.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        keep.append(_check_chunk(chunk, behavior_table, rows, found, problems))
        rows_all.append(rows)
    keep_mask = np.concatenate(keep) if keep else np.zeros(0, bool)
    rows = np.concatenate(rows_all) if rows_all else np.zeros(0, np.int64)
    bad = problems.count()
    if bad:
        advice = (
            "Re-score the data with `python -m pear_lightning cache_logprobs` and this run's config (same tokenizer, "
            "chat template and max_length), or set data.drop_misaligned true to train without them"
        )
        if not drop_misaligned:
            raise PearError(
                f"{where}: {bad} of {len(data)} examples cannot be joined to their behaviour log-probs: "
                f"{problems.describe()}. {advice}"
            )
        if bad > max_drop_fraction * len(data):
            raise PearError(
                f"{where}: {bad} of {len(data)} examples cannot be joined, more than data.max_drop_fraction="
                f"{max_drop_fraction}: {problems.describe()}. {advice}"
            )
        rank_zero_info(f"{where}: dropped {bad} of {len(data)} examples that cannot be joined: {problems.describe()}")
    data = data.add_column("behavior_row", rows.tolist())
    return data.select(np.flatnonzero(keep_mask)) if bad else data
