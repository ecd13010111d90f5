"""``leanattn::decode_into`` as a torch custom op, so compiled models keep the call in one graph."""

from __future__ import annotations

from typing import Optional

import torch

from .api import launch

__all__ = ["decode_into"]


@torch.library.custom_op("leanattn::decode_into", mutates_args=("out", "lse"))
def decode_into(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    lse: Optional[torch.Tensor],
    cache_seqlens: Optional[torch.Tensor],
    block_table: Optional[torch.Tensor],
    softmax_scale: float,
    num_programs: int,
    cache_leftpad: Optional[torch.Tensor] = None,
) -> None:
    """Write decode attention into ``out`` (and ``lse``); ``num_programs`` 0 means the default."""
    launch(q, k_cache, v_cache, out, lse, cache_seqlens, block_table, softmax_scale, num_programs or None,
           cache_leftpad=cache_leftpad)


@decode_into.register_fake
def _decode_into_fake(q, k_cache, v_cache, out, lse, cache_seqlens, block_table, softmax_scale, num_programs,
                      cache_leftpad=None) -> None:
    return None
