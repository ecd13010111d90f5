"""Public entry point: input checks, workspace, dispatch to the Triton kernel."""

from __future__ import annotations

import functools
import math
import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import triton.language as tl
from triton import knobs

from .kernels.config import KernelConfig, check_kernel_device, choose_config, interpreting, next_pow2
from .kernels.lean_decode import LOG2E, lean_decode_kernel
from .kernels.plan import PLAN_FIELDS, lean_plan_kernel

__all__ = ["decode", "plan_decode", "reserve_workspace", "default_num_programs", "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Query rows of one kv head (q_len x group) the kernel packs into one block.
MAX_QUERY_ROWS = 128
# An unbounded window side, as an int the kernel compares with.
_UNBOUNDED = 2**30
SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)
MAX_PAGE_SIZE = 256
# Sequences the kernel's share-locating loop reads per step.
_BLOCK_B = 128
# Most programs that count their arrival on one ticket (contention on one address grows fast).
_ARRIVE_CHUNK = 16


def _fail(kind: type[Exception], msg: str) -> None:
    raise kind(msg)


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t  # type: ignore[return-value]


def check_dense_vector(name: str, t: torch.Tensor) -> None:
    """The kernels read 1-D arguments (lengths, sinks, scales, plans' rows) as packed arrays: a
    strided or expanded view is refused rather than read as if it were packed."""
    if not t.is_contiguous():
        _fail(ValueError, f"{name} must be contiguous, got a view with strides {t.stride()} (shape "
                          f"{tuple(t.shape)}): pass {name}.contiguous()")


def check_no_broadcast(name: str, t: torch.Tensor) -> None:
    """An output must not be a broadcast view: its elements would be written by several rows."""
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        _fail(ValueError, f"{name} must not be a broadcast view (strides {t.stride()}, shape {tuple(t.shape)})")


def _check_per_sequence(name: str, t: object, batch: int) -> None:
    """``t`` is a contiguous int32 (batch,) tensor (of per-sequence positions); its values are not
    read."""
    _check_tensor(name, t)
    if t.dtype != torch.int32:
        _fail(TypeError, f"{name} must be int32, got {t.dtype}")
    if t.shape != (batch,):
        _fail(ValueError, f"{name} must have shape ({batch},), got {tuple(t.shape)}")
    check_dense_vector(name, t)


def refuse_grad(*tensors: torch.Tensor) -> None:
    """leanattn computes no gradients: refuse inputs that would silently detach a graph."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        names = [n for n, t in zip(("q", "k_cache", "v_cache"), tensors) if t.requires_grad]
        raise RuntimeError(
            f"leanattn has no backward pass, and {', '.join(names)} require grad: call it under "
            "torch.no_grad() or torch.inference_mode(), or detach the inputs"
        )


def check_finite_values(sinks: torch.Tensor | None, k_scale: object, v_scale: object) -> None:
    """Host-side check (a sync) that every sink logit and fp8 dequantisation scale is finite."""
    for name, t, what in (("sinks", sinks, "query head"), ("k_scale", k_scale, "kv head"),
                          ("v_scale", v_scale, "kv head")):
        if isinstance(t, torch.Tensor):
            at = _first_bad(~torch.isfinite(t))
            if at is not None:
                _fail(ValueError, f"{name}[{at[0]}] = {float(t[at])} is not finite ({what} {at[0]})")


def _first_bad(bad: torch.Tensor) -> tuple[int, ...] | None:
    """Index of the first True of ``bad`` (row-major), or None."""
    hits = bad.nonzero()
    return None if hits.numel() == 0 else tuple(int(i) for i in hits[0])


def check_lengths(cache_seqlens: torch.Tensor | None, cache_leftpad: torch.Tensor | None, capacity: int) -> None:
    """Host-side value checks (a sync): 0 <= cache_leftpad <= cache_seqlens <= capacity."""
    ends = cache_seqlens
    if ends is not None:
        at = _first_bad((ends < 0) | (ends > capacity))
        if at is not None:
            _fail(ValueError, f"cache_seqlens[{at[0]}] = {int(ends[at])} is outside [0, capacity={capacity}] "
                              f"(sequence {at[0]})")
    if cache_leftpad is not None:
        limit = ends if ends is not None else torch.full_like(cache_leftpad, capacity)
        at = _first_bad((cache_leftpad < 0) | (cache_leftpad > limit))
        if at is not None:
            _fail(ValueError, f"cache_leftpad[{at[0]}] = {int(cache_leftpad[at])} is outside [0, cache_seqlens="
                              f"{int(limit[at])}] (sequence {at[0]})")


def check_pages(
    block_table: torch.Tensor, num_pages: int, page_size: int, cache_seqlens: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None,
) -> None:
    """Host-side check (a sync) that every live slot of ``block_table`` names a page in
    [0, num_pages): the slots holding positions [cache_leftpad, cache_seqlens) of each sequence."""
    batch, slots = block_table.shape
    capacity = slots * page_size
    ends = torch.full((batch,), capacity, device=block_table.device) if cache_seqlens is None else cache_seqlens
    firsts = torch.zeros_like(ends) if cache_leftpad is None else cache_leftpad
    firsts = firsts.clamp(0, capacity)
    ends = torch.maximum(ends.clamp(max=capacity), firsts)
    start = torch.arange(slots, device=block_table.device) * page_size
    live = (start[None, :] < ends[:, None]) & (start[None, :] + page_size > firsts[:, None]) & (ends > firsts)[:, None]
    at = _first_bad(live & ((block_table < 0) | (block_table >= num_pages)))
    if at is not None:
        _fail(ValueError, f"block_table[{at[0]}, {at[1]}] = {int(block_table[at])} is not a page in "
                          f"[0, num_pages={num_pages}) (sequence {at[0]}, slot {at[1]}, a live slot)")


def _validate(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | None,
    block_table: torch.Tensor | None,
    out: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None = None,
) -> None:
    """Raise ValueError/TypeError naming the argument for every input the kernel can't take."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, t)
        if t.dim() != 4:
            _fail(ValueError, f"{name} must be 4-D, got shape {tuple(t.shape)}")
        allowed = SUPPORTED_DTYPES if name == "q" else SUPPORTED_DTYPES + FP8_DTYPES
        if t.dtype not in allowed:
            kinds = "float16 or bfloat16" + ("" if name == "q" else ", or float8_e4m3fn / float8_e5m2")
            _fail(TypeError, f"{name} must be {kinds}, got {t.dtype}")
        if t.stride(-1) != 1 and t.numel():
            _fail(ValueError, f"{name} must have unit stride on its last dim, got strides {t.stride()}")
    batch, q_len, q_heads, head_dim = q.shape
    k_shape = k_cache.shape
    paged = block_table is not None
    layout = "(num_pages, page_size, kv_heads, head_dim)" if paged else "(batch, cache_len, kv_heads, head_dim)"
    if k_cache.dtype != v_cache.dtype:
        _fail(TypeError, f"k_cache and v_cache must share one dtype, got {k_cache.dtype} and {v_cache.dtype}")
    if k_cache.dtype not in FP8_DTYPES and k_cache.dtype != q.dtype:
        _fail(TypeError, f"q and a float16/bfloat16 cache must share one dtype, got {q.dtype} and {k_cache.dtype}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        _fail(ValueError, f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim} (q shape {tuple(q.shape)})")
    if k_shape != v_cache.shape:
        _fail(ValueError, f"k_cache and v_cache must have the same shape {layout}, got {tuple(k_shape)} and {tuple(v_cache.shape)}")
    if k_shape[3] != head_dim:
        _fail(ValueError, f"k_cache must be {layout} with head_dim {head_dim} like q, got {tuple(k_shape)}")
    kv_heads = k_shape[2]
    if kv_heads == 0 or q_heads % kv_heads != 0:
        _fail(ValueError, f"q_heads ({q_heads}) must be a positive multiple of kv_heads ({kv_heads})")
    if q_len < 1 or q_len * (q_heads // kv_heads) > MAX_QUERY_ROWS:
        _fail(ValueError, f"q_len x (q_heads / kv_heads) must be in [1, {MAX_QUERY_ROWS}]: q_len {q_len} with a group of "
                          f"{q_heads // kv_heads} gives {q_len * (q_heads // kv_heads)} (q shape {tuple(q.shape)})")
    if not paged and k_shape[0] != batch:
        _fail(ValueError, f"k_cache must be {layout} with batch {batch} like q, got {tuple(k_shape)}")
    device = q.device
    others = [("k_cache", k_cache), ("v_cache", v_cache)]
    for name, t in (("cache_seqlens", cache_seqlens), ("cache_leftpad", cache_leftpad)):
        if t is not None:
            _check_per_sequence(name, t, batch)
            others.append((name, t))
    if paged:
        _check_tensor("block_table", block_table)
        if block_table.dtype != torch.int32:
            _fail(TypeError, f"block_table must be int32, got {block_table.dtype}")
        if block_table.dim() != 2 or block_table.shape[0] != batch:
            _fail(ValueError, f"block_table must be (batch={batch}, max_pages_per_seq), got {tuple(block_table.shape)}")
        if block_table.stride(-1) != 1 and block_table.shape[1] > 1:
            _fail(ValueError, f"block_table must have unit stride on its last dim, got strides {block_table.stride()}")
        page_size = k_shape[1]
        if page_size < 1 or page_size > MAX_PAGE_SIZE or page_size & (page_size - 1):
            _fail(ValueError, f"page_size (k_cache.shape[1]) must be a power of two up to {MAX_PAGE_SIZE}, got {page_size}")
        others.append(("block_table", block_table))
    if out is not None:
        _check_tensor("out", out)
        if out.shape != q.shape or out.dtype != q.dtype:
            _fail(ValueError, f"out must be {tuple(q.shape)} {q.dtype} like q, got {tuple(out.shape)} {out.dtype}")
        if out.stride(-1) != 1:
            _fail(ValueError, f"out must have unit stride on its last dim, got strides {out.stride()}")
        check_no_broadcast("out", out)
        others.append(("out", out))
    check_kernel_device("q", device)
    if any(t.device != device for _, t in others):
        listing = ", ".join(f"{n} on {t.device}" for n, t in [("q", q), *others])
        _fail(ValueError, f"all tensors must be on one device, got {listing}")


def default_num_programs(device: torch.device, config: KernelConfig) -> int:
    """Persistent grid size: SMs times programs per SM (a small fixed grid on the CPU)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * config.programs_per_sm
    return 16


_SM_COUNTS: dict[int, int] = {}


def _sm_count(index: int) -> int:
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _outside_graph_pools(device: torch.device, allocate: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """``allocate()``'s tensors, from the caching allocator's ordinary pool.

    torch.compile's ``mode="reduce-overhead"`` warms a graph up with the calling thread's
    allocations routed to the graph's private pool, and refuses the step if a tensor made there
    outlives it. The workspace outlives every step, so on CUDA it is allocated on a thread of its
    own (the routing is per thread), and that thread waits for its fill kernels, which ran on its
    own current stream."""
    if device.type != "cuda":
        return allocate()
    if device.index is None:  # the new thread's current device is device 0, not the caller's
        device = torch.device("cuda", torch.cuda.current_device())
    result: list = []

    def run() -> None:
        try:
            with torch.cuda.device(device):
                result.append(allocate())
                torch.cuda.current_stream().synchronize()
        except BaseException as e:  # re-raised on the caller's thread
            result.append(e)

    thread = threading.Thread(target=run, name="leanattn-workspace")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class _Workspace:
    """fp32 partials and tickets for split heads, grown on demand.

    For a grid of P programs: 2P partial slots (rows x head_dim fp32 plus m and l), P head
    tickets and 2P chunk tickets.

    Size depends only on the grid and (group, head_dim) padding, never on batch or context
    length. Tickets are zero between calls: the merging program puts its ticket back.
    """

    def __init__(self) -> None:
        self.acc: torch.Tensor | None = None
        self.stats: torch.Tensor | None = None
        self.tickets: torch.Tensor | None = None
        # Buffers replaced by larger ones stay alive: a CUDA graph captured earlier still
        # reads and writes them on every replay.
        self.retired: list[tuple[torch.Tensor, ...]] = []

    def get(self, device: torch.device, programs: int, rows: int, cols: int) -> tuple[torch.Tensor, ...]:
        need = (2 * programs * rows * cols, 2 * programs * 2 * rows, 3 * programs + 3)  # acc, stats, tickets
        have = (0, 0, 0) if self.acc is None else (self.acc.numel(), self.stats.numel(), self.tickets.numel())
        if any(n > h for n, h in zip(need, have)):
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "leanattn.decode needs a larger workspace while a CUDA graph is being captured; "
                    "call leanattn.decode once with the same heads, head_dim, q_len and num_programs before capturing"
                )
            if self.acc is not None:
                self.retired.append((self.acc, self.stats, self.tickets))
            sizes = tuple(max(n, h) for n, h in zip(need, have))
            self.acc, self.stats, self.tickets = _outside_graph_pools(device, lambda: (
                torch.empty(sizes[0], dtype=torch.float32, device=device),
                torch.empty(sizes[1], dtype=torch.float32, device=device),
                torch.zeros(sizes[2], dtype=torch.int32, device=device),
            ))
        # Head tickets first, then the chunk tickets (see the kernel's two-level arrival count),
        # from a 16-byte boundary: Triton specialises pointers on it, so any grid size reuses
        # one compiled kernel.
        chunk = -(-programs // 4) * 4
        return self.acc, self.stats, self.tickets[:programs], self.tickets[chunk : chunk + 2 * programs]


def reserve_workspace(
    device: torch.device | str, q_heads: int, kv_heads: int, head_dim: int, kv_dtype: torch.dtype, *,
    q_len: int = 1, num_programs: int | None = None,
) -> None:
    """Allocate now the workspace :func:`decode` needs for calls of this shape on ``device``.

    The workspace is allocated on the first call that needs it. Call this (or ``decode`` once)
    before capturing a CUDA graph whose calls need it: a capture cannot allocate. torch.compile's
    ``mode="reduce-overhead"`` needs neither: it runs each new graph eagerly once first.
    """
    _decode_buffers(torch.device(device), head_dim, kv_dtype, q_len * (q_heads // kv_heads), num_programs)


def _decode_buffers(
    device: torch.device, head_dim: int, kv_dtype: torch.dtype, rows: int, num_programs: int | None,
    config: KernelConfig | None = None,
) -> tuple[KernelConfig, int, tuple[torch.Tensor, ...]]:
    """``decode``'s launch config (``config``, or the heuristic's), its grid and the device
    workspace's buffers for it, the workspace grown if it must be. ``rows``: q_len x group."""
    default, _, merge_rows, head_dim_pad, _ = _static_config(head_dim, kv_dtype, rows)
    config = config or default
    programs = num_programs or default_num_programs(device, config)
    return config, programs, _workspace(device).get(device, programs, merge_rows, head_dim_pad)


# One workspace per device for leanattn.decode: calls on different streams of a device must not
# overlap (give each stream its own DecodeWrapper, which owns its buffers). Not one per stream:
# a stream met first inside a CUDA-graph capture, or inside torch.compile's CUDA-graph warm-up,
# would get buffers from the graph's private memory pool.
_WORKSPACES: dict[torch.device, _Workspace] = {}


def _workspace(device: torch.device) -> _Workspace:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _WORKSPACES:
        _WORKSPACES[device] = _Workspace()
    return _WORKSPACES[device]


@functools.lru_cache(maxsize=None)
def _static_config(head_dim: int, kv_dtype: torch.dtype, rows: int) -> tuple:
    """Launch config and the padded sizes derived from it, computed once per combination.
    ``kv_dtype``: the cache's dtype; ``rows``: query rows of one kv head, q_len x group."""
    config = choose_config(head_dim, kv_dtype, rows)
    rows_pad = max(16, next_pow2(rows))  # tl.dot needs M >= 16
    merge_rows = next_pow2(rows)  # partials keep only the real rows
    head_dim_pad = next_pow2(head_dim)
    # A merge step loads 8 partials at once when they fit in 64 fp32 registers a thread of four
    # warps, else 4 (the merge's latency is its number of steps).
    merge_wide = 8 * merge_rows * head_dim_pad <= 64 * 128
    return config, rows_pad, merge_rows, head_dim_pad, merge_wide


# Compiled kernels by the layout of a call (see launch_cached). A hit launches the compiled kernel
# directly: Triton's per-call argument binding costs more than a short decode step on the GPU.
_DIRECT: dict[tuple, tuple] = {}
DIRECT_LAUNCH_ERROR: list[str] = []  # why direct launches were given up, if they were


def _launcher_takes_metadata_in_args() -> bool:
    """Whether this Triton's CudaLauncher is called as (grid, stream, function, *args), passing
    the kernel metadata and launch hooks inside args, to its C launcher (Triton 3.6), rather than
    as named parameters (later versions)."""
    try:
        import inspect

        from triton.backends.nvidia.driver import CudaLauncher

        names = list(inspect.signature(CudaLauncher.__call__).parameters)
        return names[names.index("function") + 1 :] == ["args"]
    except Exception:
        return False


_C_LAUNCH = _launcher_takes_metadata_in_args()


def run_direct(hit: tuple, grid: int, device: torch.device, args: tuple) -> None:
    """What Triton's launcher does for ``compiled[(grid, 1, 1)](*args, *constexprs)`` with the
    compiled kernel and constexpr values of ``hit``, without rebinding the arguments."""
    compiled, values = hit
    stream = current_stream_handle(device)
    enter = knobs.runtime.launch_enter_hook
    meta = compiled.launch_metadata((grid, 1, 1), stream, *args, *values) if enter is not None else None
    launcher = compiled.run
    if _C_LAUNCH and not launcher.global_scratch_size and not launcher.profile_scratch_size:
        # Triton 3.6's CudaLauncher.__call__, minus its scratch allocators (none needed here).
        launcher.launch(grid, 1, 1, stream, compiled.function, launcher.launch_cooperative_grid,
                        launcher.launch_pdl, None, None, compiled.packed_metadata, meta, enter,
                        knobs.runtime.launch_exit_hook, *args, *values)
    else:
        launcher(grid, 1, 1, stream, compiled.function, compiled.packed_metadata, meta, enter,
                 knobs.runtime.launch_exit_hook, *args, *values)


def launch_cached(
    kernel, grid: int, layout: tuple, args: tuple, constexprs: Callable[[], dict], config: KernelConfig,
    pdl: bool, device: torch.device, cache: dict | None = None,
) -> None:
    """Launch ``kernel`` on ``grid`` programs with ``args`` (its non-constexpr parameters, in
    order) and the compile-time parameters ``constexprs()``.

    ``layout`` must determine everything Triton specialises the compiled kernel on (dtypes,
    16-byte alignment of every pointer, every int's == 1 / divisibility by 16 / 32-bit range)
    and every constexpr: calls with the same layout reuse the compiled kernel directly, kept in
    ``cache`` (default: one for the module).
    """
    cache = _DIRECT if cache is None else cache
    hit = None if interpreting() else cache.get(layout)
    if hit is not None:
        try:
            run_direct(hit, grid, device, args)
            return
        except (TypeError, AttributeError) as e:  # a Triton whose launcher differs: bind every time
            DIRECT_LAUNCH_ERROR.append(repr(e))
            cache.clear()
    params = constexprs()
    extra = {"launch_pdl": True} if pdl else {}
    compiled = kernel[(grid,)](*args, **params, num_warps=config.num_warps, num_stages=config.num_stages, **extra)
    if not interpreting() and not DIRECT_LAUNCH_ERROR:
        cache[layout] = (compiled, tuple(params[n] for n in kernel.arg_names[len(args):]))


def check_lse_out(lse: torch.Tensor | None, q: torch.Tensor, return_lse: bool) -> None:
    """An ``lse=`` tensor must be float32 (batch, q_heads, q_len) on q's device, and asked for."""
    if lse is None:
        return
    if not return_lse:
        _fail(ValueError, "lse= is written only with return_lse=True")
    want = (q.shape[0], q.shape[2], q.shape[1])
    if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32 or tuple(lse.shape) != want or lse.device != q.device:
        got = f"{lse.dtype} {tuple(lse.shape)} on {lse.device}" if isinstance(lse, torch.Tensor) else type(lse).__name__
        _fail(ValueError, f"lse must be float32 {want} (batch, q_heads, q_len) on {q.device}, got {got}")
    check_no_broadcast("lse", lse)


def layout_of(*tensors: torch.Tensor | None) -> tuple:
    """Shapes, strides, dtypes, devices and 16-byte alignment of tensors (None stays None)."""
    return tuple(
        None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0) for t in tensors
    )


def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: on Hopper and newer GPUs, not under the interpreter, unless
    LEANATTN_PDL=0 (read at import)."""
    return _PDL and device.type == "cuda" and not interpreting() and _capability(device) >= 9


_PDL = os.environ.get("LEANATTN_PDL", "1") != "0"


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def current_stream_handle(device: torch.device) -> int:
    """The raw handle of the current CUDA stream of ``device``."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch._C._cuda_getCurrentRawStream(index)


@dataclass(frozen=True)
class Features:
    """A call's model features, normalised for the kernel (see :func:`resolve_features`)."""

    q_len: int
    window_left: int  # keys before the query a row sees; _UNBOUNDED when unbounded
    window_right: int  # keys after it; 0 when causal
    has_window: bool  # window_left bounded: tiles before every row's window are skipped
    has_mask: bool  # some row sees fewer than all live keys
    softcap: float  # 0: off
    has_sinks: bool
    fp8: bool


def window_bounds(causal: bool, window_size: tuple[int, int], q_len: int) -> tuple[int, int, bool, bool]:
    """(window_left, window_right, has_window, has_mask) of :class:`Features` from the API's
    ``causal`` and ``window_size``."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and w >= -1 for w in window_size)):
        _fail(ValueError, f"window_size must be (left, right), ints >= -1 (-1: unbounded), got {window_size!r}")
    left, right = window_size
    left = _UNBOUNDED if left < 0 else left
    right = 0 if causal else (_UNBOUNDED if right < 0 else right)  # causal: flash-attn's right = 0
    # A row sees fewer than all live keys when the window cuts it, or when a later query's key
    # lies past its right bound.
    return left, right, left < _UNBOUNDED, left < _UNBOUNDED or q_len - 1 > right


def resolve_features(
    q: torch.Tensor, k_cache: torch.Tensor, causal: bool, window_size: tuple[int, int], softcap: float,
    sinks: torch.Tensor | None, k_scale: float | torch.Tensor | None, v_scale: float | torch.Tensor | None,
) -> tuple[Features, torch.Tensor | None, torch.Tensor | None]:
    """Check the model-feature arguments; return the features and the fp8 cache's
    dequantisation scales as given, a float (default 1.0) or a float32 (kv_heads,) tensor (None
    for fp16/bf16 caches; ``launch`` makes tensors of floats)."""
    q_len, q_heads = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    left, right, has_window, has_mask = window_bounds(causal, window_size, q_len)
    if not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        _fail(ValueError, f"softcap must be a finite float >= 0 (0: off), got {softcap!r}")
    if sinks is not None:
        _check_tensor("sinks", sinks)
        if sinks.dtype != torch.float32 or sinks.shape != (q_heads,) or sinks.device != q.device:
            _fail(ValueError, f"sinks must be float32 ({q_heads},) on {q.device}, one logit per query head, "
                              f"got {sinks.dtype} {tuple(sinks.shape)} on {sinks.device}")
        check_dense_vector("sinks", sinks)
    fp8 = k_cache.dtype in FP8_DTYPES
    scales = []
    for name, x in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not fp8:
            if x is not None:
                _fail(ValueError, f"{name} dequantises an fp8 cache; this cache is {k_cache.dtype}")
            continue
        x = 1.0 if x is None else x
        _check_scale(name, x, kv_heads, q.device)
        scales.append(x)
    features = Features(q_len, left, right, has_window, has_mask, float(softcap), sinks is not None, fp8)
    return features, *(scales or (None, None))


_SCALES: dict[tuple, torch.Tensor] = {}


def _check_scale(name: str, x: object, kv_heads: int, device: torch.device) -> None:
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.float32 or x.shape != (kv_heads,) or x.device != device:
            _fail(ValueError, f"{name} must be a float or a float32 ({kv_heads},) tensor on {device}, one per kv "
                              f"head, got {x.dtype} {tuple(x.shape)} on {x.device}")
        check_dense_vector(name, x)
    elif isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        _fail(ValueError, f"{name} must be a finite float or a float32 ({kv_heads},) tensor, got {x!r}")


def scale_tensor(x: float | torch.Tensor, kv_heads: int, device: torch.device) -> torch.Tensor:
    """A (kv_heads,) float32 tensor of dequantisation multipliers from a float or a tensor."""
    if isinstance(x, torch.Tensor):
        return x
    key = (float(x), kv_heads, device)
    if key not in _SCALES:  # kept: a CUDA graph may hold it
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"an fp8 scale of {float(x)} seen first inside a CUDA-graph capture: make the same "
                               "call once eagerly before capturing (or pass the scales as float32 tensors)")
        _SCALES[key] = torch.full((kv_heads,), float(x), dtype=torch.float32, device=device)
    return _SCALES[key]


def kernel_constexprs(
    q: torch.Tensor, k_cache: torch.Tensor, page_size: int, config: KernelConfig, features: Features, *,
    has_seqlens: bool, has_leftpad: bool, planned: bool, return_lse: bool, pdl: bool,
) -> dict:
    """The compile-time parameters of ``lean_decode_kernel`` for one call."""
    _, q_len, q_heads, head_dim = q.shape
    group = q_heads // k_cache.shape[2]
    _, rows, merge_rows, head_dim_pad, merge_wide = _static_config(head_dim, k_cache.dtype, q_len * group)
    # The interpreter's bf16 dot is wrong: it computes in fp32. On the GPU the dots take q's
    # dtype, except with an fp8 cache: its tiles are converted in registers to fp16, exactly (every
    # e4m3 and e5m2 value is an fp16 value), and q (times a power of two, exactly) and p follow.
    # Products in bf16 measured 1.1-1.35x slower (NOTES.md item 21).
    if interpreting():
        dot_dtype = tl.float32
    elif k_cache.dtype.itemsize == 1 or q.dtype == torch.float16:
        dot_dtype = tl.float16
    else:
        dot_dtype = tl.bfloat16
    return dict(
        GROUP=group, Q_LEN=q_len, ROWS=rows, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        TILE=config.tile, PAGE_SIZE=page_size, TARGET_SHARE=config.target_share,
        MERGE_ROWS=merge_rows, MERGE_WIDE=merge_wide, ARRIVE_CHUNK=_ARRIVE_CHUNK,
        HAS_SEQLENS=has_seqlens, HAS_LEFTPAD=has_leftpad, HAS_WINDOW=features.has_window,
        HAS_MASK=features.has_mask, HAS_SOFTCAP=features.softcap > 0, HAS_SINKS=features.has_sinks,
        HAS_KV_SCALE=features.fp8, PLANNED=planned, RETURN_LSE=return_lse, DOT_DTYPE=dot_dtype,
        BLOCK_B=_BLOCK_B, USE_PDL=pdl,
    )


def kernel_scale(softmax_scale: float, features: Features) -> float:
    """The kernel's ``scale``: natural units under softcap (it applies tanh first), else log2."""
    return softmax_scale if features.softcap > 0 else softmax_scale * LOG2E


def launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    block_table: torch.Tensor | None,
    softmax_scale: float,
    num_programs: int | None,
    config: KernelConfig | None = None,
    cache_leftpad: torch.Tensor | None = None,
    features: Features | None = None,
    sinks: torch.Tensor | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    plan: torch.Tensor | None = None,
) -> None:
    """Run the kernel on validated inputs, writing ``out`` (and ``lse`` (batch, q_heads, q_len)
    when given); each program locates its own share, or reads it from ``plan`` (checked by
    :func:`check_plan`; its rows are the grid). ``features`` defaults to plain causal attention
    of q's q_len; ``k_scale``/``v_scale`` as from :func:`resolve_features`.

    ``config`` overrides the heuristic launch configuration (used by the tuning sweeps).
    """
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if batch == 0:
        return
    if features is None:
        features, k_scale, v_scale = resolve_features(q, k_cache, True, (-1, -1), 0.0, None, None, None)
    if plan is not None:
        num_programs = plan.shape[0]
    config, programs, (acc, stats, tickets, chunk_tickets) = _decode_buffers(
        q.device, head_dim, k_cache.dtype, q_len * (q_heads // kv_heads), num_programs, config)
    if block_table is None:
        page_size, capacity, bt, stride_btb = 0, k_cache.shape[1], tickets, 0
    else:
        page_size, bt, stride_btb = k_cache.shape[1], block_table, block_table.stride(0)
        capacity = block_table.shape[1] * page_size
    if features.fp8:
        k_scale, v_scale = (scale_tensor(x, kv_heads, q.device) for x in (k_scale, v_scale))
    dummy = acc
    args = (
        q, k_cache, v_cache, out, lse if lse is not None else dummy,
        cache_seqlens if cache_seqlens is not None else tickets,
        cache_leftpad if cache_leftpad is not None else tickets, bt,
        sinks if sinks is not None else dummy, k_scale if k_scale is not None else dummy,
        v_scale if v_scale is not None else dummy, plan if plan is not None else tickets,
        acc, stats, tickets, chunk_tickets,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *((lse.stride(0), lse.stride(1), lse.stride(2)) if lse is not None else (0, 0, 0)),
        stride_btb,
        batch, kv_heads, capacity, k_cache.shape[0] if block_table is not None else 0,
        features.window_left, features.window_right, kernel_scale(softmax_scale, features), features.softcap,
    )
    pdl = use_pdl(q.device)
    layout = (layout_of(q, k_cache, v_cache, out, lse, cache_seqlens, cache_leftpad, block_table, sinks,
                        k_scale, v_scale, plan),
              batch, capacity, programs, config, pdl, features)
    launch_cached(
        lean_decode_kernel, programs, layout, args,
        lambda: kernel_constexprs(
            q, k_cache, page_size, config, features, has_seqlens=cache_seqlens is not None,
            has_leftpad=cache_leftpad is not None, planned=plan is not None, return_lse=lse is not None, pdl=pdl,
        ),
        config, pdl, q.device,
    )


def check_num_programs(num_programs: object) -> None:
    """``num_programs`` is None (the default grid) or a positive int."""
    if num_programs is not None and (not isinstance(num_programs, int) or num_programs < 1):
        _fail(ValueError, f"num_programs must be a positive int, got {num_programs!r}")


def check_layer_shape(
    q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, kv_dtype: torch.dtype, q_len: int,
    device: torch.device,
) -> None:
    """Every check ``decode`` makes of the layers' heads, head dim and dtypes, made once for a
    plan with a probe of the layers' shape (batch 1, capacity 1)."""
    probe_q = torch.empty(1, q_len, q_heads, head_dim, dtype=dtype, device=device)
    probe_kv = torch.empty(1, 1, kv_heads, head_dim, dtype=kv_dtype, device=device)
    _validate(probe_q, probe_kv, probe_kv, None, None, None)


def check_plan_lengths(
    caller: str, cache_seqlens: object, cache_leftpad: object, batch: object, capacity: object,
    device: torch.device | None,
) -> tuple[int, torch.device]:
    """Check a plan's lengths and capacity as ``DecodeWrapper.plan`` and ``plan_decode`` take
    them; return the batch (``cache_seqlens``'s, else ``batch``) and the device (``device``, else
    the lengths')."""
    if cache_seqlens is not None:
        _check_tensor("cache_seqlens", cache_seqlens)
        batch = cache_seqlens.shape[0] if cache_seqlens.dim() else -1
    if not isinstance(batch, int) or batch < 0:
        _fail(ValueError, f"{caller} needs cache_seqlens, or batch when every sequence is capacity long")
    lengths = [(name, t) for name, t in (("cache_seqlens", cache_seqlens), ("cache_leftpad", cache_leftpad))
               if t is not None]
    for name, t in lengths:
        _check_per_sequence(name, t, batch)
    if device is None:
        if not lengths:
            _fail(ValueError, f"{caller} needs device= when it gets no lengths tensor")
        device = lengths[0][1].device
    for name, t in lengths:
        if t.device != device:
            _fail(ValueError, f"{name} is on {t.device}, {caller} plans on {device}")
    if not isinstance(capacity, int) or capacity < 0:
        _fail(ValueError, f"capacity must be a non-negative int, got {capacity!r}")
    return batch, device


def check_tile_count(batch: int, kv_heads: int, capacity: int, tile: int) -> None:
    """The kernels count tiles in int32."""
    if batch * kv_heads * max(1, -(-capacity // tile)) >= 2**31:
        _fail(ValueError, f"batch {batch} x kv_heads {kv_heads} x capacity {capacity} is over 2^31 tiles of {tile}")


def launch_plan(
    plan: torch.Tensor, programs: int, cache_seqlens: torch.Tensor | None, cache_leftpad: torch.Tensor | None,
    batch: int, kv_heads: int, capacity: int, q_len: int, window_left: int, has_window: bool, tile: int,
    target_share: int, pdl: bool,
) -> None:
    """Write the shares of a grid of ``programs`` into ``plan[:programs]``: int32 rows of
    ``PLAN_FIELDS`` (see ``lean_plan_kernel``); ``tile`` and ``target_share`` from the runs'
    KernelConfig. Inputs already validated."""
    if batch == 0:
        return
    extra = {"launch_pdl": True} if pdl else {}
    lean_plan_kernel[(programs,)](
        cache_seqlens if cache_seqlens is not None else plan,
        cache_leftpad if cache_leftpad is not None else plan,
        plan, batch, kv_heads, capacity, window_left,
        HAS_SEQLENS=cache_seqlens is not None, HAS_LEFTPAD=cache_leftpad is not None, Q_LEN=q_len,
        HAS_WINDOW=has_window, TILE=tile, TARGET_SHARE=target_share, BLOCK_B=_BLOCK_B,
        USE_PDL=pdl, num_warps=4, **extra,
    )


def _plan_key(batch: int, capacity: int, q_len: int, q_heads: int, kv_heads: int, head_dim: int,
              kv_dtype: torch.dtype, window_left: int, has_seqlens: bool, has_leftpad: bool) -> tuple:
    """What a plan's shares depend on besides the lengths' values (for :func:`check_plan`); an
    unbounded window shows as -1, as the API takes it."""
    window_left = -1 if window_left >= _UNBOUNDED else window_left
    return (("batch", batch), ("capacity", capacity), ("q_len", q_len), ("q_heads", q_heads),
            ("kv_heads", kv_heads), ("head_dim", head_dim), ("kv_dtype", kv_dtype), ("window_left", window_left),
            ("cache_seqlens given", has_seqlens), ("cache_leftpad given", has_leftpad))


_PLAN_KEY = "_leanattn_plan_key"  # the plan_decode arguments an eager plan was made for


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
        _fail(ValueError, f"q_len must be a positive int, got {q_len!r}")
    check_num_programs(num_programs)
    q_dtype = kv_dtype if kv_dtype in SUPPORTED_DTYPES else torch.float16  # an fp8 cache takes either
    check_layer_shape(q_heads, kv_heads, head_dim, q_dtype, kv_dtype, q_len, device)
    window_left, _, has_window, _ = window_bounds(causal, window_size, q_len)
    rows = q_len * (q_heads // kv_heads)
    check_tile_count(batch, kv_heads, capacity, choose_config(head_dim, kv_dtype, rows).tile)
    plan = torch.ops.leanattn.plan_shares(
        cache_seqlens, cache_leftpad, batch, kv_heads, head_dim, kv_dtype, rows, capacity, q_len, window_left,
        has_window, num_programs or 0, device)
    if not torch.compiler.is_compiling():
        setattr(plan, _PLAN_KEY, _plan_key(batch, capacity, q_len, q_heads, kv_heads, head_dim, kv_dtype, window_left,
                                           cache_seqlens is not None, cache_leftpad is not None))
    return plan


def check_plan(
    plan: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, capacity: int, window_left: int,
    cache_seqlens: torch.Tensor | None, cache_leftpad: torch.Tensor | None, num_programs: int | None,
) -> None:
    """Raise ValueError if ``plan`` can't be this call's: not a plan tensor, or (for a plan made
    eagerly by :func:`plan_decode`) made for other shapes."""
    _check_tensor("plan", plan)
    if plan.dtype != torch.int32 or plan.dim() != 2 or plan.shape[1] != PLAN_FIELDS.value or plan.shape[0] < 1:
        _fail(ValueError, f"plan must be int32 (programs, {PLAN_FIELDS.value}) from leanattn.plan_decode, "
                          f"got {plan.dtype} {tuple(plan.shape)}")
    check_dense_vector("plan", plan)
    if plan.device != q.device:
        _fail(ValueError, f"plan is on {plan.device}, q on {q.device}")
    if num_programs is not None and num_programs != plan.shape[0]:
        _fail(ValueError, f"num_programs {num_programs} differs from the plan's grid of {plan.shape[0]}")
    made = getattr(plan, _PLAN_KEY, None) if not torch.compiler.is_compiling() else None
    if made is not None:
        batch, q_len, q_heads, head_dim = q.shape
        want = _plan_key(batch, capacity, q_len, q_heads, k_cache.shape[2], head_dim, k_cache.dtype, window_left,
                         cache_seqlens is not None, cache_leftpad is not None)
        wrong = [f"{name} {a!r} (planned {b!r})" for (name, a), (_, b) in zip(want, made) if a != b]
        if wrong:
            _fail(ValueError, "plan was made for another call: " + ", ".join(wrong))


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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact decode attention with LeanAttention's stream-K partition.

    Args:
        q: (batch, q_len, q_heads, head_dim), fp16 or bf16: the q_len newest tokens of each
            sequence (the last q_len of its live keys, as after flash-attn's KV append);
            q_len x (q_heads / kv_heads) <= 128.
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
            k_scale): a float or float32 (kv_heads,); default 1; refused for fp16/bf16 caches.
        return_lse: also return the natural-log log-sum-exp, float32 (batch, q_heads, q_len).
        out: optional tensor like q to write into.
        lse: optional float32 (batch, q_heads, q_len) tensor, any strides, for the LSE to be
            written into (with ``return_lse`` only): e.g. a view into a communication buffer.
        num_programs: persistent grid size; defaults to SMs x programs per SM.
        plan: int32 (programs, 8) from :func:`plan_decode` for this step's lengths and this
            call's shapes: the programs read their shares from it instead of locating them. Its
            rows are the grid. Results are bitwise those without it.
        check: also validate the values of ``cache_seqlens``, ``cache_leftpad``, the live slots
            of ``block_table``, ``sinks`` and scale tensors on the host (a device sync: not for CUDA graphs or
            fast paths), raising ValueError naming the sequence, slot and value. Without it,
            lengths are clamped and an out-of-range page gives NaN rows where it is attended to.

    Returns:
        Like q, in q's dtype, and the LSE when ``return_lse``.
    """
    _validate(q, k_cache, v_cache, cache_seqlens, block_table, out, cache_leftpad)
    refuse_grad(q, k_cache, v_cache)
    features, ks, vs = resolve_features(q, k_cache, causal, window_size, softcap, sinks, k_scale, v_scale)
    if check:
        capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
        check_lengths(cache_seqlens, cache_leftpad, capacity)
        if block_table is not None:
            check_pages(block_table, k_cache.shape[0], k_cache.shape[1], cache_seqlens, cache_leftpad)
        check_finite_values(sinks, k_scale, v_scale)
    check_num_programs(num_programs)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    check_lse_out(lse, q, return_lse)
    if plan is not None:
        capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
        check_plan(plan, q, k_cache, capacity, features.window_left, cache_seqlens, cache_leftpad, num_programs)
    result = torch.empty_like(q) if out is None else out
    if return_lse and lse is None:
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
    if torch.compiler.is_compiling():
        tensors = [x if isinstance(x, torch.Tensor) else None for x in (ks, vs)]
        floats = [x if isinstance(x, (int, float)) else 1.0 for x in (ks, vs)]
        torch.ops.leanattn.decode_into(
            q, k_cache, v_cache, result, lse, cache_seqlens, block_table, scale, num_programs or 0, cache_leftpad,
            causal, list(window_size), float(softcap), sinks, *tensors, *floats, plan,
        )
    else:
        launch(q, k_cache, v_cache, result, lse, cache_seqlens, block_table, scale, num_programs,
               cache_leftpad=cache_leftpad, features=features, sinks=sinks, k_scale=ks, v_scale=vs, plan=plan)
    return (result, lse) if return_lse else result
