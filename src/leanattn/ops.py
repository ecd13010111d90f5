"""``leanattn::decode_into`` as a torch custom op, so compiled models keep the call in one graph."""

from __future__ import annotations

from typing import Optional

import torch

from .api import FP8_DTYPES, launch, resolve_features

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
    causal: bool = True,
    window_size: Optional[list[int]] = None,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    k_scale_value: float = 1.0,
    v_scale_value: float = 1.0,
) -> None:
    """Write decode attention into ``out`` (and ``lse``); ``num_programs`` 0 means the default.
    Arguments as in ``leanattn.decode`` (validated there); an fp8 cache's scales as (kv_heads,)
    tensors, or as floats when the tensors are None."""
    window = tuple(window_size) if window_size is not None else (-1, -1)
    fp8 = k_cache.dtype in FP8_DTYPES
    k_scale = (k_scale if k_scale is not None else k_scale_value) if fp8 else None
    v_scale = (v_scale if v_scale is not None else v_scale_value) if fp8 else None
    features, ks, vs = resolve_features(q, k_cache, causal, window, softcap, sinks, k_scale, v_scale)
    launch(q, k_cache, v_cache, out, lse, cache_seqlens, block_table, softmax_scale, num_programs or None,
           cache_leftpad=cache_leftpad, features=features, sinks=sinks, k_scale=ks, v_scale=vs)


@decode_into.register_fake
def _decode_into_fake(q, k_cache, v_cache, out, lse, cache_seqlens, block_table, softmax_scale, num_programs,
                      cache_leftpad=None, causal=True, window_size=None, softcap=0.0, sinks=None, k_scale=None,
                      v_scale=None, k_scale_value=1.0, v_scale_value=1.0) -> None:
    return None
