"""Distillation's log-probs over the whole vocabulary: a teacher's top k at each scored position, and a student's
log-probs at given ids with the log-mass outside them, in fp32.

Both score a collated batch on the log-prob path of ``logprobs``: the model's inputs from
``attention.model_inputs`` (padded or packed rows), the hidden states of the scored flat positions only
(``logprobs.scored_states``), projected to the vocabulary in chunks planned by ``logprobs.chunk_plan``. Unlike the
target's log-prob (``TargetLogSoftmax``), the top k and the tail need each chunk's full fp32 log-softmax, so ``auto``
plans with ``TOPK_ITEMSIZE`` bytes per logit: smaller chunks, the same ``plan_chunks`` rule (all kept when they fit
the budget, else the largest that fit, recomputed in backward); a number is a fixed chunk, recomputed. Outputs are in
the order of the scored positions (row-major; in packed rows, sequence by sequence as laid out).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from pear_lightning.model.attention import model_inputs
from pear_lightning.model.logprobs import (
    ChunkSize,
    batch_scored,
    chunk_plan,
    map_chunks,
    row_logprobs,
    scatter_scored,
    scored_states,
)
from pear_lightning.sampling import SamplingSettings

Batch = dict[str, Any]  # a collated batch (``collate``)
# Bytes per logit of a top-k chunk, as an item size for ``plan_chunks`` (2 · 18 + 4 = 40): the logits and their fp32
# copy, the log-softmax, the tail's masked copies and logsumexp, and in backward their gradients.
TOPK_ITEMSIZE = 18


def tail_logprob(logp: Tensor, ids: Tensor) -> Tensor:
    """log of the probability mass outside ``ids``: logsumexp of ``logp`` [N, V] over the other tokens, [N]; -inf
    (with a zero gradient) where ``ids`` [N, k] cover the whole vocabulary."""
    outside = logp.scatter(-1, ids, float("-inf"))
    empty = torch.isneginf(outside).all(dim=-1, keepdim=True)  # k = V: no tail (a logsumexp of -inf has NaN grads)
    tail = torch.logsumexp(outside.masked_fill(empty, 0.0), dim=-1)
    return tail.masked_fill(empty.squeeze(-1), float("-inf"))


def _chunk_topk(head: nn.Module, hidden: Tensor, targets: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The targets' log-probs, the log-probs at the given top-k ``ids`` and the log-mass outside them (fp32)."""
    logp = torch.log_softmax(head(hidden).float(), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), logp.gather(-1, ids), tail_logprob(logp, ids)


def _chunk_teacher(
    head: nn.Module, hidden: Tensor, targets: Tensor, sampling: SamplingSettings | None, k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The targets' log-probs under ``sampling`` (as ``target_logprobs`` computes them: a teacher that is also the
    behaviour model gives the cache the same ``logprobs``), and the raw distribution's top-k ids, log-probs and tail."""
    logits = head(hidden)
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    values, ids = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
    return row_logprobs(logits, targets, sampling), ids, values, tail_logprob(logp, ids)


def _project(
    fn: Callable[..., Any],
    model: nn.Module,
    batch: Batch,
    chunk_size: ChunkSize,
    *rows: Any,
    const: tuple = (),
) -> tuple[Tensor, list[Any]]:
    """The batch's scored positions (flat) and ``fn``'s outputs over chunks of them (``rows`` indexed by scored
    position, then ``const``)."""
    inputs = model_inputs(batch, model.config._attn_implementation)
    scored = batch_scored(batch)
    targets = inputs["input_ids"].flatten()[scored]
    states, head = scored_states(model, inputs, scored, chunk_size)
    if head is None:  # the plain path: the model's own logits, all at once
        return scored, [fn(nn.Identity(), states, targets, *rows, *const)]
    plan = chunk_plan(head, states, chunk_size, TOPK_ITEMSIZE)
    return scored, map_chunks(fn, head, states, (targets, *rows), plan, *const)


def topk_logprobs(
    model: nn.Module, batch: Batch, ids: Tensor, chunk_size: ChunkSize = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """The student's side of distillation.

    Args:
        model: a Hugging Face causal LM (optionally wrapped by peft).
        batch: a collated batch, padded or packed (``collate``).
        ids: [N, k] token ids per scored position (N: the scored positions, in order), e.g. a teacher's top k.
        chunk_size: as for ``logprobs.target_logprobs``.

    Returns:
        [B, T] log-probs of the targets (as ``target_logprobs``), [N, k] log-probs at ``ids`` and [N] the log-mass
        outside them, float32, differentiable w.r.t. the model.
    """
    scored, parts = _project(_chunk_topk, model, batch, chunk_size, ids)
    logp, at_ids, tail = (torch.cat(p) for p in zip(*parts))
    return scatter_scored(logp, scored, batch["loss_mask"].shape), at_ids, tail


def teacher_topk(
    model: nn.Module, batch: Batch, k: int, chunk_size: ChunkSize = "auto", sampling: SamplingSettings | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A teacher's side of distillation: per scored position of ``batch``, its ``k`` most likely next tokens.

    Returns:
        [B, T] log-probs of the targets under ``sampling`` (as ``target_logprobs``); and, of the raw distribution,
        [N, k] top-k ids (long) and log-probs, most likely first, and [N] the log-mass outside them (-inf when k is
        the vocabulary). k larger than the vocabulary is taken as the vocabulary.
    """
    scored, parts = _project(_chunk_teacher, model, batch, chunk_size, const=(sampling, k))
    logp, ids, values, tail = (torch.cat(p) for p in zip(*parts))
    return scatter_scored(logp, scored, batch["loss_mask"].shape), ids, values, tail
