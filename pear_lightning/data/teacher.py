"""The teacher's top-k in the log-prob cache: its Parquet columns, and their checks at the token-exact join.

A cache made with ``cache_logprobs --teacher_top_k K`` holds, per example and beside ``token_ids`` / ``logprobs``,
three list columns over the same response tokens, token-major (token t's entries at [t·K, (t+1)·K)):

    teacher_topk_ids        int32, K per token: the teacher's K most likely next tokens, most likely first
    teacher_topk_logprobs   float16 or float32 (``--teacher_dtype``), K per token: their log-probs
    teacher_tail_logprob    float32, 1 per token: log of the teacher's probability mass outside those K (-inf: none)

of the teacher's raw distribution (temperature 1, nothing truncated: the distribution to distil), computed on the
memory-lean path. The manifest's ``teacher`` records the model, a hash of its config, K, the dtype and its
vocabulary size; the join checks every row's columns before the first step. ``behavior.score`` writes them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pear_lightning.data.cache import TEACHER_COLUMNS

MASS_TOLERANCE = 0.01  # |log(Σ top-k probabilities + tail)|: fp16 rounding stays far below, a spoilt value does not


def _lists(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    array = pa.concat_arrays(column.chunks) if isinstance(column, pa.ChunkedArray) else column
    offsets = np.asarray(array.offsets)
    return offsets - offsets[0], np.asarray(array.values)[offsets[0] : offsets[-1]]


def join_teacher(
    taken: pa.Table, candidates: np.ndarray, n: np.ndarray, m: np.ndarray, teacher: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, Any]:
    """Check the teacher columns of one chunk's cached rows (``taken``, aligned with the chunk's examples).

    Args:
        taken: the cached rows, with the teacher columns.
        candidates: the examples whose behaviour columns joined (only these are checked).
        n: trained response tokens per example (the first n of the cached m are kept).
        m: cached response tokens per example.
        teacher: the manifest's ``teacher`` entry (``top_k``, ``vocab_size``).

    Returns:
        (examples whose columns are not K per cached token, examples with impossible values, and a function that
        gives the three joined Arrow list columns of the examples it is told join, truncation applied).
    """
    k, vocab = teacher["top_k"], teacher["vocab_size"]
    (ids_off, ids), (lp_off, lps), (tail_off, tails) = (_lists(taken.column(c)) for c in TEACHER_COLUMNS)
    length_ok = (np.diff(ids_off) == m * k) & (np.diff(lp_off) == m * k) & (np.diff(tail_off) == m)
    checked = np.where(candidates & length_ok, n, 0)
    step = np.arange(checked.sum()) - np.repeat(np.cumsum(checked) - checked, checked)  # token index in its row
    owner = np.repeat(np.arange(len(n)), checked)
    entries = np.arange(k)
    token_ids = ids[(np.repeat(ids_off[:-1], checked) + step * k)[:, None] + entries]
    token_lps = lps[(np.repeat(lp_off[:-1], checked) + step * k)[:, None] + entries]
    token_tails = tails[np.repeat(tail_off[:-1], checked) + step].astype(np.float64)
    values = token_lps.astype(np.float64)
    ordered = np.sort(token_ids, axis=1)
    bad = ((token_ids < 0) | (token_ids >= vocab)).any(axis=1) | (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
    bad |= (~np.isfinite(values) | (values > 1e-4)).any(axis=1) | np.isnan(token_tails) | (token_tails > 1e-4)
    with np.errstate(invalid="ignore", over="ignore"):
        top = np.where(np.isfinite(values), values, 0).max(axis=1, initial=-np.inf)
        mass = np.exp(values - top[:, None]).sum(axis=1) + np.exp(token_tails - top)
        bad |= ~(np.abs(top + np.log(mass)) <= MASS_TOLERANCE)
    bad_values = np.bincount(owner, weights=bad, minlength=len(n)) > 0

    def columns(joined: np.ndarray) -> list[pa.Array]:
        keep = joined[owner]
        offsets = np.concatenate([[0], np.cumsum(np.where(joined, n, 0))]).astype(np.int32)
        arrays = (token_ids[keep].ravel(), token_lps[keep].ravel(), token_tails[keep].astype(np.float32))
        return [pa.ListArray.from_arrays(pa.array(offsets * w), pa.array(a)) for w, a in zip((k, k, 1), arrays)]

    return candidates & ~length_ok, candidates & length_ok & bad_values, columns
