"""Padding-free scoring: the real tokens of a padded batch packed into rows, one after another.

A batch padded to its longest sequence spends the padded positions' compute for nothing (a
third of the positions in the book's DPO batches). Packed, the sequences of lengths
``n_1, n_2, ...`` sit end to end in rows of ``width`` slots (first-fit decreasing), with
position ids that restart at 0 for each sequence: ``0..n_1-1, 0..n_2-1, ...``. Called with
these position ids and no attention mask, a ``transformers`` decoder (Llama, Qwen2 and the
models built on the same masking code) keeps each token's attention inside its own sequence:
flash-attention 2/3 on a GPU turns the restarts into variable-length attention
(``cu_seqlens``), SDPA and eager attention into a block-diagonal causal mask. Each token then
sees exactly what it sees in the padded batch, so the log-probabilities are the same up to
float round-off (``tests/test_packing.py``). The layout is here; scoring a packed batch is
:func:`rlcourse.models.scoring.packed_logprobs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PackedBatch", "pack_rows", "pack_sequences"]


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: the sequences ``0..len(lengths)-1`` in rows of at most ``width``
    tokens, longest first, each into the first row with room. Returns each row's sequences
    in the order they sit."""
    if any(n > width for n in lengths):
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit a row of {width}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


@dataclass
class PackedBatch:
    """A padded batch ``[B, L]`` packed into ``[R, W]``.

    ``input_ids`` and ``position_ids`` ``[R, W]`` (empty slots at a row's end: token
    ``pad_id``, positions ``0, 1, ...`` of a sequence of their own); ``slot`` ``[B, L]``: where
    each real token of the padded batch sits, as a flat index into the ``R * W`` slots (-1 on
    padding).
    """

    input_ids: Tensor
    position_ids: Tensor
    slot: Tensor


def pack_sequences(input_ids: Tensor, attention_mask: Tensor, width: int | None = None,
                   pad_id: int = 0) -> PackedBatch:
    """Pack the real tokens of each row of ``input_ids`` (those where ``attention_mask`` is 1,
    contiguous: left, right or no padding) into rows of ``width`` slots (default ``L``, the
    padded width: no row is longer than the batch it came from) by :func:`pack_rows`."""
    b, L = input_ids.shape
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    first = mask.int().argmax(1)
    if bool(((mask.cumsum(1) > 0) & ~mask & (mask.flip(1).cumsum(1).flip(1) > 0)).any()):
        raise ValueError("pack_sequences: an attention mask with holes inside a sequence")
    width = int(width or L)
    rows = pack_rows([int(n) for n in lengths], width)
    ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    pos = torch.zeros((len(rows), width), dtype=torch.long, device=input_ids.device)
    slot = torch.full((b, L), -1, dtype=torch.long, device=input_ids.device)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n, start = int(lengths[i]), int(first[i])
            ids[r, at:at + n] = input_ids[i, start:start + n]
            pos[r, at:at + n] = torch.arange(n, device=input_ids.device)
            slot[i, start:start + n] = r * width + at + torch.arange(n, device=input_ids.device)
            at += n
        pos[r, at:] = torch.arange(width - at, device=input_ids.device)  # the empty slots
    return PackedBatch(ids, pos, slot)
