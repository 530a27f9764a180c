"""Per-token log-probs of the target tokens under a causal LM, in fp32, without full-vocabulary logits.

The memory-lean path runs the decoder, keeps the hidden states of the loss positions only, and
turns them into ``logit[y] − logsumexp(logits)`` in fp32, ``chunk_size`` tokens at a time; each
chunk is recomputed in backward (activation checkpointing), so at most one chunk's [chunk, V]
logits are alive at once and the lm_head gradient accumulates chunk by chunk. Models whose logits
are not a plain linear map of the last hidden state (soft-capping, logit scaling, a bias) take
the plain path: the model's own logits, of which only the loss positions are turned into fp32.
"""

from __future__ import annotations

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


def _chunk_logprobs(head: nn.Module, hidden: Tensor, targets: Tensor, sampling: SamplingSettings | None) -> Tensor:
    return processed_logprobs(head(hidden), targets, sampling)


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
    parts = separable_head(model) if chunk_size > 0 else None
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logp = _chunk_logprobs(nn.Identity(), logits[:, :-1][scored], targets, sampling)
    else:
        decoder, head = parts
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        selected = hidden[:, :-1][scored]
        chunks = []
        for start in range(0, len(targets), chunk_size):
            h, y = selected[start : start + chunk_size], targets[start : start + chunk_size]
            if torch.is_grad_enabled() and h.requires_grad:
                chunks.append(checkpoint(_chunk_logprobs, head, h, y, sampling, use_reentrant=False))
            else:
                chunks.append(_chunk_logprobs(head, h, y, sampling))
        logp = torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    return out.masked_scatter(nn.functional.pad(scored, (1, 0)), logp)
