"""Token batches from tokenised examples: padded rows, or packed rows of several examples; masks, positions, and the
behaviour log-probs and the teacher's top-k on the loss tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pear_lightning.data.cache import TEACHER_COLUMNS


def scored_positions(loss_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """Flat indices (into [B·T]) of the loss tokens that have a prediction: not the first of a row or, in packed
    rows, of a sequence (``position_ids`` 0)."""
    scored = loss_mask.clone()
    scored[:, 0] = False
    if position_ids is not None:
        scored &= position_ids != 0
    return scored.flatten().nonzero().squeeze(1)


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group examples into rows of at most ``capacity`` tokens (or the longest example's, if more) so that the batch,
    rows × longest row, is smallest: first fit in decreasing length, for every row width that would hold all the
    tokens in 1, 2, … rows; one example per row is among the candidates, so packing never grows a batch.

    Returns:
        The indices of the examples in each row, in the order they are laid out.
    """
    longest, total = max(lengths), sum(lengths)
    widths = {min(max(longest, -(-total // r)), max(capacity, longest)) for r in range(1, len(lengths) + 1)}
    layouts = [_first_fit(lengths, width) for width in sorted(widths)]
    return min(layouts, key=lambda rows: len(rows) * max(sum(lengths[i] for i in row) for row in rows))


def _first_fit(lengths: list[int], width: int) -> list[list[int]]:
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def collate(rows: list[dict[str, Any]], pad_id: int, pack_length: int | None = None) -> dict[str, Any]:
    """Lay tokenised examples out as a batch: one per row, right-padded to the longest; or, with ``pack_length``,
    packed several to a row (``pack``), each with positions restarting at 0, so the batch has fewer padding tokens.

    Args:
        rows: examples with ``id``, ``input_ids`` and ``loss_mask`` (lists of equal length), and, after the join,
            ``behavior_logp``: one log-prob per loss token, in order; from a mixture, ``source``: the source's index.
        pad_id: the token id of padding.
        pack_length: pack the examples into rows of at most this many tokens; None: one example per row.

    Returns:
        ``input_ids`` [R, T] long, ``attention_mask`` (True on real tokens) and ``loss_mask`` [R, T] bool, ``ids``,
        ``num_tokens`` (real tokens in the batch), ``scored`` (``logprobs.scored_positions``) and, when the rows
        have them, ``behavior_logp`` [R, T] float32 (0 off the loss tokens) and the teacher's top-k
        (``distill.TEACHER_COLUMNS``, flat over the loss tokens in their order in the batch), and ``source`` [len(rows)]
        long, each example's source in a mixture (example i is row i, or segment i when packed). Packed batches add
        ``position_ids`` [R, T] (each example's, and the padding's, restarting at 0), ``segment_ids`` [R, T] (the
        example's index in ``rows``, -1 on padding) and, for varlen attention kernels, ``cu_seq_lens`` (int32 starts
        of every sequence, padding runs included, in the flattened batch, then its size) and ``max_seq_len``.
    """
    lengths = [len(r["input_ids"]) for r in rows]
    groups = [[i] for i in range(len(rows))] if pack_length is None else pack(lengths, pack_length)
    width = max(sum(lengths[i] for i in group) for group in groups)
    shape = (len(groups), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.bool)
    loss_mask = torch.zeros(shape, dtype=torch.bool)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    for r, group in enumerate(groups):
        start = 0
        for i in group:
            span = slice(start, start + lengths[i])
            input_ids[r, span] = torch.tensor(rows[i]["input_ids"])
            loss_mask[r, span] = torch.tensor(rows[i]["loss_mask"])
            position_ids[r, span] = torch.arange(lengths[i])
            segment_ids[r, span] = i
            start += lengths[i]
        attention_mask[r, :start] = True
        position_ids[r, start:] = torch.arange(width - start)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "ids": [r["id"] for r in rows],
        "num_tokens": sum(lengths),
        "scored": scored_positions(loss_mask, position_ids),
    }
    if "source" in rows[0]:
        batch["source"] = torch.tensor([r["source"] for r in rows], dtype=torch.long)
    if "behavior_logp" in rows[0]:
        behavior_logp = torch.zeros(shape, dtype=torch.float32)
        ordered = [lp for group in groups for i in group for lp in rows[i]["behavior_logp"]]
        behavior_logp[loss_mask] = torch.tensor(ordered, dtype=torch.float32)
        batch["behavior_logp"] = behavior_logp
    if TEACHER_COLUMNS[0] in rows[0]:  # the teacher's top-k of each loss token, as laid out: [N, k], [N, k], [N]
        ids, logprobs, tail = ([v for group in groups for i in group for v in rows[i][c]] for c in TEACHER_COLUMNS)
        batch[TEACHER_COLUMNS[0]] = torch.tensor(ids, dtype=torch.long).view(len(tail), -1)
        batch[TEACHER_COLUMNS[1]] = torch.tensor(logprobs, dtype=torch.float32).view(len(tail), -1)
        batch[TEACHER_COLUMNS[2]] = torch.tensor(tail, dtype=torch.float32)
    if pack_length is not None:
        starts = (position_ids.flatten() == 0).nonzero().squeeze(1)
        bounds = torch.cat([starts, torch.tensor([position_ids.numel()])])
        batch |= {
            "position_ids": position_ids,
            "segment_ids": segment_ids,
            "cu_seq_lens": bounds.int(),
            "max_seq_len": int(bounds.diff().max()),
        }
    return batch
