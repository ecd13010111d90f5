"""``leanattn::decode_into``, ``leanattn::mla_decode_into`` and ``leanattn::plan_shares`` as torch custom ops, so compiled models
keep the calls in one graph. Each launches through the same code as the eager path (``_call``,
``_plan``); arguments arrive validated by ``leanattn.decode`` and ``leanattn.plan_decode``."""

from __future__ import annotations

from typing import Optional

import torch

from . import _call, _mla_call
from ._checks import FP8_DTYPES
from ._features import resolve_features
from ._launch import grid_size, use_pdl
from ._plan import launch_plan
from ._workspace import workspace_for
from .kernels.plan import PLAN_FIELDS

__all__ = ["decode_into", "mla_decode_into", "new_plan", "plan_shares"]


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
    plan: Optional[torch.Tensor] = None,
    split: int = 0,
) -> None:
    """Write decode attention into ``out`` (and ``lse``); ``num_programs`` 0 means the default.
    Arguments as in ``leanattn.decode``; an fp8 cache's scales as float32 tensors of any of
    its kinds (the kind follows the tensor's dims), or as floats when the tensors are None;
    ``split``: tokens per split in batch-invariant mode (0: off)."""
    window = tuple(window_size) if window_size is not None else (-1, -1)
    fp8 = k_cache.dtype in FP8_DTYPES
    k_scale = (k_scale if k_scale is not None else k_scale_value) if fp8 else None
    v_scale = (v_scale if v_scale is not None else v_scale_value) if fp8 else None
    features, ks, vs = resolve_features(q, k_cache, causal, window, softcap, sinks, k_scale, v_scale)
    _call.decode_into(q, k_cache, v_cache, out, lse, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad,
                      block_table=block_table, sinks=sinks, k_scale=ks, v_scale=vs, plan=plan, features=features,
                      softmax_scale=softmax_scale, num_programs=num_programs or None, config=None, causal=causal,
                      window_size=window, split=split)


@decode_into.register_fake
def _decode_into_fake(q, k_cache, v_cache, out, lse, cache_seqlens, block_table, softmax_scale, num_programs,
                      cache_leftpad=None, causal=True, window_size=None, softcap=0.0, sinks=None, k_scale=None,
                      v_scale=None, k_scale_value=1.0, v_scale_value=1.0, plan=None, split=0) -> None:
    return None


def _default_grid(device: torch.device, heads: int, capacity: int, programs_per_sm: int,
                  large_programs_per_sm: int) -> int:
    """The heuristic's grid for a call of ``heads`` kv heads over at most ``capacity`` tokens: SMs
    x ``programs_per_sm``, or x ``large_programs_per_sm`` (when not 0) for a large call
    (``_call.large``)."""
    if large_programs_per_sm and _call.large(device, heads, capacity):
        programs_per_sm = large_programs_per_sm
    return grid_size(device, programs_per_sm)


def new_plan(
    cache_seqlens: Optional[torch.Tensor],
    cache_leftpad: Optional[torch.Tensor],
    batch: int,
    kv_heads: int,
    capacity: int,
    q_len: int,
    window_left: int,
    has_window: bool,
    tile: int,
    target_share: int,
    programs_per_sm: int,
    num_programs: int,
    device: torch.device,
    large_programs_per_sm: int = 0,
) -> torch.Tensor:
    """A new int32 (programs, PLAN_FIELDS) plan: every program's share of a grid of
    ``num_programs`` (0: the default grid of ``programs_per_sm``, or of ``large_programs_per_sm``
    when given and the call is large, found here, so compiled code never traces
    device queries) for runs dealing units of ``tile`` tokens, ``target_share`` per share: their
    launch config's tile and target, or in batch-invariant mode the split and 1
    (``_call.unit_of``). Arguments as resolved by ``leanattn.plan_decode``."""
    programs = num_programs or _default_grid(device, batch * kv_heads, capacity, programs_per_sm,
                                             large_programs_per_sm)
    # Every program writes its whole row; an empty batch launches nothing, so its plan is zeros.
    plan = (torch.empty if batch else torch.zeros)(programs, PLAN_FIELDS.value, dtype=torch.int32, device=device)
    # (The device workspace's tickets that decode's runs of this plan draw.)
    launch_plan(plan, programs, cache_seqlens, cache_leftpad, batch, kv_heads, capacity, q_len, window_left,
                has_window, tile, target_share, use_pdl(device),
                tickets=workspace_for(plan.device).planned_tickets())
    return plan


# The op torch.compile traces; eager code calls ``new_plan`` itself (the op's dispatch costs the
# host more than the plan kernel takes).
plan_shares = torch.library.custom_op("leanattn::plan_shares", mutates_args=())(new_plan)


@plan_shares.register_fake
def _plan_shares_fake(cache_seqlens, cache_leftpad, batch, kv_heads, capacity, q_len, window_left, has_window, tile,
                      target_share, programs_per_sm, num_programs, device, large_programs_per_sm=0) -> torch.Tensor:
    programs = num_programs or _default_grid(device, batch * kv_heads, capacity, programs_per_sm,
                                             large_programs_per_sm)
    return torch.empty(programs, PLAN_FIELDS.value, dtype=torch.int32, device=device)


@torch.library.custom_op("leanattn::mla_decode_into", mutates_args=("out", "lse"))
def mla_decode_into(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    rope_cache: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: Optional[torch.Tensor],
    cache_seqlens: Optional[torch.Tensor],
    cache_leftpad: Optional[torch.Tensor],
    block_table: Optional[torch.Tensor],
    kv_scale: Optional[torch.Tensor],
    kv_scale_value: float,
    head_dim_v: int,
    softmax_scale: float,
    causal: bool,
    num_programs: int,
    split: int,
) -> None:
    """Write MLA decode into ``out`` (and ``lse``); ``num_programs`` 0 means the default grid.
    Arguments as in ``leanattn.mla_decode``, validated there; an fp8 cache's scale as a float32
    tensor, or as a float when the tensor is None; ``split``: tokens per split in batch-invariant
    mode (0: off)."""
    fp8 = kv_cache.dtype in FP8_DTYPES
    scale = (kv_scale if kv_scale is not None else kv_scale_value) if fp8 else None
    _mla_call.mla_decode_into(q, kv_cache, rope_cache, out, lse, cache_seqlens=cache_seqlens,
                              cache_leftpad=cache_leftpad, block_table=block_table, kv_scale=scale,
                              head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal,
                              num_programs=num_programs or None, split=split, workspace=workspace_for(q.device))


@mla_decode_into.register_fake
def _mla_decode_into_fake(q, kv_cache, rope_cache, out, lse, cache_seqlens, cache_leftpad, block_table, kv_scale,
                          kv_scale_value, head_dim_v, softmax_scale, causal, num_programs, split) -> None:
    return None
