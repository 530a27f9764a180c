"""The token-exact join of behaviour log-probs to tokenised examples, vectorised with Arrow and numpy.

A behaviour table has one row per example: ``id``, ``token_ids`` (the response tokens the
log-probs score) and ``logprobs``. An example joins when its id is in the table exactly once, the
cached ``token_ids`` equal the trainer's response tokens (a truncated example may match a longer
cached response on its kept prefix, whose log-probs do not depend on the rest), it has one log-prob
per cached token, and the log-probs of its tokens are log-probabilities: finite and not above 0. Every
row is checked when the data is loaded, before the first step. The joined examples carry their
``behavior_logp``: one value per trained response token, truncation already applied, so batches are
collated without looking anything up. Rows are checked in chunks, so memory stays bounded at any scale.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_info

from pear_lightning.data.cache import TEACHER_COLUMNS
from pear_lightning.data.checks import SHOWN, repeated_ids
from pear_lightning.data.teacher import join_teacher
from pear_lightning.errors import PearError

CHUNK_ROWS = 8192
MAX_LOGPROB = 1e-4  # above 0 by more than fp32 rounding of a log-softmax can give: not a log-probability


@dataclass
class JoinProblems:
    """The examples that cannot be joined (``row N (id X)``, rows counted from 1), by reason."""

    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    bad_values: list[str] = field(default_factory=list)
    teacher_mismatched: list[str] = field(default_factory=list)
    teacher_bad: list[str] = field(default_factory=list)

    def count(self) -> int:
        """Examples with any problem."""
        return sum(len(ids) for ids in vars(self).values())

    def describe(self) -> str:
        """One clause per kind of problem, with counts and the first ids."""
        parts = []
        for ids, what in (
            (self.missing, "missing from the behaviour log-probs"),
            (
                self.mismatched,
                "whose token_ids differ from the trainer's response tokens, or whose logprobs are not one per token",
            ),
            (self.bad_values, "with NaN, infinite or positive log-probs (a log-probability is finite and <= 0)"),
            (self.teacher_mismatched, "whose teacher top-k columns do not hold top_k entries per cached token"),
            (
                self.teacher_bad,
                "whose teacher top-k holds an id outside the teacher's vocabulary or twice at one token, or log-probs "
                "that are NaN, infinite or positive or do not add up to 1 with the tail",
            ),
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


def _join_chunk(
    data: pa.Table,
    behavior: pa.Table,
    rows: np.ndarray,
    found: np.ndarray,
    problems: JoinProblems,
    teacher: dict | None = None,
) -> tuple[np.ndarray, list[pa.Array]]:
    """Check one chunk of examples against their behaviour rows (``rows`` valid where ``found``); return which
    examples join and each one's log-probs of its trained response tokens (empty for those that do not), then,
    with a ``teacher`` (the manifest's entry), its teacher columns (see ``teacher.join_teacher``)."""
    ids = [f"row {r} (id {i})" for r, i in zip(data.column("row").to_pylist(), data.column("id").to_pylist())]
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
    logprob_offsets, logprobs = _lists(taken.column("logprobs"))
    m = np.diff(cached_offsets)
    truncated = np.asarray(data.column("truncated").to_numpy(zero_copy_only=False), dtype=bool)
    length_ok = ((m == n) | (truncated & (m >= n))) & (np.diff(logprob_offsets) == m)
    compared = np.where(found & length_ok, n, 0)  # tokens to compare per example
    k = np.arange(compared.sum()) - np.repeat(np.cumsum(compared) - compared, compared)
    owner = np.repeat(np.arange(len(ids)), compared)
    cached_position = np.repeat(cached_offsets[:-1], compared) + k
    trainer_position = np.repeat(starts, compared) + k
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, and is refused as such
        kept_logprobs = logprobs[np.repeat(logprob_offsets[:-1], compared) + k].astype(np.float32)  # as trained
    differs = np.bincount(owner, weights=cached[cached_position] != response[trainer_position], minlength=len(ids))
    impossible = ~np.isfinite(kept_logprobs) | (kept_logprobs > MAX_LOGPROB)
    bad_value = np.bincount(owner, weights=impossible, minlength=len(ids)) > 0
    mismatched = found & (~length_ok | (differs > 0))
    problems.mismatched += [i for i, bad in zip(ids, mismatched) if bad]
    problems.bad_values += [i for i, bad in zip(ids, found & ~mismatched & bad_value) if bad]
    joined = found & ~mismatched & ~bad_value
    if teacher is not None:
        teacher_mismatched, teacher_bad, teacher_columns = join_teacher(taken, joined, n, m, teacher)
        problems.teacher_mismatched += [i for i, bad in zip(ids, teacher_mismatched) if bad]
        problems.teacher_bad += [i for i, bad in zip(ids, teacher_bad) if bad]
        joined &= ~teacher_mismatched & ~teacher_bad
    lengths = np.where(joined, n, 0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    columns = [pa.ListArray.from_arrays(pa.array(offsets), pa.array(kept_logprobs[joined[owner]]))]
    return joined, columns + (teacher_columns(joined) if teacher is not None else [])


def join_behavior(
    data: Dataset,
    behavior: Dataset,
    where: str,
    drop_misaligned: bool = False,
    max_drop_fraction: float = 0.01,
    teacher: dict | None = None,
) -> Dataset:
    """Return ``data`` with a ``behavior_logp`` column: log π_β of each example's trained response tokens (and, with
    a ``teacher``, the teacher's top-k columns of those tokens, see ``teacher``).

    Args:
        data: tokenised examples (``id``, ``row``, ``input_ids``, ``loss_mask``, ``truncated``).
        behavior: the behaviour log-probs (``id``, ``token_ids``, ``logprobs``).
        where: names the data and the log-probs in messages.
        drop_misaligned: drop and count the examples that do not join, instead of stopping.
        max_drop_fraction: with ``drop_misaligned``, stop anyway if more than this fraction is dropped.
        teacher: the cache manifest's ``teacher`` entry (``top_k``, ``vocab_size``) when it holds a teacher's top-k.

    Raises:
        PearError: if the behaviour table has duplicate ids, or examples do not join (and may not be dropped).
    """
    behavior_ids = behavior.with_format("arrow")[:].column("id")
    dupes = repeated_ids(behavior_ids)
    if dupes:
        raise PearError(
            f"{where}: the behaviour log-probs list {len(dupes)} ids more than once (first: "
            f"{', '.join(dupes[:SHOWN])}); each example needs exactly one row: re-make them with "
            "`python -m pear_lightning cache_logprobs`"
        )
    names = ["token_ids", "logprobs", *(TEACHER_COLUMNS if teacher else ())]
    behavior_table = behavior.with_format("arrow")[:].select(names)
    problems = JoinProblems()
    keep, columns = [], []
    rows_per_chunk = CHUNK_ROWS // (1 + teacher["top_k"]) + 1 if teacher else CHUNK_ROWS  # bounded memory either way
    for start in range(0, len(data), rows_per_chunk):
        chunk = data.with_format("arrow")[start : start + rows_per_chunk]
        index = pc.index_in(chunk.column("id"), value_set=behavior_ids)
        found = np.asarray(index.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        rows = np.asarray(index.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        joined, chunk_columns = _join_chunk(chunk, behavior_table, rows, found, problems, teacher)
        keep.append(joined)
        columns.append(chunk_columns)
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
    # The new column's fingerprint from its inputs': hashing 100M log-probs would cost more than the join.
    fingerprint = hashlib.sha256(f"{data._fingerprint} {behavior._fingerprint} join".encode()).hexdigest()[:16]
    for i, name in enumerate(["behavior_logp", *(TEACHER_COLUMNS if teacher else ())]):
        column = pa.chunked_array([c[i] for c in columns], None if i else pa.list_(pa.float32()))
        named = fingerprint if i == 0 else hashlib.sha256(f"{fingerprint} {name}".encode()).hexdigest()[:16]
        data = data.add_column(name, column, new_fingerprint=named)
    return data.select(np.flatnonzero(np.concatenate(keep))) if bad else data
