"""Token batches from tokenised examples: right padding, masks, and the behaviour log-probs on the loss tokens."""

from __future__ import annotations

from typing import Any

import torch

from .distill import TEACHER_COLUMNS


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Pad tokenised examples to the longest one (right padding).

    Args:
        rows: examples with ``id``, ``input_ids`` and ``loss_mask`` (lists of equal length), and, after the join,
            ``behavior_logp``: one log-prob per loss token, in order.
        pad_id: the token id of padding.

    Returns:
        ``input_ids`` [B, T] long, ``attention_mask`` and ``loss_mask`` [B, T] bool, ``ids``, ``num_tokens`` (real
        tokens in the batch) and, when the rows have them, ``behavior_logp`` [B, T] float32 (0 off the loss tokens) and
        the teacher's top-k (``distill.TEACHER_COLUMNS``, flat over the loss tokens).
    """
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        attention_mask[i, :n] = True
        loss_mask[i, :n] = torch.tensor(row["loss_mask"])
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "ids": [r["id"] for r in rows],
        "num_tokens": int(attention_mask.sum()),
    }
    if "behavior_logp" in rows[0]:
        behavior_logp = torch.zeros((len(rows), width), dtype=torch.float32)
        behavior_logp[loss_mask] = torch.tensor([lp for r in rows for lp in r["behavior_logp"]], dtype=torch.float32)
        batch["behavior_logp"] = behavior_logp
    if TEACHER_COLUMNS[0] in rows[0]:  # the teacher's top-k of each loss token, row by row: [N, k], [N, k], [N]
        ids, logprobs, tail = ([v for r in rows for v in r[c]] for c in TEACHER_COLUMNS)
        batch[TEACHER_COLUMNS[0]] = torch.tensor(ids, dtype=torch.long).view(len(tail), -1)
        batch[TEACHER_COLUMNS[1]] = torch.tensor(logprobs, dtype=torch.float32).view(len(tail), -1)
        batch[TEACHER_COLUMNS[2]] = torch.tensor(tail, dtype=torch.float32)
    return batch
