"""Distillation through the strategy contract: each loss token's loss is a forward KL(teacher ‖ student) over the
teacher's cached top-k tokens plus one bucket for the rest of the vocabulary, weighted by any strategy.

The teacher's distribution at a loss position is known only at its top k (ids and log-probs, from the cache) and as
one number for the rest, the log-mass outside them. So the KL is taken between the two distributions *bucketed* the
same way, k + 1 outcomes (each top-k token, and "any other token"):

    KL_t = Σ_{i ≤ k} q_i (log q_i − log p_i) + q_tail (log q_tail − log p_tail)

with the student's p at the same ids and its own tail mass p_tail = 1 − Σ_{i ≤ k} p_i, both from the memory-lean
projection (``topk.topk_logprobs``). It is a true KL (≥ 0, 0 exactly when the buckets agree), a lower bound of
the full KL that equals it when k is the vocabulary, and its gradient w.r.t. a top-k logit is p_i − q_i, as for the
dense KL. The teacher's k + 1 log-probs are renormalised first (fp16 storage rounds them).

The weighting strategies see the usual ``TokenBatch`` (the student's log-prob of the data token, the behaviour
log-probs), so importance ratios are π_θ(y_t)/π_β(y_t) as always; the token's loss they weight becomes KL_t
(``kl``) or −log π_θ(y_t) + KL_t (``nll+kl``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pear_lightning.data.cache import MAKE_CACHE, TEACHER_COLUMNS
from pear_lightning.errors import PearError
from pear_lightning.model.logprobs import ChunkSize, batch_scored
from pear_lightning.model.topk import topk_logprobs
from pear_lightning.strategies import TokenBatch

LossKind = Literal["nll", "kl", "nll+kl"]


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher's distribution at each loss token of a batch (N: the loss tokens, row by row, in order).

    Attributes:
        ids: [N, k] long, the teacher's k most likely next tokens.
        logprobs: [N, k] float32, their log-probs.
        tail: [N] float32, the log of the teacher's probability mass outside them (-inf when k is the vocabulary).
    """

    ids: Tensor
    logprobs: Tensor
    tail: Tensor


def teacher_of(batch: dict[str, Any]) -> TeacherTopK | None:
    """The teacher's top-k of a collated batch, or None if it has none."""
    if TEACHER_COLUMNS[0] not in batch:
        return None
    return TeacherTopK(*(batch[c] for c in TEACHER_COLUMNS))


def bucket_kl(student_topk: Tensor, student_tail: Tensor, teacher: TeacherTopK) -> Tensor:
    """Per-token KL(q ‖ p) over the k + 1 buckets (see the module's docstring).

    Args:
        student_topk: [N, k] the student's log-probs at ``teacher.ids``, with grad.
        student_tail: [N] the student's log-mass outside them, with grad.
        teacher: the teacher's top-k (no grad).

    Returns:
        [N] float32, ≥ 0 up to rounding.
    """
    log_q = torch.cat([teacher.logprobs.float(), teacher.tail.float().unsqueeze(-1)], dim=-1)
    log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
    log_p = torch.cat([student_topk, student_tail.unsqueeze(-1)], dim=-1)
    present = log_q > float("-inf")  # an empty bucket (the tail when k = V) adds 0, with a zero gradient
    log_q, log_p = log_q.masked_fill(~present, 0.0), log_p.masked_fill(~present, 0.0)
    return (log_q.exp() * present * (log_q - log_p)).sum(dim=-1)


def at_scored(teacher: TeacherTopK, loss_mask: Tensor, scored: Tensor) -> TeacherTopK:
    """The teacher's rows of the scored positions: the batch holds one per loss token, in the loss tokens' order
    (row-major, as collation lays them out), and a loss token with no prediction (a sequence's first) is not scored."""
    if len(teacher.ids) == len(scored):
        return teacher
    rows = (loss_mask.flatten().cumsum(0) - 1)[scored]
    return TeacherTopK(teacher.ids[rows], teacher.logprobs[rows], teacher.tail[rows])


def per_token_loss(kind: LossKind, tokens: TokenBatch, kl: Tensor, scored: Tensor) -> Tensor:
    """The [B, T] loss of each token that the strategy's weights multiply: KL_t, or −log π_θ(y_t) + KL_t (``kl`` [N]
    at the ``scored`` flat positions)."""
    kl_bt = torch.zeros_like(tokens.logp).flatten().index_put((scored,), kl).view_as(tokens.logp)
    return kl_bt if kind == "kl" else kl_bt - tokens.logp


def kl_metrics(kl: Tensor, student_topk: Tensor, student_tail: Tensor, teacher: TeacherTopK) -> dict[str, Tensor]:
    """Diagnostics of the KL term, logged as ``train/<name>``: its token mean and maximum, the teacher's and the
    student's probability mass outside the teacher's top k, and how often the student's most likely token among
    them is the teacher's."""
    if len(kl) == 0:
        return {}
    agree = student_topk.argmax(dim=-1) == teacher.logprobs.argmax(dim=-1)
    return {
        "kl": kl.mean(),
        "kl_max": kl.max(),
        "teacher_tail_mass": teacher.tail.float().exp().mean(),
        "student_tail_mass": student_tail.exp().mean(),
        "top1_agreement": agree.float().mean(),
    }


def score(
    model: nn.Module, batch: dict[str, Any], kind: LossKind, chunk_size: ChunkSize, metrics: bool = True
) -> tuple[TokenBatch, Tensor, dict[str, Tensor]]:
    """Score a batch, padded or packed, for distillation: the strategy's ``TokenBatch``, the per-token loss its weights
    multiply, and (when ``metrics``: logging steps) the KL's diagnostics.

    Raises:
        PearError: if the batch has no teacher top-k, or a teacher id the student's vocabulary lacks.
    """
    teacher = teacher_of(batch)
    if teacher is None:
        raise PearError(f"model.loss {kind}: the training data has no teacher top-k log-probs; {MAKE_CACHE}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and len(teacher.ids) and int(teacher.ids.max()) >= vocab:
        raise PearError(
            f"model.loss {kind}: the teacher's top-k holds token id {int(teacher.ids.max())}, outside the student's "
            f"vocabulary of {vocab} (examples {batch['ids']}); teacher and student must share the tokenizer"
        )
    mask, scored = batch["loss_mask"], batch_scored(batch)
    teacher = at_scored(teacher, mask, scored)
    logp, student_topk, student_tail = topk_logprobs(model, batch, teacher.ids, chunk_size)
    tokens = TokenBatch(logp, mask, batch.get("behavior_logp"), segment_ids=batch.get("segment_ids"))
    kl = bucket_kl(student_topk, student_tail, teacher)
    with torch.no_grad():
        diagnostics = kl_metrics(kl, student_topk, student_tail, teacher) if metrics else {}
    return tokens, per_token_loss(kind, tokens, kl, scored), diagnostics
