"""Per-token log-probs of the target tokens under a causal LM, in fp32, without full-vocabulary logits.

The memory-lean path runs the decoder, keeps the hidden states of the loss positions only, and
turns them into ``logit[y] − logsumexp(logits)`` in fp32, ``chunk_size`` tokens at a time; each
chunk is recomputed in backward (activation checkpointing), so at most one chunk's [chunk, V]
logits are alive at once and the lm_head gradient accumulates chunk by chunk. Models whose logits
are not a plain linear map of the last hidden state (soft-capping, logit scaling, a bias) take
the plain path: the model's own logits, of which only the loss positions are turned into fp32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .processing import SamplingSettings, processed_logprobs

# Config attributes that make the logits something other than lm_head(hidden).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def separable_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """The decoder and the lm_head of a causal LM whose logits are ``lm_head(decoder(x))``, else None."""
    config = getattr(model, "config", None)
    if config is None or any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or decoder is model or not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    return decoder, head


def _chunk_logprobs(
    head: nn.Module, hidden: Tensor, targets: Tensor, sampling: SamplingSettings | None = None
) -> Tensor:
    return processed_logprobs(head(hidden), targets, sampling)


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
    """The targets' log-probs under ``sampling``, and the raw distribution's top-k ids, log-probs and tail."""
    logits = head(hidden).float()
    logp = torch.log_softmax(logits, dim=-1)
    values, ids = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
    return processed_logprobs(logits, targets, sampling), ids, values, tail_logprob(logp, ids)


def _loss_positions(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, scored: Tensor, chunk_size: int
) -> tuple[Tensor, nn.Module, int]:
    """What the vocabulary projection of the loss positions starts from: the decoder's hidden states and the
    lm_head (memory-lean path), or the model's own logits and an identity (plain path: chunk 0, all at once)."""
    parts = separable_head(model) if chunk_size > 0 else None
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[:, :-1][scored], nn.Identity(), 0
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return hidden[:, :-1][scored], head, chunk_size


def _chunked(fn: Any, head: nn.Module, selected: Tensor, rows: tuple[Tensor, ...], chunk: int, *const: Any) -> list:
    """``fn(head, hidden, *rows, *const)`` over chunks of ``chunk`` loss positions, each recomputed in backward
    when it needs a gradient (``chunk`` 0: one call, nothing recomputed); one output (a tensor or a tuple) per call."""
    if chunk <= 0:
        return [fn(head, selected, *rows, *const)] if len(selected) else []
    outputs = []
    for start in range(0, len(selected), chunk):
        h, parts = selected[start : start + chunk], [r[start : start + chunk] for r in rows]
        if torch.is_grad_enabled() and h.requires_grad:
            outputs.append(checkpoint(fn, head, h, *parts, *const, use_reentrant=False))
        else:
            outputs.append(fn(head, h, *parts, *const))
    return outputs


def _scatter(values: Tensor, scored: Tensor) -> Tensor:
    """[N] values of the loss positions as [B, T] aligned with ``input_ids`` (0 elsewhere)."""
    out = torch.zeros((scored.shape[0], scored.shape[1] + 1), dtype=torch.float32, device=scored.device)
    return out.masked_scatter(nn.functional.pad(scored, (1, 0)), values)


def target_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    chunk_size: int = 256,
    sampling: SamplingSettings | None = None,
) -> Tensor:
    """Return log π(input_ids[b, t] | input_ids[b, :t]) at every loss position, zero elsewhere.

    Args:
        model: a Hugging Face causal LM (optionally wrapped by peft).
        input_ids: [B, T] token ids.
        attention_mask: [B, T], True on real tokens.
        loss_mask: [B, T], True on the tokens to score; position 0 has no prediction and must be False.
        chunk_size: loss tokens per fp32 logits chunk; 0 takes the plain path (the model's full logits).
        sampling: score under a sampler's processed distribution (temperature, top-k, top-p, min-p), chunk by chunk;
            -inf for a token outside its kept set. None: the model's own log-softmax.

    Returns:
        [B, T] float32 log-probs aligned with ``input_ids``, differentiable w.r.t. the model.
    """
    scored = loss_mask[:, 1:]
    targets = input_ids[:, 1:][scored]
    selected, head, chunk = _loss_positions(model, input_ids, attention_mask, scored, chunk_size)
    chunks = _chunked(_chunk_logprobs, head, selected, (targets,), chunk, sampling)
    logp = torch.cat(chunks) if chunks else selected.new_zeros(0, dtype=torch.float32)
    return _scatter(logp, scored)


def topk_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, ids: Tensor, chunk_size: int = 256
) -> tuple[Tensor, Tensor, Tensor]:
    """The student's side of distillation, on the same memory-lean path as ``target_logprobs``.

    Args:
        model, input_ids, attention_mask, loss_mask, chunk_size: as for ``target_logprobs``.
        ids: [N, k] token ids per loss position (N: the loss tokens in row-major order), e.g. a teacher's top k.

    Returns:
        [B, T] log-probs of the targets (as ``target_logprobs``), [N, k] log-probs at ``ids`` and [N] the log-mass
        outside them, float32, differentiable w.r.t. the model.
    """
    scored = loss_mask[:, 1:]
    targets = input_ids[:, 1:][scored]
    selected, head, chunk = _loss_positions(model, input_ids, attention_mask, scored, chunk_size)
    parts = _chunked(_chunk_topk, head, selected, (targets, ids), chunk)
    empty = selected.new_zeros(0, dtype=torch.float32)
    logp, at_ids, tail = (torch.cat(p) for p in zip(*parts)) if parts else (empty, empty.view(0, ids.shape[1]), empty)
    return _scatter(logp, scored), at_ids, tail


def teacher_topk(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    k: int,
    chunk_size: int = 256,
    sampling: SamplingSettings | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A teacher's side of distillation: per loss position, its ``k`` most likely next tokens.

    Returns:
        [B, T] log-probs of the targets under ``sampling`` (as ``target_logprobs``); and, of the raw distribution,
        [N, k] top-k ids (long) and log-probs, most likely first, and [N] the log-mass outside them (-inf when k is
        the vocabulary). k larger than the vocabulary is taken as the vocabulary.
    """
    scored = loss_mask[:, 1:]
    targets = input_ids[:, 1:][scored]
    selected, head, chunk = _loss_positions(model, input_ids, attention_mask, scored, chunk_size)
    parts = _chunked(_chunk_teacher, head, selected, (targets,), chunk, sampling, k)
    if not parts:
        empty = selected.new_zeros(0, dtype=torch.float32)
        return _scatter(empty, scored), empty.view(0, k).long(), empty.view(0, k), empty
    logp, ids, values, tail = (torch.cat(p) for p in zip(*parts))
    return _scatter(logp, scored), ids, values, tail
