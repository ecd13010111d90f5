"""Every argument check of the public functions, and the limits they check against.

Each check raises ``TypeError``/``ValueError`` naming the argument and what is expected; the
host-side value checks (``check_lengths``, ``check_pages``, ``check_finite_values``) read the
tensors' values and so sync with the device (the API's ``check=True``).
"""

from __future__ import annotations

import math
import operator

import torch

from .kernels.config import ROW_LIMITS, check_kernel_device

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Query rows of one kv head (q_len x group) the kernel packs into one block, at most: fewer at
# head dims whose registers hold fewer (max_query_rows).
MAX_QUERY_ROWS = 128
# The kernel pads the head dim to a power of two and masks the padding (80, 96 -> 128; 192 -> 256).
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128, 192, 256, 512)
MAX_PAGE_SIZE = 256
# Tokens per split in batch-invariant mode unless split_size says otherwise (docs/decisions.md).
DEFAULT_SPLIT_SIZE = 512


def max_query_rows(head_dim: int) -> int:
    """The most query rows of a kv head (q_len x group) the kernel takes at ``head_dim``:
    ``MAX_QUERY_ROWS``, or fewer where registers require it (16 at head dim 512)."""
    return min(MAX_QUERY_ROWS, ROW_LIMITS.get(head_dim, MAX_QUERY_ROWS))


def fail(kind: type[Exception], msg: str) -> None:
    raise kind(msg)


def fixed_attribute(name: str) -> property:
    """A wrapper's public attribute that reads ``_<name>`` and refuses assignment: the wrapper's
    buffers, plans and cached calls were built from it, so a new value would be ignored (or half
    used) silently."""

    def refuse(self, value: object) -> None:
        fail(AttributeError, f"{type(self).__name__}.{name} cannot be assigned (the wrapper's plans and calls are "
                             f"built from it); make a new {type(self).__name__} for another value")

    return property(operator.attrgetter("_" + name), refuse, doc=f"``{name}`` (read-only).")


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        fail(TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t  # type: ignore[return-value]


def check_dense_vector(name: str, t: torch.Tensor) -> None:
    """The kernels read 1-D arguments (lengths, sinks, plans' rows) and fp8 scale tensors (of any
    kind) as packed arrays: a strided or expanded view is refused rather than read as if it were
    packed."""
    if not t.is_contiguous():
        fail(ValueError, f"{name} must be contiguous, got a view with strides {t.stride()} (shape "
                          f"{tuple(t.shape)}): pass {name}.contiguous()")


def check_no_broadcast(name: str, t: torch.Tensor) -> None:
    """An output must not be a broadcast view: its elements would be written by several rows."""
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        fail(ValueError, f"{name} must not be a broadcast view (strides {t.stride()}, shape {tuple(t.shape)})")


def check_per_sequence(name: str, t: object, batch: int) -> None:
    """``t`` is a contiguous int32 (batch,) tensor (of per-sequence positions); its values are not
    read."""
    check_tensor(name, t)
    if t.dtype != torch.int32:
        fail(TypeError, f"{name} must be int32, got {t.dtype}")
    if t.shape != (batch,):
        fail(ValueError, f"{name} must have shape ({batch},), got {tuple(t.shape)}")
    check_dense_vector(name, t)


def refuse_grad(*tensors: torch.Tensor, names: tuple[str, ...] = ("q", "k_cache", "v_cache")) -> None:
    """leanattn computes no gradients: refuse inputs (``names``) that would silently detach a graph."""
    if not torch.is_grad_enabled():
        return
    for t in tensors:  # a loop, not any(generator): this runs on every call
        if t is not None and t.requires_grad:
            names = [n for n, t in zip(names, tensors) if t is not None and t.requires_grad]
            raise RuntimeError(
                f"leanattn has no backward pass, and {', '.join(names)} require grad: call it under "
                "torch.no_grad() or torch.inference_mode(), or detach the inputs"
            )


def check_finite_values(
    sinks: torch.Tensor | None, k_scale: object, v_scale: object, *, cache_seqlens: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None, block_table: torch.Tensor | None, batch: int, capacity: int,
    scale_names: tuple[str, str] = ("k_scale", "v_scale"), window: tuple[int, int] | None = None,
) -> None:
    """Host-side check (a sync) that every sink logit and fp8 dequantisation scale the call reads
    is finite; errors name the scales ``scale_names``. Per-token scales are checked in the live
    rows only (cache positions [cache_leftpad, cache_seqlens) of each sequence, clamped as the
    kernel clamps them, through ``block_table`` when paged, skipping out-of-range page ids; with
    ``window`` = (window_left, q_len), from the first key a query's window reaches): other rows
    are never read and may hold anything."""
    if isinstance(sinks, torch.Tensor):
        at = first_bad(~torch.isfinite(sinks))
        if at is not None:
            fail(ValueError, f"sinks[{at[0]}] = {float(sinks[at])} is not finite (query head {at[0]})")
    for name, t in zip(scale_names, (k_scale, v_scale)):
        if not isinstance(t, torch.Tensor):
            continue
        if t.dim() < 3:
            at = first_bad(~torch.isfinite(t))
            if at is not None:
                what = f"kv head {at[0]}" if t.dim() == 1 else f"sequence {at[0]}, kv head {at[1]}"
                fail(ValueError, f"{name}[{', '.join(map(str, at))}] = {float(t[at])} is not finite ({what})")
            continue
        live = live_positions(cache_seqlens, cache_leftpad, batch, capacity, t.device, window)
        pos = torch.arange(capacity, device=t.device)
        rows = t  # (batch, capacity, kv_heads): each sequence's rows
        if block_table is not None:
            if t.shape[0] == 0:  # no pages: no row is read (every live slot is out of range)
                continue
            page_size = t.shape[1]
            pages = block_table[:, pos // page_size].long()
            live &= (pages >= 0) & (pages < t.shape[0])
            rows = t[pages.clamp(0, max(t.shape[0] - 1, 0)), pos % page_size]
        at = first_bad(live[..., None] & ~torch.isfinite(rows))
        if at is not None:
            b, p, h = at
            row = (b, p) if block_table is None else (int(pages[b, p]), p % page_size)
            fail(ValueError, f"{name}[{row[0]}, {row[1]}, {h}] = {float(rows[at])} is not finite (sequence {b}, "
                              f"position {p}, kv head {h}: a live row)")


def live_positions(
    cache_seqlens: torch.Tensor | None, cache_leftpad: torch.Tensor | None, batch: int, capacity: int,
    device: torch.device, window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """bool (batch, capacity): the cache positions [start, end) of each sequence the kernel may
    read, with start = clamp(cache_leftpad, 0, capacity), end = clamp(cache_seqlens, start,
    capacity), and with ``window`` = (window_left, q_len) start raised to the first key the
    first query's window reaches, end - q_len - window_left (keys before it are not read)."""
    start, end = read_range(cache_seqlens, cache_leftpad, batch, capacity, device, window)
    pos = torch.arange(capacity, device=device)
    return (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])


def read_range(
    cache_seqlens: torch.Tensor | None, cache_leftpad: torch.Tensor | None, batch: int, capacity: int,
    device: torch.device, window: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (batch,) start and end of the cache positions each sequence's call may read: see
    :func:`live_positions`."""
    start = torch.zeros(batch, dtype=torch.long, device=device) if cache_leftpad is None else \
        cache_leftpad.to(device).long().clamp(0, capacity)
    end = torch.full((batch,), capacity, device=device) if cache_seqlens is None else \
        torch.maximum(cache_seqlens.to(device).long().clamp(max=capacity), start)
    if window is not None and window[0] < capacity:
        start = torch.minimum(torch.maximum(start, end - window[1] - window[0]), end)
    return start, end


def first_bad(bad: torch.Tensor) -> tuple[int, ...] | None:
    """Index of the first True of ``bad`` (row-major), or None."""
    hits = bad.nonzero()
    return None if hits.numel() == 0 else tuple(int(i) for i in hits[0])


def check_lengths(cache_seqlens: torch.Tensor | None, cache_leftpad: torch.Tensor | None, capacity: int) -> None:
    """Host-side value checks (a sync): 0 <= cache_leftpad <= cache_seqlens <= capacity."""
    ends = cache_seqlens
    if ends is not None:
        at = first_bad((ends < 0) | (ends > capacity))
        if at is not None:
            fail(ValueError, f"cache_seqlens[{at[0]}] = {int(ends[at])} is outside [0, capacity={capacity}] "
                              f"(sequence {at[0]})")
    if cache_leftpad is not None:
        limit = ends if ends is not None else torch.full_like(cache_leftpad, capacity)
        at = first_bad((cache_leftpad < 0) | (cache_leftpad > limit))
        if at is not None:
            fail(ValueError, f"cache_leftpad[{at[0]}] = {int(cache_leftpad[at])} is outside [0, cache_seqlens="
                              f"{int(limit[at])}] (sequence {at[0]})")


def check_pages(
    block_table: torch.Tensor, num_pages: int, page_size: int, cache_seqlens: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None, window: tuple[int, int] | None = None,
) -> None:
    """Host-side check (a sync) that every live slot of ``block_table`` names a page in
    [0, num_pages): the slots holding positions [cache_leftpad, cache_seqlens) of each sequence
    (with ``window`` = (window_left, q_len), from the first key a query's window reaches:
    ``read_range``; slots wholly before it are not read and may hold anything, e.g. -1 for
    pages an engine freed)."""
    batch, slots = block_table.shape
    firsts, ends = read_range(cache_seqlens, cache_leftpad, batch, slots * page_size, block_table.device, window)
    start = torch.arange(slots, device=block_table.device) * page_size
    live = (start[None, :] < ends[:, None]) & (start[None, :] + page_size > firsts[:, None]) & (ends > firsts)[:, None]
    at = first_bad(live & ((block_table < 0) | (block_table >= num_pages)))
    if at is not None:
        fail(ValueError, f"block_table[{at[0]}, {at[1]}] = {int(block_table[at])} is not a page in "
                          f"[0, num_pages={num_pages}) (sequence {at[0]}, slot {at[1]}, a live slot)")


def check_block_table(block_table: object, batch: int, cache_name: str, page_size: int) -> None:
    """``block_table`` is int32 (batch, max_pages_per_seq) with a unit last stride, for pages of
    ``page_size`` (``cache_name``.shape[1]) rows, 1 to MAX_PAGE_SIZE."""
    check_tensor("block_table", block_table)
    if block_table.dtype != torch.int32:
        fail(TypeError, f"block_table must be int32, got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        fail(ValueError, f"block_table must be (batch={batch}, max_pages_per_seq), got {tuple(block_table.shape)}")
    if block_table.stride(-1) != 1 and block_table.shape[1] > 1:
        fail(ValueError, f"block_table must have unit stride on its last dim, got strides {block_table.stride()}")
    if page_size < 1 or page_size > MAX_PAGE_SIZE:
        fail(ValueError, f"page_size ({cache_name}.shape[1]) must be 1 to {MAX_PAGE_SIZE}, got {page_size}")


def check_page_strides(k_cache: torch.Tensor, v_cache: torch.Tensor, names: tuple[str, str] = ("k_cache", "v_cache")) -> None:
    """The kernel adds a row's offset within its page, slot x stride(1) with slot < page_size, in
    int32 (the page's own offset is int64): pages (num_pages, page_size, kv_heads, head_dim) whose
    row stride puts the last slot 2^31 elements or more into its page are refused."""
    for name, t in zip(names, (k_cache, v_cache)):
        if (t.shape[1] - 1) * t.stride(1) >= 2**31:
            fail(ValueError, f"{name}.stride(1) = {t.stride(1)} puts slot {t.shape[1] - 1} of a page 2^31 elements "
                              f"or more into it (strides {t.stride()}): lay each page out in one block")


def check_head_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The kernel adds a kv head's offset, head x stride(2), in int32 (the row's offset is int64):
    caches whose last kv head starts 2^31 elements or more after the first (a heads-outermost
    cache, e.g. (kv_heads, batch, cache_len, head_dim) permuted, over 2^31 elements) are
    refused rather than read at wrapped addresses."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (t.shape[2] - 1) * t.stride(2) >= 2**31:
            fail(ValueError, f"{name}.stride(2) = {t.stride(2)} puts kv head {t.shape[2] - 1} 2^31 elements or more "
                              f"after head 0 (strides {t.stride()}): keep a token's kv heads together, e.g. "
                              "(batch, cache_len, kv_heads, head_dim) contiguous")


def check_operands(*named: tuple[str, torch.Tensor]) -> None:
    """q and the caches: tensors, 4-D, a supported dtype (fp8 for caches only), unit last stride."""
    for name, t in named:
        check_tensor(name, t)
        if t.dim() != 4:
            fail(ValueError, f"{name} must be 4-D, got shape {tuple(t.shape)}")
        allowed = SUPPORTED_DTYPES if name == "q" else SUPPORTED_DTYPES + FP8_DTYPES
        if t.dtype not in allowed:
            kinds = "float16 or bfloat16" + ("" if name == "q" else ", or float8_e4m3fn / float8_e5m2")
            fail(TypeError, f"{name} must be {kinds}, got {t.dtype}")
        if t.stride(-1) != 1 and t.numel():
            fail(ValueError, f"{name} must have unit stride on its last dim, got strides {t.stride()}")


def validate(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | None,
    block_table: torch.Tensor | None,
    out: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None = None,
) -> None:
    """Raise ValueError/TypeError naming the argument for every input the kernel can't take."""
    check_operands(("q", q), ("k_cache", k_cache), ("v_cache", v_cache))
    batch, q_len, q_heads, head_dim = q.shape
    k_shape = k_cache.shape
    paged = block_table is not None
    layout = "(num_pages, page_size, kv_heads, head_dim)" if paged else "(batch, cache_len, kv_heads, head_dim)"
    if k_cache.dtype != v_cache.dtype:
        fail(TypeError, f"k_cache and v_cache must share one dtype, got {k_cache.dtype} and {v_cache.dtype}")
    if k_cache.dtype not in FP8_DTYPES and k_cache.dtype != q.dtype:
        fail(TypeError, f"q and a float16/bfloat16 cache must share one dtype, got {q.dtype} and {k_cache.dtype}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        fail(ValueError, f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim} (q shape {tuple(q.shape)})")
    if k_shape != v_cache.shape:
        fail(ValueError, f"k_cache and v_cache must have the same shape {layout}, got {tuple(k_shape)} and {tuple(v_cache.shape)}")
    if k_shape[3] != head_dim:
        fail(ValueError, f"k_cache must be {layout} with head_dim {head_dim} like q, got {tuple(k_shape)}")
    kv_heads = k_shape[2]
    if kv_heads == 0 or q_heads == 0 or q_heads % kv_heads != 0:
        fail(ValueError, f"q_heads ({q_heads}) must be a positive multiple of kv_heads ({kv_heads})")
    group, most = q_heads // kv_heads, max_query_rows(head_dim)
    if q_len < 1 or q_len * group > most:
        why = f" at head_dim {head_dim} (its fp32 accumulator and q fill the registers)" if most < MAX_QUERY_ROWS else ""
        fail(ValueError, f"q_len x (q_heads / kv_heads) must be in [1, {most}]{why}: q_len {q_len} with a group of "
                          f"{group} gives {q_len * group} (q shape {tuple(q.shape)})")
    if not paged and k_shape[0] != batch:
        fail(ValueError, f"k_cache must be {layout} with batch {batch} like q, got {tuple(k_shape)}")
    device = q.device
    others = [("k_cache", k_cache), ("v_cache", v_cache)]
    for name, t in (("cache_seqlens", cache_seqlens), ("cache_leftpad", cache_leftpad)):
        if t is not None:
            check_per_sequence(name, t, batch)
            others.append((name, t))
    check_head_strides(k_cache, v_cache)
    if paged:
        check_block_table(block_table, batch, "k_cache", k_shape[1])
        check_page_strides(k_cache, v_cache)
        others.append(("block_table", block_table))
    if out is not None:
        check_tensor("out", out)
        if out.shape != q.shape or out.dtype != q.dtype:
            fail(ValueError, f"out must be {tuple(q.shape)} {q.dtype} like q, got {tuple(out.shape)} {out.dtype}")
        if out.stride(-1) != 1:
            fail(ValueError, f"out must have unit stride on its last dim, got strides {out.stride()}")
        check_no_broadcast("out", out)
        others.append(("out", out))
    check_kernel_device("q", device)
    if any(t.device != device for _, t in others):
        listing = ", ".join(f"{n} on {t.device}" for n, t in [("q", q), *others])
        fail(ValueError, f"all tensors must be on one device, got {listing}")


# MLA: query tokens of a request at most, and the widest cache row (latent + rope values).
MLA_MAX_Q_LEN = 16
MLA_MAX_HEAD_DIM = 1024


def validate_mla(
    q: torch.Tensor, kv_cache: torch.Tensor, cache_seqlens: torch.Tensor | None, block_table: torch.Tensor | None,
    out: torch.Tensor | None, head_dim_v: int, cache_leftpad: torch.Tensor | None = None,
    rope_cache: torch.Tensor | None = None,
) -> None:
    """``leanattn.mla_decode``'s argument checks: ValueError/TypeError naming the argument."""
    check_operands(("q", q), ("kv_cache", kv_cache), *([("rope_cache", rope_cache)] if rope_cache is not None else []))
    batch, q_len, q_heads, head_dim = q.shape
    paged = block_table is not None
    layout = "(num_pages, page_size, 1, head_dim)" if paged else "(batch, cache_len, 1, head_dim)"
    if kv_cache.dtype not in FP8_DTYPES and kv_cache.dtype != q.dtype:
        fail(TypeError, f"q and a float16/bfloat16 kv_cache must share one dtype, got {q.dtype} and {kv_cache.dtype}")
    if head_dim % 16 or not 16 <= head_dim <= MLA_MAX_HEAD_DIM:
        fail(ValueError, f"head_dim (q.shape[3]) must be a multiple of 16 in [16, {MLA_MAX_HEAD_DIM}], got {head_dim}")
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int) or head_dim_v % 16 or not 16 <= head_dim_v <= head_dim:
        fail(ValueError, f"head_dim_v must be a multiple of 16 in [16, head_dim={head_dim}], got {head_dim_v!r}")
    if rope_cache is None and (kv_cache.shape[2] != 1 or kv_cache.shape[3] != head_dim):
        fail(ValueError, f"kv_cache must be {layout} with one latent head and head_dim {head_dim} like q, "
                          f"got {tuple(kv_cache.shape)}")
    if rope_cache is not None:
        # The latent in kv_cache, the rope part apart: head_dim = head_dim_v + rope width.
        if kv_cache.shape[2] != 1 or kv_cache.shape[3] != head_dim_v:
            fail(ValueError, f"with rope_cache, kv_cache must hold the latent only: {layout[:-9]}head_dim_v="
                              f"{head_dim_v}), got {tuple(kv_cache.shape)}")
        want = (*kv_cache.shape[:3], head_dim - head_dim_v)
        if head_dim == head_dim_v or tuple(rope_cache.shape) != want:
            fail(ValueError, f"rope_cache must be {want} (kv_cache's rows, head_dim - head_dim_v = "
                              f"{head_dim - head_dim_v} values), got {tuple(rope_cache.shape)}")
        if rope_cache.dtype != kv_cache.dtype:
            fail(TypeError, f"rope_cache must have kv_cache's dtype {kv_cache.dtype}, got {rope_cache.dtype}")
    if q_heads < 1 or not 1 <= q_len <= MLA_MAX_Q_LEN:
        fail(ValueError, f"q must have q_len in [1, {MLA_MAX_Q_LEN}] and at least one head, got shape {tuple(q.shape)}")
    if not paged and kv_cache.shape[0] != batch:
        fail(ValueError, f"kv_cache must be {layout} with batch {batch} like q, got {tuple(kv_cache.shape)}")
    others = [("kv_cache", kv_cache)] + ([("rope_cache", rope_cache)] if rope_cache is not None else [])
    if cache_seqlens is not None:
        check_per_sequence("cache_seqlens", cache_seqlens, batch)
        others.append(("cache_seqlens", cache_seqlens))
    if cache_leftpad is not None:
        check_per_sequence("cache_leftpad", cache_leftpad, batch)
        others.append(("cache_leftpad", cache_leftpad))
    if paged:
        check_block_table(block_table, batch, "kv_cache", kv_cache.shape[1])
        check_page_strides(kv_cache, kv_cache, ("kv_cache", "kv_cache"))
        if rope_cache is not None:
            check_page_strides(rope_cache, rope_cache, ("rope_cache", "rope_cache"))
        others.append(("block_table", block_table))
    if out is not None:
        check_tensor("out", out)
        want = (batch, q_len, q_heads, head_dim_v)
        if tuple(out.shape) != want or out.dtype != q.dtype:
            fail(ValueError, f"out must be {want} {q.dtype} (batch, q_len, q_heads, head_dim_v), got "
                              f"{tuple(out.shape)} {out.dtype}")
        if out.stride(-1) != 1:
            fail(ValueError, f"out must have unit stride on its last dim, got strides {out.stride()}")
        check_no_broadcast("out", out)
        others.append(("out", out))
    check_kernel_device("q", q.device)
    if any(t.device != q.device for _, t in others):
        listing = ", ".join(f"{n} on {t.device}" for n, t in [("q", q), *others])
        fail(ValueError, f"all tensors must be on one device, got {listing}")


def check_lse_out(lse: torch.Tensor | None, q: torch.Tensor, return_lse: bool) -> None:
    """An ``lse=`` tensor must be float32 (batch, q_heads, q_len) on q's device, and asked for."""
    if lse is None:
        return
    if not return_lse:
        fail(ValueError, "lse= is written only with return_lse=True")
    want = (q.shape[0], q.shape[2], q.shape[1])
    if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32 or tuple(lse.shape) != want or lse.device != q.device:
        got = f"{lse.dtype} {tuple(lse.shape)} on {lse.device}" if isinstance(lse, torch.Tensor) else type(lse).__name__
        fail(ValueError, f"lse must be float32 {want} (batch, q_heads, q_len) on {q.device}, got {got}")
    check_no_broadcast("lse", lse)


# The most programs a grid may have: the merge finds a head's first and last programs with fp64
# divisions (kernels/lean_decode.py, _floor_div), exact for products of tiles (< 2^31,
# check_tile_count) and programs below 2^53.
MAX_PROGRAMS = 2**22


def check_num_programs(num_programs: object) -> None:
    """``num_programs`` is None (the default grid) or a positive int up to MAX_PROGRAMS."""
    if num_programs is not None and (not isinstance(num_programs, int) or num_programs < 1):
        fail(ValueError, f"num_programs must be a positive int, got {num_programs!r}")
    if num_programs is not None and num_programs > MAX_PROGRAMS:
        fail(ValueError, f"num_programs must be at most 2^22 = {MAX_PROGRAMS} (the merge's exact arithmetic), got "
                         f"{num_programs}")


def wrapper_device(device: torch.device | str, owner: str) -> torch.device:
    """A wrapper's device with its index filled in; refused while a CUDA graph is being captured
    (the wrapper allocates its buffers when made)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        fail(RuntimeError, f"create the {owner} before capturing a CUDA graph: it allocates its buffers")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# The layer shapes check_layer_shape has passed, with their arguments' types (8.0 is not 8): a
# step's plan (plan_decode) checks the same shape every step.
_LAYERS_PASSED: set[tuple] = set()


def check_layer_shape(
    q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, kv_dtype: torch.dtype, q_len: int,
    device: torch.device, q_len_name: str = "q_len",
) -> None:
    """Every check ``decode`` makes of the layers' heads, head dim and dtypes, made once for a
    plan with a probe of the layers' shape (batch 1, capacity 1); ``q_len_name``: what the
    caller calls ``q_len`` in its errors."""
    key = tuple((type(x), x) for x in (q_heads, kv_heads, head_dim, dtype, kv_dtype, q_len, device))
    if key in _LAYERS_PASSED:
        return
    for name, value in (("q_heads", q_heads), ("kv_heads", kv_heads), ("head_dim", head_dim), (q_len_name, q_len)):
        if not isinstance(value, int) or isinstance(value, bool):
            fail(TypeError, f"{name} must be an int, got {value!r}")
    probe_q = torch.empty(1, q_len, q_heads, head_dim, dtype=dtype, device=device)
    probe_kv = torch.empty(1, 1, kv_heads, head_dim, dtype=kv_dtype, device=device)
    validate(probe_q, probe_kv, probe_kv, None, None, None)
    if not torch.compiler.is_compiling():
        _LAYERS_PASSED.add(key)


def check_plan_lengths(
    caller: str, cache_seqlens: object, cache_leftpad: object, batch: object, capacity: object,
    device: torch.device | None,
) -> tuple[int, torch.device]:
    """Check a plan's lengths and capacity as ``DecodeWrapper.plan`` and ``plan_decode`` take
    them; return the batch (``cache_seqlens``'s, else ``batch``) and the device (``device``, else
    the lengths')."""
    if cache_seqlens is not None:
        check_tensor("cache_seqlens", cache_seqlens)
        batch = cache_seqlens.shape[0] if cache_seqlens.dim() else -1
    if not isinstance(batch, int) or batch < 0:
        fail(ValueError, f"{caller} needs cache_seqlens, or batch when every sequence is capacity long")
    lengths = [(name, t) for name, t in (("cache_seqlens", cache_seqlens), ("cache_leftpad", cache_leftpad))
               if t is not None]
    for name, t in lengths:
        check_per_sequence(name, t, batch)
    if device is None:
        if not lengths:
            fail(ValueError, f"{caller} needs device= when it gets no lengths tensor")
        device = lengths[0][1].device
    for name, t in lengths:
        if t.device != device:
            fail(ValueError, f"{name} is on {t.device}, {caller} plans on {device}")
    if not isinstance(capacity, int) or capacity < 0:
        fail(ValueError, f"capacity must be a non-negative int, got {capacity!r}")
    return batch, device


def check_planned(q: torch.Tensor, cache_name: str, cache: torch.Tensor, block_table: torch.Tensor | None,
                  batch: int, q_len: int, capacity: int) -> None:
    """A wrapper's run against its plan: q's batch and q_len, and the cache's capacity."""
    if q.shape[0] != batch:
        fail(ValueError, f"planned for batch {batch}, got q of batch {q.shape[0]}")
    if q.shape[1] != q_len:
        fail(ValueError, f"planned for q_len {q_len}, got q of q_len {q.shape[1]}")
    got = capacity_of(cache, block_table)
    if got != capacity:
        what = f"{cache_name}.shape[1]" if block_table is None else "block_table.shape[1] * page_size"
        fail(ValueError, f"planned for capacity {capacity}, got {what} = {got}")


def check_tile_count(batch: int, kv_heads: int, capacity: int, tile: int) -> None:
    """The kernels count tiles in int32."""
    if batch * kv_heads * max(1, -(-capacity // tile)) >= 2**31:
        fail(ValueError, f"batch {batch} x kv_heads {kv_heads} x capacity {capacity} is over 2^31 tiles of {tile}")


def split_of(batch_invariant: bool, split_size: int | None, tile: int) -> int:
    """Tokens per split in batch-invariant mode (0 when off): ``split_size`` or
    DEFAULT_SPLIT_SIZE, a positive multiple of the launch config's ``tile``."""
    if not isinstance(batch_invariant, bool):
        fail(TypeError, f"batch_invariant must be a bool, got {type(batch_invariant).__name__}")
    if not batch_invariant:
        if split_size is not None:
            fail(ValueError, "split_size is the split of batch_invariant=True; pass both or neither")
        return 0
    split = DEFAULT_SPLIT_SIZE if split_size is None else split_size
    if isinstance(split, bool) or not isinstance(split, int) or split < 1 or split % tile:
        fail(ValueError, f"split_size must be a positive multiple of the launch config's tile ({tile} tokens), "
                         f"got {split_size!r}")
    return split


def softmax_scale_of(softmax_scale: float | None, head_dim: int) -> float:
    """The scale a call uses: ``head_dim ** -0.5`` by default; a finite float. A tensor is
    refused: its value would be read once (a device sync) and kept by the cached call, so a
    later in-place change would be ignored."""
    if isinstance(softmax_scale, torch.Tensor):
        fail(TypeError, "softmax_scale must be a Python float, not a tensor (a call keeps the value it was made "
                        "with, so a tensor changed in place would be ignored): pass float(scale)")
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    if not math.isfinite(scale):
        fail(ValueError, f"softmax_scale must be finite, got {softmax_scale}")
    return scale


def capacity_of(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    """Cache positions per sequence: cache_len, or max_pages_per_seq x page_size when paged."""
    return k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
