"""Context parallel's exchange buffers: each rank's packed (output, LSE) partial and the records
every rank receives, with the collective that moves them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Buffers", "padded_words", "pack_views", "all_gather"]

# Words of 4 bytes each packed part is padded to: aligned parts let the merge load 16 bytes at once.
_ALIGN_WORDS = 16


@dataclass
class Buffers:
    """Collective buffers for one (batch, q_len), allocated once and reused by every run."""

    send: torch.Tensor  # fp32: this rank's packed partial, one record (replicated) or one per rank (scattered)
    recv: torch.Tensor  # fp32 (world, record words): the record every rank sent here
    o_send: torch.Tensor  # view of send where the local output goes (replicated: (B, T, H, D))
    lse_send: torch.Tensor  # view of send where the local LSE goes (replicated: (B, H, T))
    o_parts: torch.Tensor  # (world, B, T, H_out, D) view of recv, in q's dtype
    lse_parts: torch.Tensor  # (world, B, H_out, T) float32 view of recv
    staging: torch.Tensor | None  # scattered: (B, T, H, D) local output before it is dealt out
    lse_scratch: torch.Tensor  # (B, H_out, T) merged LSE when the caller doesn't want it
    # Global positions (plan(seqlens=...)): the local attention's lengths and key bounds, written
    # by every plan in place (a CUDA graph replays the plan into them).
    local_end: torch.Tensor  # int32 (B,)
    local_start: torch.Tensor  # int32 (B,)
    bounds: torch.Tensor  # int32 (B, T, 2)
    # exchange="symmetric": the push-merge's buffers in symmetric memory (else None).
    symmetric: object = None


def padded_words(elements: int, dtype: torch.dtype) -> int:
    """fp32 words holding ``elements`` of ``dtype``, rounded up to the alignment."""
    nbytes = elements * dtype.itemsize
    return -(-nbytes // (4 * _ALIGN_WORDS)) * _ALIGN_WORDS


def pack_views(buf: torch.Tensor, parts: int, part_words: int, shape_o: tuple, shape_l: tuple,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of ``parts`` packed records in the fp32 buffer ``buf``: outputs (parts, *shape_o) in
    ``dtype`` at the start of each record, LSEs (parts, *shape_l) fp32 after them."""
    n_o, n_l = math.prod(shape_o), math.prod(shape_l)
    words = buf.view(parts, part_words)
    o = words.view(dtype)[:, :n_o].unflatten(1, shape_o)
    off = padded_words(n_o, dtype)
    lse = words[:, off : off + n_l].unflatten(1, shape_l)
    return o, lse


def all_gather(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    # all_gather_single is the newer name; all_gather_into_tensor the one older releases have.
    # Flat buffers: gloo wants the output as one dimension, world * input size.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out.view(-1), inp.view(-1), group=group)
