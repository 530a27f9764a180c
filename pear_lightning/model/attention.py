"""Attention over packed rows: each sequence attends only to itself.

Packed rows go to the model with ``position_ids`` restarting at 0 for every sequence and no
``attention_mask``; transformers' mask builders (``sdpa``, ``eager``) turn that into a
block-diagonal causal mask, and its FlashAttention kernels (``flash_attention_2``…) take the
sequence bounds as ``cu_seq_lens_*``. ``pear_varlen`` is the same varlen path through torch's own
FlashAttention kernel (``torch.nn.attention.varlen``, CUDA, bf16/fp16), so packed rows cost no
masked-out attention without the flash-attn package; any call it cannot serve (no sequence bounds,
another device, dropout, a sliding window) is SDPA's.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None

VARLEN = "pear_varlen"
# The signature this module calls (torch >= 2.13); older releases' differ.
VARLEN_AVAILABLE = varlen_attn is not None and {"window_size", "enable_gqa"} <= set(
    inspect.signature(varlen_attn).parameters
)


def model_inputs(batch: dict[str, Any], attn_implementation: str | None) -> dict[str, Any]:
    """The model inputs of a collated batch: padded rows with their attention mask; packed rows with the positions
    that keep their sequences apart and, for varlen kernels, the sequences' bounds (see ``collate``)."""
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if attn_implementation == VARLEN or "flash" in (attn_implementation or ""):
        bounds, longest = batch["cu_seq_lens"], batch["max_seq_len"]
        inputs |= {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}
    return inputs


def kernel_serves(query: Tensor, dropout: float, kwargs: dict[str, Any]) -> bool:
    """Whether torch's varlen kernel can take this call: CUDA, bf16/fp16 (or autocast), no dropout, no sliding
    window."""
    half = query.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(query.device.type)
    cuda = query.device.type == "cuda"
    return VARLEN_AVAILABLE and cuda and half and not dropout and not kwargs.get("sliding_window")


def varlen_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: Tensor | None = None,
    cu_seq_lens_k: Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Causal attention over the sequences ``cu_seq_lens_*`` delimit in the flattened batch (transformers'
    attention-function interface: ``query`` [B, H, T, D], output [B, T, H, D])."""
    if cu_seq_lens_q is None or not kernel_serves(query, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    batch, heads, length, _ = query.shape
    # Rotary embeddings in fp32 promote q and k under autocast; the kernel takes the autocast dtype.
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    q, k, v = (x.transpose(1, 2).flatten(0, 1).to(dtype) for x in (query, key, value))  # [B·T, heads, D]
    out = varlen_attn(
        q,
        k,
        v,
        cu_seq_lens_q,
        cu_seq_lens_k,
        max_length_q,
        max_length_k,
        scale=scaling,
        window_size=(-1, 0),  # causal
        enable_gqa=k.shape[1] != heads,
    )
    return out.view(batch, length, heads, -1), None


AttentionInterface.register(VARLEN, varlen_attention)
AttentionMaskInterface.register(VARLEN, sdpa_mask)  # what the SDPA fallback needs
