"""The teacher's top-k in the log-prob cache: the scorer that computes it, its Parquet columns, and its checks at the
token-exact join.

A cache made with ``cache_logprobs --teacher_top_k K`` holds, per example and beside ``token_ids`` / ``logprobs``,
three list columns over the same response tokens, token-major (token t's entries at [t·K, (t+1)·K)):

    teacher_topk_ids        int32, K per token: the teacher's K most likely next tokens, most likely first
    teacher_topk_logprobs   float16 or float32 (``--teacher_dtype``), K per token: their log-probs
    teacher_tail_logprob    float32, 1 per token: log of the teacher's probability mass outside those K (-inf: none)

of the teacher's raw distribution (temperature 1, nothing truncated: the distribution to distil), computed on the
memory-lean path. The manifest's ``teacher`` records the model, a hash of its config, K, the dtype and its
vocabulary size; the join checks every row's columns before the first step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from .cache import TEACHER_DTYPES, model_fingerprint, read_manifest
from .distill import MAKE_CACHE, TEACHER_COLUMNS
from .errors import LOAD_ERRORS, PearError, load_error
from .logprobs import ChunkSize
from .module import PearModule
from .topk import teacher_topk

MASS_TOLERANCE = 0.01  # |log(Σ top-k probabilities + tail)|: fp16 rounding stays far below, a spoilt value does not


class TeacherScorer(PearModule):
    """Scores examples with a teacher: its ``predict_step`` adds the top ``top_k`` ids, log-probs and tail log-mass of
    each response token to ``PearModule.predict_step``'s output (the log-probs of the data tokens under ``scoring``).

    Args:
        model_name_or_path: the teacher model.
        top_k: how many of its most likely tokens to keep per position.
        logprob_chunk_size: loss tokens projected to the vocabulary at once; ``auto``: planned from the memory budget
            (see ``topk``).
        trust_remote_code: allow the model folder to run its own code.
    """

    def __init__(
        self,
        model_name_or_path: str,
        top_k: int,
        logprob_chunk_size: ChunkSize = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(model_name_or_path, logprob_chunk_size=logprob_chunk_size, trust_remote_code=trust_remote_code)
        self.top_k = top_k

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """``PearModule.predict_step``'s keys, plus the flat [N, k] ``teacher_topk_ids`` / ``teacher_topk_logprobs``
        and [N] ``teacher_tail_logprob`` of the response tokens."""
        ids, mask = batch["input_ids"], batch["loss_mask"]
        logp, top_ids, values, tail = teacher_topk(self.model, batch, self.top_k, self.chunk_size, self.scoring)
        scored = {"token_ids": ids[mask], "logprobs": logp[mask], "lengths": mask.sum(dim=1)}
        return {"ids": batch["ids"], **scored, **dict(zip(TEACHER_COLUMNS, (top_ids.int(), values, tail)))}


def teacher_entry(path: str, top_k: int, dtype: str, tokenizer: PreTrainedTokenizerBase, trust: bool) -> dict:
    """The manifest's ``teacher``: model, config hash, K, dtype, vocabulary size.

    Raises:
        PearError: if ``top_k`` < 1, the dtype is unknown, or the teacher's tokenizer has another vocabulary than the
            run's (its token ids would mean other strings).
    """
    if top_k < 1 or dtype not in TEACHER_DTYPES:
        raise PearError(f"--teacher_top_k must be >= 1 and --teacher_dtype one of {list(TEACHER_DTYPES)}")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    except LOAD_ERRORS as err:
        raise load_error("--teacher", path, "a model config", err) from err
    try:
        own = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except (*LOAD_ERRORS, ValueError):
        own = None  # a folder without tokenizer files: the run's tokenizer is taken as the teacher's
    if own is not None and own.get_vocab() != tokenizer.get_vocab():
        raise PearError(
            f"--teacher {path}: its tokenizer's vocabulary ({len(own)} tokens) is not the run's ({len(tokenizer)}); "
            "distillation compares the teacher's and the student's probabilities token id by token id, so the "
            "teacher must share the student's tokenizer"
        )
    vocab = getattr(config, "vocab_size", None) or len(tokenizer)
    return {
        "model": path,
        "model_config_fingerprint": model_fingerprint(config.to_dict()),
        "top_k": min(top_k, vocab),
        "dtype": dtype,
        "vocab_size": vocab,
    }


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


def check_teacher(kind: str, logprobs_path: str | None) -> None:
    """Refuse, before ``fit`` starts, a distillation loss (``model.loss`` kl or nll+kl) without a cache that can hold
    the teacher's top-k (a folder with no finished cache is left to the cache's own error).

    Raises:
        PearError: naming ``model.loss``, the cache, and how to make one with a teacher.
    """
    if kind == "nll":
        return
    if not logprobs_path:
        raise PearError(
            f"model.loss {kind}: needs the teacher's top-k log-probs and data.logprobs_path is not set; {MAKE_CACHE}"
        )
    manifest = read_manifest(Path(logprobs_path)) if Path(logprobs_path).is_dir() else None
    if manifest is not None and not manifest.get("teacher"):
        raise PearError(
            f"model.loss {kind}: data.logprobs_path={logprobs_path} holds behaviour log-probs only (it was made "
            f"without --teacher_top_k); {MAKE_CACHE}"
        )
