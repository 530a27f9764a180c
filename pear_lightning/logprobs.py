"""Per-token log-probs of the target tokens under a causal LM, in fp32."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def target_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> Tensor:
    """Return log π(input_ids[b, t] | input_ids[b, :t]) at every loss position, zero elsewhere.

    Only the logits of loss positions are turned into fp32 log-softmax, so prompt and padding
    positions cost no fp32 vocabulary-sized work.

    Args:
        model: a Hugging Face causal LM.
        input_ids: [B, T] token ids.
        attention_mask: [B, T], True on real tokens.
        loss_mask: [B, T], True on the tokens to score; position 0 has no prediction and must be False.

    Returns:
        [B, T] float32 log-probs aligned with ``input_ids``, differentiable w.r.t. the model.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    scored = loss_mask[:, 1:]
    selected = logits[:, :-1][scored].float()
    logp = torch.log_softmax(selected, dim=-1).gather(-1, input_ids[:, 1:][scored].unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    return out.masked_scatter(nn.functional.pad(scored, (1, 0)), logp)
