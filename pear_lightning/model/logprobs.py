"""Per-token log-probs of the target tokens under a causal LM, in fp32, without full-vocabulary fp32 logits.

The memory-lean path runs the decoder, keeps the hidden states of the scored positions only, and
projects them to the vocabulary. Their log-softmax at the target is taken in fp32 by
``TargetLogSoftmax``, which saves only the logits (in the compute dtype: bf16 under bf16-mixed) and
recomputes the softmax in backward, so the fp32 working set is one chunk of rows.
``chunk_size="auto"`` sizes that chunk from a memory budget: when the logits of all loss tokens fit,
one pass, kept for backward (the fastest); otherwise the largest chunk that fits, each chunk's
projection recomputed in backward (activation checkpointing), so at most one chunk's logits are alive.
Models whose logits are not a plain linear map of the last hidden state (soft-capping, logit scaling,
a bias) take the plain path: the model's own logits, of which only the scored positions are used.
Under a sampler's settings (``sampling``, for scoring π_β) the rows go through ``processing`` instead.

Indexing is by flat positions (``scored_positions``), which collation computes on the CPU, so no
step of this path waits for the device. Distillation's top-k log-probs (``topk``) take the same path:
``scored_states``, chunks from ``chunk_plan`` (with their own bytes per logit), ``map_chunks``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pear_lightning.data.collate import scored_positions
from pear_lightning.model.attention import model_inputs
from pear_lightning.sampling import SamplingSettings, processed_logprobs

# Config attributes that make the logits something other than lm_head(hidden).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
CUDA_BUDGET_FRACTION = 0.5  # of the device memory free when the log-probs are computed
CPU_BUDGET_BYTES = 1 << 30
MIN_CHUNK = 128
# Bytes per logit a sampler's processing takes (fp32 copies, a sort's values and int64 indices, a cumulative sum),
# passed to ``plan_chunks`` as an item size: 2 · 12 + 4 = 28.
PROCESSED_ITEMSIZE = 12

ChunkSize = int | Literal["auto"]


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


class TargetLogSoftmax(torch.autograd.Function):
    """``log_softmax(logits.float())[i, targets[i]]`` for every row, saving only ``logits`` (in their dtype).

    Backward recomputes the fp32 softmax and returns ``g · (onehot − softmax)`` in the logits' dtype, so no fp32
    [N, V] tensor outlives the call. Callers bound N (see ``plan_chunks``).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        ctx.save_for_backward(logits, targets)
        with torch.autocast(logits.device.type, enabled=False):
            return torch.log_softmax(logits, dim=-1, dtype=torch.float32).gather(1, targets[:, None]).squeeze(1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, targets = ctx.saved_tensors
        with torch.autocast(logits.device.type, enabled=False):
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32).mul_(-grad[:, None])
            return probs.scatter_add_(1, targets[:, None], grad[:, None]).to(logits.dtype), None


def memory_budget(device: torch.device) -> int:
    """Bytes the log-prob path may use: a fraction of the free CUDA memory (the allocator's cache included),
    or a fixed budget on other devices."""
    if device.type != "cuda":
        return CPU_BUDGET_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(CUDA_BUDGET_FRACTION * (free + cached))


def plan_chunks(num_tokens: int, vocab: int, itemsize: int, budget: int) -> tuple[int, bool]:
    """Rows per chunk and whether the logits are kept for backward (one pass) rather than recomputed.

    A chunk of ``c`` rows needs its logits and their gradient (``itemsize`` bytes each) and one fp32 working
    copy: ``c · vocab · (2 · itemsize + 4)`` bytes. When all ``num_tokens`` rows fit the budget they are one
    chunk, kept; otherwise chunks of the largest size that fits (at least ``MIN_CHUNK``), recomputed.
    """
    rows = max(budget // (vocab * (2 * itemsize + 4)), 1)
    if num_tokens <= rows:
        return max(num_tokens, 1), True
    return max(rows, MIN_CHUNK), False


def _compute_itemsize(weight: Tensor) -> int:
    device = weight.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return dtype.itemsize


def row_logprobs(logits: Tensor, targets: Tensor, sampling: SamplingSettings | None) -> Tensor:
    if sampling is None or sampling.raw:
        return TargetLogSoftmax.apply(logits, targets)
    return processed_logprobs(logits, targets, sampling)


def _head_logprobs(head: nn.Module, hidden: Tensor, targets: Tensor, sampling: SamplingSettings | None) -> Tensor:
    return row_logprobs(head(hidden), targets, sampling)


def chunk_plan(head: nn.Linear, hidden: Tensor, chunk_size: ChunkSize, itemsize: int | None = None) -> tuple[int, bool]:
    """Rows per chunk of ``hidden`` and whether to keep them (see ``plan_chunks``): ``auto`` plans from the memory
    budget with ``itemsize`` bytes per logit (default: the compute dtype's); a number: chunks of it, recomputed."""
    if chunk_size != "auto":
        return chunk_size, False
    itemsize = itemsize or _compute_itemsize(head.weight)
    return plan_chunks(len(hidden), head.out_features, itemsize, memory_budget(hidden.device))


def map_chunks(
    fn: Callable[..., Any],
    head: nn.Module,
    hidden: Tensor,
    rows: tuple[Tensor, ...],
    plan: tuple[int, bool],
    *const: Any,
) -> list[Any]:
    """``fn(head, hidden, *rows, *const)`` over chunks of rows as ``plan`` says (``plan``'s (rows, keep)): kept, one
    call; else one call per chunk, recomputed in backward when it needs a gradient. One output per call, in order."""
    size, keep = plan
    if keep or not len(hidden):
        return [fn(head, hidden, *rows, *const)]
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    outputs = []
    for start in range(0, len(hidden), size):
        parts = [t[start : start + size] for t in (hidden, *rows)]
        outputs.append(
            checkpoint(fn, head, *parts, *const, use_reentrant=False) if recompute else fn(head, *parts, *const)
        )
    return outputs


def head_logprobs(
    head: nn.Linear,
    hidden: Tensor,
    targets: Tensor,
    chunk_size: ChunkSize = "auto",
    sampling: SamplingSettings | None = None,
) -> Tensor:
    """fp32 ``log_softmax(head(hidden))`` at ``targets``, in chunks of rows (see ``plan_chunks``).

    Args:
        head: the lm_head (no bias).
        hidden: [N, H] hidden states of the scored positions.
        targets: [N] the token ids they predict.
        chunk_size: rows per chunk, each recomputed in backward; ``auto`` chooses from the memory budget.
        sampling: score under a sampler's processed distribution (see ``processing``); None: the raw log-softmax.

    Returns:
        [N] float32 log-probs, differentiable w.r.t. ``hidden`` and the head.
    """
    processed = sampling is not None and not sampling.raw
    rows = chunk_plan(head, hidden, chunk_size, PROCESSED_ITEMSIZE if processed else None)
    return torch.cat(map_chunks(_head_logprobs, head, hidden, (targets,), rows, sampling))


def scored_states(
    model: nn.Module, inputs: dict[str, Tensor], scored: Tensor, chunk_size: ChunkSize
) -> tuple[Tensor, nn.Linear | None]:
    """What the vocabulary projection of the ``scored`` flat positions starts from: the decoder's hidden states at the
    positions before them and the lm_head (memory-lean path); or, on the plain path (chunk size 0, or a model whose
    logits are not a plain linear map), the model's own logits there and None."""
    parts = separable_head(model) if chunk_size != 0 else None
    if parts is None:
        logits = model(**inputs, use_cache=False).logits
        return logits.flatten(0, 1)[scored - 1], None
    decoder, head = parts
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    return hidden.flatten(0, 1)[scored - 1], head


def scatter_scored(values: Tensor, scored: Tensor, shape: torch.Size) -> Tensor:
    """[N] values at the ``scored`` flat positions as a float32 tensor of ``shape`` (0 elsewhere)."""
    out = torch.zeros(shape.numel(), dtype=torch.float32, device=scored.device)
    return out.index_put((scored,), values.float()).view(shape)


def batch_scored(batch: dict[str, Any]) -> Tensor:
    """A collated batch's ``scored`` positions (computed if absent), on the device of its loss mask."""
    mask, scored = batch["loss_mask"], batch.get("scored")
    return (scored_positions(mask, batch.get("position_ids")) if scored is None else scored).to(mask.device)


def target_logprobs(
    model: nn.Module,
    inputs: dict[str, Tensor],
    loss_mask: Tensor,
    chunk_size: ChunkSize = "auto",
    scored: Tensor | None = None,
    sampling: SamplingSettings | None = None,
) -> Tensor:
    """Return log π(input_ids[b, t] | the tokens before it in its sequence) at every scored loss position, else 0.

    Args:
        model: a Hugging Face causal LM (optionally wrapped by peft).
        inputs: the model's inputs: ``input_ids`` [B, T], and ``attention_mask`` or, for packed rows,
            ``position_ids`` (restarting at 0 for every sequence) and attention kwargs.
        loss_mask: [B, T], True on the tokens to score.
        chunk_size: loss tokens per chunk of the vocabulary projection, each recomputed in backward; ``auto``
            chooses from a memory budget (see ``plan_chunks``); 0 takes the plain path (the model's own logits).
        scored: ``scored_positions(loss_mask, position_ids)``, if already computed (on the CPU, by collation).
        sampling: score under a sampler's processed distribution (temperature, top-k, top-p, min-p); -inf for a
            token outside its kept set. None: the model's own log-softmax.

    Returns:
        [B, T] float32 log-probs aligned with ``input_ids``, differentiable w.r.t. the model.
    """
    if scored is None:
        scored = scored_positions(loss_mask, inputs.get("position_ids"))
    scored = scored.to(loss_mask.device)
    targets = inputs["input_ids"].flatten()[scored]
    states, head = scored_states(model, inputs, scored, chunk_size)
    if head is None:
        logp = row_logprobs(states, targets, sampling)
    else:
        logp = head_logprobs(head, states, targets, chunk_size, sampling)
    return scatter_scored(logp, scored, loss_mask.shape)


def response_logprobs(
    model: nn.Module, batch: dict[str, Any], chunk_size: ChunkSize = "auto", sampling: SamplingSettings | None = None
) -> dict[str, Any]:
    """What scoring a collated batch gives per example (``predict``'s output): ``ids``, the flat ``token_ids`` and fp32
    ``logprobs`` of the response tokens (under ``sampling``; -inf: outside its kept set) and each example's
    ``lengths`` (tensors: Lightning does not walk long Python lists)."""
    mask = batch["loss_mask"]
    inputs = model_inputs(batch, model.config._attn_implementation)
    logp = target_logprobs(model, inputs, mask, chunk_size, batch.get("scored"), sampling)
    return {"ids": batch["ids"], "token_ids": batch["input_ids"][mask], "logprobs": logp[mask], "lengths": mask.sum(1)}
