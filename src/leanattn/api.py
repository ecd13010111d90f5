"""The public functions: ``decode``, ``plan_decode`` and ``reserve_workspace``.

Each checks its arguments (``_checks``, ``_features``), then builds and launches the kernel call
(``_call``), directly or, under torch.compile, through the custom ops (``ops``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _call, ops
from ._checks import (
    FP8_DTYPES, MAX_PAGE_SIZE, MAX_QUERY_ROWS, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, capacity_of,
    check_finite_values, check_layer_shape, check_lengths, check_lse_out, check_num_programs, check_pages,
    check_plan_lengths, check_tile_count, fail, max_query_rows, refuse_grad, softmax_scale_of, split_of,
    validate,
)
from ._features import resolve_features, window_bounds
from ._launch import default_num_programs
from ._plan import check_plan, plan_key, remember
from ._workspace import workspace_for
from .kernels import config as kernels_config
from .kernels.config import KernelConfig

__all__ = ["decode", "plan_decode", "reserve_workspace", "choose_config", "default_num_programs", "KernelConfig",
           "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES", "FP8_DTYPES", "MAX_QUERY_ROWS", "max_query_rows", "MAX_PAGE_SIZE"]


def choose_config(head_dim: int, kv_dtype: torch.dtype, rows: int, paged: bool = False,
                  batch_invariant: bool = False, large: bool = False) -> KernelConfig:
    """The launch heuristic's config for a cache of ``kv_dtype`` with ``head_dim``, ``rows``
    (q_len x group) query rows of a kv head, contiguous or ``paged`` (a block table), in the
    default or the ``batch_invariant`` mode, for a ``large`` call or not: what ``decode`` uses
    without ``config=``. A call is large with two kv heads (batch x kv_heads) or more whose
    64-token tiles at full capacity number more than 4 x the GPU's SMs. Not cached, so
    torch.compile traces it (plan_decode) without a warning; the launch path caches it."""
    return kernels_config.choose_config(head_dim, kv_dtype, rows, paged, batch_invariant, large)


def _check_config(config: object) -> None:
    if config is not None:
        if not isinstance(config, KernelConfig):
            fail(TypeError, f"config must be a leanattn.KernelConfig, got {type(config).__name__}")
        if torch.compiler.is_compiling():
            fail(ValueError, "config= is for eager calls; under torch.compile the heuristic's config is used")


def reserve_workspace(
    device: torch.device | str, q_heads: int, kv_heads: int, head_dim: int, kv_dtype: torch.dtype, *,
    q_len: int = 1, num_programs: int | None = None, batch_invariant: bool = False, split_size: int | None = None,
    batch: int = 0, capacity: int = 0,
) -> None:
    """Allocate now the workspace :func:`decode` needs for calls of this shape on ``device``
    (with ``batch_invariant``: for up to ``batch`` sequences of up to ``capacity`` tokens), with
    contiguous or paged caches, of any batch and capacity (their launch configs' grids may differ:
    the largest is reserved).

    The workspace is allocated on the first call that needs it. Call this (or ``decode`` once)
    before capturing a CUDA graph whose calls need it: a capture cannot allocate. torch.compile's
    ``mode="reduce-overhead"`` needs neither: it runs each new graph eagerly once first.
    """
    device = torch.device(device)
    rows = q_len * (q_heads // kv_heads)
    configs = [choose_config(head_dim, kv_dtype, rows, paged, batch_invariant, large)
               for paged in (False, True) for large in (False, True)]
    programs = max(_call.grid(device, config, num_programs) for config in configs)
    split = max(split_of(batch_invariant, split_size, config.tile) for config in configs)
    if split and (batch < 1 or capacity < 1):
        fail(ValueError, f"reserve_workspace(batch_invariant=True) needs the largest batch and capacity, got "
                         f"batch={batch}, capacity={capacity}")
    _call.buffers(workspace_for(device), device, _call.slots(programs, split, batch, kv_heads, capacity), head_dim,
                  rows)


def plan_decode(
    cache_seqlens: torch.Tensor | None,
    capacity: int,
    *,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    kv_dtype: torch.dtype = torch.bfloat16,
    batch: int | None = None,
    cache_leftpad: torch.Tensor | None = None,
    q_len: int = 1,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    num_programs: int | None = None,
    device: torch.device | str | None = None,
    config: KernelConfig | None = None,
    batch_invariant: bool = False,
    split_size: int | None = None,
    paged: bool = False,
) -> torch.Tensor:
    """Every program's share of a decode step, for ``decode(..., plan=plan)`` in each layer.

    The functional form of :meth:`DecodeWrapper.plan`, for code that torch.compile traces (it is
    the custom op ``leanattn::plan_shares``) or that keeps no wrapper: plan once per step, then
    each layer's ``decode`` reads its share instead of locating it (1.5-2 µs a call on small
    calls). No host sync, so a CUDA graph can hold it.

    Args:
        cache_seqlens, cache_leftpad, capacity: as the layers' ``decode`` calls will pass them
            (the same tensors, or equal values: the runs read them again); ``capacity`` is the
            cache length (or the block table's capacity). ``batch`` is needed without
            ``cache_seqlens``.
        q_heads, kv_heads, head_dim, kv_dtype, q_len, causal, window_size, num_programs: the
            layers' shape, cache dtype and features (they decide the launch config and shares).
        device: where the plan lives; defaults to the lengths' device (required without them).
        config: the runs' :class:`KernelConfig`, when they pass one (eager code only).
        batch_invariant, split_size: as the runs pass them (the shares are dealt in splits).
        paged: whether the runs pass a ``block_table`` (paged caches take another launch config,
            whose grid the plan must have; a plan made otherwise still gives exact results).

    Returns:
        int32 (programs, 8): the plan, whose rows are the grid of the runs. A plan describes
        lengths, not a layer: give it to every layer of the step. Calls made with different
        lengths or shapes get wrong shares: ``decode`` checks the shapes (in eager code), never
        the lengths' values.
    """
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    batch, device = check_plan_lengths("plan_decode", cache_seqlens, cache_leftpad, batch, capacity, device)
    if not isinstance(q_len, int) or q_len < 1:
        fail(ValueError, f"q_len must be a positive int, got {q_len!r}")
    check_num_programs(num_programs)
    _check_config(config)
    if not isinstance(paged, bool):
        fail(TypeError, f"paged must be a bool, got {type(paged).__name__}")
    q_dtype = kv_dtype if kv_dtype in SUPPORTED_DTYPES else torch.float16  # an fp8 cache takes either
    check_layer_shape(q_heads, kv_heads, head_dim, q_dtype, kv_dtype, q_len, device)
    window_left, _, has_window, _ = window_bounds(causal, window_size, q_len)
    rows = q_len * (q_heads // kv_heads)
    launch = config or choose_config(head_dim, kv_dtype, rows, paged, batch_invariant)
    # The config of a large call has the same tile; the op picks its grid (no device query here,
    # where torch.compile traces).
    big = config or choose_config(head_dim, kv_dtype, rows, paged, batch_invariant, True)
    check_tile_count(batch, kv_heads, capacity, launch.tile)
    split = split_of(batch_invariant, split_size, launch.tile)
    compiling = torch.compiler.is_compiling()
    plan = (ops.plan_shares if compiling else ops.new_plan)(
        cache_seqlens, cache_leftpad, batch, kv_heads, capacity, q_len, window_left, has_window,
        *_call.unit_of(launch, split), launch.programs_per_sm, num_programs or 0, device, big.programs_per_sm)
    if not compiling:
        remember(plan, plan_key(batch, capacity, q_len, q_heads, kv_heads, head_dim, kv_dtype, window_left,
                                cache_seqlens is not None, cache_leftpad is not None, config, split, launch.tile))
    return plan


class _Known(NamedTuple):
    """What a call of an already-checked argument layout needs (see :func:`_arguments_key`)."""

    call: _call.Call
    slots: int  # workspace slots
    rows: int  # query rows of a kv head
    fp8: bool
    capacity: int
    plan_key: tuple | None  # what the call's plan must have been made for


# Calls of decode by the layout of their arguments: every check of decode but the per-call ones
# (grad, values, the plan's identity) depends only on that, so a layout seen before skips them.
_KNOWN: dict[tuple, _Known] = {}


def _arguments_key(
    q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, softmax_scale, causal, window_size, softcap, sinks,
    k_scale, v_scale, return_lse, out, lse, num_programs, plan, config, batch_invariant, split_size,
) -> tuple | None:
    """Everything decode's checks and its kernel call depend on in its arguments but the values
    of tensors: shapes, strides, dtypes, devices, 16-byte alignment, the options. None for
    arguments it can't describe (not tensors, unhashable options): the full checks say why."""
    try:
        tensors = (q, k_cache, v_cache, out, lse, cache_seqlens, cache_leftpad, block_table, sinks, plan,
                   k_scale if isinstance(k_scale, torch.Tensor) else None,
                   v_scale if isinstance(v_scale, torch.Tensor) else None)
        # Options with their types: 1 == True and 32.0 == 32, but the checks take only one.
        # (Written out, not a generator: this runs on every call.)
        options = (type(softmax_scale), softmax_scale, type(causal), causal, type(softcap), softcap,
                   type(return_lse), return_lse, type(num_programs), num_programs,
                   type(batch_invariant), batch_invariant, type(split_size), split_size)
        key = (_call.layout_of(*tensors), options, window_size, config,
               None if isinstance(k_scale, torch.Tensor) else (type(k_scale), k_scale),
               None if isinstance(v_scale, torch.Tensor) else (type(v_scale), v_scale))
        hash(key)
    except (AttributeError, TypeError):
        return None
    return key


def _check_values(q, k_cache, cache_seqlens, cache_leftpad, block_table, sinks, k_scale, v_scale,
                  capacity: int, window_left: int) -> None:
    """``check=True``'s host-side checks of the values (a device sync); keys before every query's
    window (``window_left``, as ``Features``') are not read, so their pages and scales are not
    checked."""
    check_lengths(cache_seqlens, cache_leftpad, capacity)
    window = (window_left, q.shape[1])
    if block_table is not None:
        check_pages(block_table, k_cache.shape[0], k_cache.shape[1], cache_seqlens, cache_leftpad, window)
    check_finite_values(sinks, k_scale, v_scale, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad,
                        block_table=block_table, batch=q.shape[0], capacity=capacity, window=window)


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | None = None,
    *,
    block_table: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    num_programs: int | None = None,
    plan: torch.Tensor | None = None,
    check: bool = False,
    config: KernelConfig | None = None,
    batch_invariant: bool = False,
    split_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact decode attention with LeanAttention's stream-K partition.

    Args:
        q: (batch, q_len, q_heads, head_dim), fp16 or bf16: the q_len newest tokens of each
            sequence (the last q_len of its live keys, as after flash-attn's KV append);
            q_len x (q_heads / kv_heads) <= ``leanattn.max_query_rows(head_dim)`` (128; 16 at
            head_dim 512).
        k_cache, v_cache: (batch, cache_len, kv_heads, head_dim) with any strides but a unit last
            stride; or, with ``block_table``, pages (num_pages, page_size, kv_heads, head_dim).
            fp16/bf16 like q, or both fp8 (float8_e4m3fn / float8_e5m2) with k_scale/v_scale.
        cache_seqlens: int32 (batch,), contiguous (as cache_leftpad, sinks, scale tensors and
            plan: a strided view is refused), where each sequence's live tokens end; ``None`` means
            ``cache_len`` (or the block table's capacity). Clamped to [cache_leftpad, capacity].
        block_table: int32 (batch, max_pages_per_seq) page indices for a paged cache.
        cache_leftpad: int32 (batch,), where each sequence's live tokens start (left padding, as
            in ``flash_attn_with_kvcache``); ``None`` means 0. Clamped to [0, capacity]. The
            keys are cache positions ``[cache_leftpad[b], cache_seqlens[b])``.
        softmax_scale: defaults to ``head_dim ** -0.5``.
        causal: query i of a sequence of L live keys sees keys [0, L - q_len + i] (flash-attn's
            bottom-right alignment); False: every key (within the window).
        window_size: (left, right): a query at key position p sees keys [p - left, p + right]
            (right is 0 when causal); -1: unbounded. Keys before every query's window are not
            read.
        softcap: > 0: scaled scores s become softcap * tanh(s / softcap) before the softmax.
        sinks: float32 (q_heads,), one sink logit per query head (in scaled-score units): the
            softmax runs over [scores, sink], the sink carrying no value.
        k_scale, v_scale: dequantisation multipliers of an fp8 cache (real K = stored K x
            k_scale), each a float (default 1) or a float32 tensor: (kv_heads,), (batch,
            kv_heads), or per token, shaped like the cache without head_dim ((batch, cache_len,
            kv_heads), or (num_pages, page_size, kv_heads) when paged) and indexed like its
            rows. The two may be of different kinds. Refused for fp16/bf16 caches.
        return_lse: also return the natural-log log-sum-exp, float32 (batch, q_heads, q_len).
        out: optional tensor like q to write into.
        lse: optional float32 (batch, q_heads, q_len) tensor, any strides, for the LSE to be
            written into (with ``return_lse`` only): e.g. a view into a communication buffer.
        num_programs: persistent grid size; defaults to SMs x programs per SM.
        plan: int32 (programs, 8) from :func:`plan_decode` for this step's lengths and this
            call's shapes: the programs read their shares from it instead of locating them. Its
            rows are the grid. Results are bitwise those without it when the plan's ``paged``
            is this call's (else exact, on the other kind's shares). The lengths must be the
            plan's: a call on lengths changed since the plan gives garbage and can leave the
            tickets of planned calls raised, which breaks later planned calls on the device
            until the next ``plan_decode`` (each plan starts them at zero); calls without a
            plan draw other tickets and stay exact.
        config: a :class:`KernelConfig` to launch with instead of the heuristic's
            (:func:`choose_config`); a plan must be made with the same one. Eager calls only.
        batch_invariant: each (sequence, kv head) is cut into splits of ``split_size`` tokens
            from the first key its queries see (its first live key, or with a window the
            window's start), each split is attended alone and a head's splits merge in
            split order: a sequence's output and LSE are the same bits whatever else is in the
            batch, whatever the grid, with or without a plan, paged or not.
        split_size: tokens per split with ``batch_invariant`` (default 512), a multiple of the
            launch config's tile (``choose_config(...).tile``: 32, 64 or 128 tokens, so any
            multiple of 128 fits; 32 under the interpreter): see the README.
        check: also validate the values of ``cache_seqlens``, ``cache_leftpad``, the live slots
            of ``block_table``, ``sinks`` and scale tensors (per-token ones in their live rows) on
            the host (a device sync: not for CUDA graphs or fast paths), raising ValueError
            naming the sequence, slot and value. Without it, lengths are clamped and an
            out-of-range page gives NaN rows where it is attended to.

    Returns:
        Like q, in q's dtype, and the LSE when ``return_lse``.
    """
    compiling = torch.compiler.is_compiling()
    key = None if compiling else _arguments_key(
        q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, softmax_scale, causal, window_size, softcap,
        sinks, k_scale, v_scale, return_lse, out, lse, num_programs, plan, config, batch_invariant, split_size)
    known = _KNOWN.get(key) if key is not None else None
    if known is not None:  # arguments of a layout checked before: only the per-call checks
        refuse_grad(q, k_cache, v_cache)
        if check:
            _check_values(q, k_cache, cache_seqlens, cache_leftpad, block_table, sinks, k_scale, v_scale, known.capacity,
                          known.call.features.window_left)
        if plan is not None:
            check_plan(plan, q, num_programs, known.plan_key)
        result = torch.empty_like(q) if out is None else out
        if return_lse and lse is None:
            lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
        bufs = _call.buffers(workspace_for(q.device), q.device, known.slots, q.shape[3], known.rows,
                             plan is not None)
        fp8_default = 1.0 if known.fp8 else None
        known.call.launch(bufs, q, k_cache, v_cache, result, lse, cache_seqlens, cache_leftpad, block_table, sinks,
                          fp8_default if k_scale is None else k_scale, fp8_default if v_scale is None else v_scale,
                          plan)
        return (result, lse) if return_lse else result

    validate(q, k_cache, v_cache, cache_seqlens, block_table, out, cache_leftpad)
    refuse_grad(q, k_cache, v_cache)
    features, ks, vs = resolve_features(q, k_cache, causal, window_size, softcap, sinks, k_scale, v_scale)
    capacity = capacity_of(k_cache, block_table)
    if check:
        _check_values(q, k_cache, cache_seqlens, cache_leftpad, block_table, sinks, k_scale, v_scale, capacity,
                      features.window_left)
    check_num_programs(num_programs)
    _check_config(config)
    scale = softmax_scale_of(softmax_scale, q.shape[-1])
    check_lse_out(lse, q, return_lse)
    batch, q_len, q_heads, head_dim = q.shape
    invariant = batch_invariant or split_size is not None
    split = 0
    # The launch config's tile (the same in both modes): the unit of a split and of a plan, and
    # of the kernels' int32 tile counts.
    tile = (config or choose_config(head_dim, k_cache.dtype, q_len * (q_heads // k_cache.shape[2]),
                                    block_table is not None, bool(invariant))).tile
    check_tile_count(batch, k_cache.shape[2], capacity, tile)
    if invariant:
        split = split_of(batch_invariant, split_size, tile)
    made_for = None
    if plan is not None:
        made_for = plan_key(batch, capacity, q_len, q_heads, k_cache.shape[2], head_dim, k_cache.dtype,
                            features.window_left, cache_seqlens is not None, cache_leftpad is not None, config, split,
                            tile)
        check_plan(plan, q, num_programs, made_for)
    result = torch.empty_like(q) if out is None else out
    if return_lse and lse is None:
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
    if compiling:
        tensors = [x if isinstance(x, torch.Tensor) else None for x in (ks, vs)]
        floats = [x if isinstance(x, (int, float)) else 1.0 for x in (ks, vs)]
        ops.decode_into(q, k_cache, v_cache, result, lse, cache_seqlens, block_table, scale, num_programs or 0,
                        cache_leftpad, causal, list(window_size), float(softcap), sinks, *tensors, *floats, plan,
                        split)
    else:
        launched = _call.decode_into(
            q, k_cache, v_cache, result, lse, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad,
            block_table=block_table, sinks=sinks, k_scale=ks, v_scale=vs, plan=plan, features=features,
            softmax_scale=scale, num_programs=num_programs, config=config, causal=causal, window_size=window_size,
            split=split)
        if launched is not None and key is not None:
            _KNOWN[key] = _Known(*launched, q.shape[1] * (q.shape[2] // k_cache.shape[2]), features.fp8, capacity,
                                 made_for)
    return (result, lse) if return_lse else result
