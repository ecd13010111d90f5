"""Public entry point: input checks, workspace, dispatch to the Triton kernel."""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from triton import knobs

from .kernels.config import KernelConfig, choose_config, interpreting, next_pow2
from .kernels.lean_decode import LOG2E, lean_decode_kernel

__all__ = ["decode", "default_num_programs", "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
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


def _check_lengths(name: str, t: object, batch: int) -> None:
    """An int32 (batch,) tensor of per-sequence positions."""
    _check_tensor(name, t)
    if t.dtype != torch.int32:
        _fail(TypeError, f"{name} must be int32, got {t.dtype}")
    if t.shape != (batch,):
        _fail(ValueError, f"{name} must have shape ({batch},), got {tuple(t.shape)}")


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
        if t.dtype not in SUPPORTED_DTYPES:
            _fail(TypeError, f"{name} must be float16 or bfloat16, got {t.dtype}")
        if t.stride(-1) != 1 and t.numel():
            _fail(ValueError, f"{name} must have unit stride on its last dim, got strides {t.stride()}")
    batch, q_len, q_heads, head_dim = q.shape
    k_shape = k_cache.shape
    paged = block_table is not None
    layout = "(num_pages, page_size, kv_heads, head_dim)" if paged else "(batch, cache_len, kv_heads, head_dim)"
    if q_len != 1:
        _fail(ValueError, f"q must be (batch, 1, q_heads, head_dim) with one query token, got shape {tuple(q.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        _fail(TypeError, f"q, k_cache, v_cache must share one dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        _fail(ValueError, f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim} (q shape {tuple(q.shape)})")
    if k_shape != v_cache.shape:
        _fail(ValueError, f"k_cache and v_cache must have the same shape {layout}, got {tuple(k_shape)} and {tuple(v_cache.shape)}")
    if k_shape[3] != head_dim:
        _fail(ValueError, f"k_cache must be {layout} with head_dim {head_dim} like q, got {tuple(k_shape)}")
    kv_heads = k_shape[2]
    if kv_heads == 0 or q_heads % kv_heads != 0:
        _fail(ValueError, f"q_heads ({q_heads}) must be a positive multiple of kv_heads ({kv_heads})")
    if not paged and k_shape[0] != batch:
        _fail(ValueError, f"k_cache must be {layout} with batch {batch} like q, got {tuple(k_shape)}")
    device = q.device
    others = [("k_cache", k_cache), ("v_cache", v_cache)]
    for name, t in (("cache_seqlens", cache_seqlens), ("cache_leftpad", cache_leftpad)):
        if t is not None:
            _check_lengths(name, t, batch)
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
        others.append(("out", out))
    if device.type != "cuda" and not interpreting():
        _fail(ValueError, f"q is on {device}: tensors must be on a CUDA device (or set TRITON_INTERPRET=1 before importing leanattn to run on the CPU)")
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


class _Workspace:
    """fp32 partials and tickets for split heads, one per device, grown on demand.

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
        need_acc = 2 * programs * rows * cols
        need_stats = 2 * programs * 2 * rows
        if (
            self.acc is None
            or self.acc.numel() < need_acc
            or self.stats.numel() < need_stats
            or self.tickets.numel() < 3 * programs
        ):
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "leanattn.decode needs a larger workspace while a CUDA graph is being captured; "
                    "call leanattn.decode once with the same heads, head_dim and num_programs before capturing"
                )
            old = (0, 0, 0) if self.acc is None else (self.acc.numel(), self.stats.numel(), self.tickets.numel())
            if self.acc is not None:
                self.retired.append((self.acc, self.stats, self.tickets))
            self.acc = torch.empty(max(need_acc, old[0]), dtype=torch.float32, device=device)
            self.stats = torch.empty(max(need_stats, old[1]), dtype=torch.float32, device=device)
            self.tickets = torch.zeros(max(3 * programs, old[2]), dtype=torch.int32, device=device)
        # Head tickets first, then the chunk tickets (see the kernel's two-level arrival count).
        return self.acc, self.stats, self.tickets[:programs], self.tickets[programs : 3 * programs]


_WORKSPACES: dict[torch.device, _Workspace] = {}


def _workspace(device: torch.device) -> _Workspace:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _WORKSPACES:
        _WORKSPACES[device] = _Workspace()
    return _WORKSPACES[device]


@functools.lru_cache(maxsize=None)
def _static_config(head_dim: int, dtype: torch.dtype, group: int) -> tuple:
    """Launch config and the padded sizes derived from it, computed once per combination."""
    config = choose_config(head_dim, dtype, group)
    group_pad = max(16, next_pow2(group))  # tl.dot needs M >= 16
    merge_rows = next_pow2(group)  # partials keep only the real rows
    head_dim_pad = next_pow2(head_dim)
    # A merge step loads 8 partials at once when they fit in 64 fp32 registers a thread of four
    # warps, else 4 (the merge's latency is its number of steps).
    merge_wide = 8 * merge_rows * head_dim_pad <= 64 * 128
    return config, group_pad, merge_rows, head_dim_pad, merge_wide


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


def layout_of(*tensors: torch.Tensor | None) -> tuple:
    """Shapes, strides, dtypes, devices and 16-byte alignment of tensors (None stays None)."""
    return tuple(
        None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0) for t in tensors
    )


def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: on Hopper and newer GPUs, not under the interpreter."""
    return device.type == "cuda" and not interpreting() and _capability(device) >= 9


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def current_stream_handle(device: torch.device) -> int:
    """The raw handle of the current CUDA stream of ``device``."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch._C._cuda_getCurrentRawStream(index)


def run_compiled(kernel, grid: int, key: tuple, args: tuple, constexprs: dict, config: KernelConfig, pdl: bool):
    """Launch ``kernel`` on ``grid`` programs, through the compiled kernel cached under ``key``
    when there is one (``key`` must hold everything Triton specialises on; see _spec_key).

    Returns the compiled kernel, for callers that keep it themselves."""
    global _FAST_LAUNCH
    fast = _FAST_LAUNCH and not interpreting()
    if fast:
        compiled = _COMPILED.get(key)
        if compiled is not None:
            try:
                # The launcher takes every parameter in order; it ignores the constexpr ones.
                compiled[(grid, 1, 1)](*args, *(constexprs[n] for n in kernel.arg_names[len(args):]))
                return compiled
            except TypeError as e:  # a Triton whose launcher differs: bind through the JIT every time
                _FAST_LAUNCH = fast = False
                _COMPILED.clear()
                FAST_LAUNCH_ERROR.append(repr(e))
    extra = {"launch_pdl": True} if pdl else {}
    compiled = kernel[(grid,)](*args, **constexprs, num_warps=config.num_warps, num_stages=config.num_stages, **extra)
    if fast:
        _COMPILED[key] = compiled
    return compiled


def kernel_constexprs(
    q: torch.Tensor, kv_heads: int, page_size: int, config: KernelConfig, *, has_seqlens: bool,
    has_leftpad: bool, planned: bool, return_lse: bool, pdl: bool,
) -> dict:
    """The compile-time parameters of ``lean_decode_kernel`` for one call."""
    _, _, q_heads, head_dim = q.shape
    group = q_heads // kv_heads
    _, group_pad, merge_rows, head_dim_pad, merge_wide = _static_config(head_dim, q.dtype, group)
    return dict(
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        TILE=config.tile, PAGE_SIZE=page_size, TARGET_SHARE=config.target_share,
        MERGE_ROWS=merge_rows, MERGE_WIDE=merge_wide, ARRIVE_CHUNK=_ARRIVE_CHUNK,
        HAS_SEQLENS=has_seqlens, HAS_LEFTPAD=has_leftpad, PLANNED=planned, RETURN_LSE=return_lse,
        UPCAST_DOT=interpreting(), BLOCK_B=_BLOCK_B, USE_PDL=pdl,
    )


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
) -> None:
    """Run the kernel on validated inputs, writing ``out`` (and ``lse`` when given); each program
    locates its own share.

    ``config`` overrides the heuristic launch configuration (used by the tuning sweeps).
    """
    batch, _, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if batch == 0:
        return
    default, _, merge_rows, head_dim_pad, _ = _static_config(head_dim, q.dtype, q_heads // kv_heads)
    config = config or default
    programs = num_programs or default_num_programs(q.device, config)
    acc, stats, tickets, chunk_tickets = _workspace(q.device).get(q.device, programs, merge_rows, head_dim_pad)
    if block_table is None:
        page_size, capacity, bt, stride_btb = 0, k_cache.shape[1], tickets, 0
    else:
        page_size, bt, stride_btb = k_cache.shape[1], block_table, block_table.stride(0)
        capacity = block_table.shape[1] * page_size
    args = (
        q, k_cache, v_cache, out, lse if lse is not None else acc,
        cache_seqlens if cache_seqlens is not None else tickets,
        cache_leftpad if cache_leftpad is not None else tickets, bt, tickets,
        acc, stats, tickets, chunk_tickets,
        q.stride(0), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(2),
        *((lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)),
        stride_btb,
        batch, kv_heads, capacity, softmax_scale * LOG2E,
    )
    pdl = use_pdl(q.device)
    layout = (layout_of(q, k_cache, v_cache, out, lse, cache_seqlens, cache_leftpad, block_table),
              batch, capacity, programs, config, pdl)
    launch_cached(
        lean_decode_kernel, programs, layout, args,
        lambda: kernel_constexprs(
            q, kv_heads, page_size, config, has_seqlens=cache_seqlens is not None,
            has_leftpad=cache_leftpad is not None, planned=False, return_lse=lse is not None, pdl=pdl,
        ),
        config, pdl, q.device,
    )


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | None = None,
    *,
    block_table: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    num_programs: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact decode attention with LeanAttention's stream-K partition.

    Args:
        q: (batch, 1, q_heads, head_dim), fp16 or bf16.
        k_cache, v_cache: (batch, cache_len, kv_heads, head_dim) with any strides but a unit last
            stride; or, with ``block_table``, pages (num_pages, page_size, kv_heads, head_dim).
        cache_seqlens: int32 (batch,), where each sequence's live tokens end; ``None`` means
            ``cache_len`` (or the block table's capacity). Clamped to [cache_leftpad, capacity].
        block_table: int32 (batch, max_pages_per_seq) page indices for a paged cache.
        cache_leftpad: int32 (batch,), where each sequence's live tokens start (left padding, as
            in ``flash_attn_with_kvcache``); ``None`` means 0. Clamped to [0, capacity]. The
            keys are cache positions ``[cache_leftpad[b], cache_seqlens[b])``.
        softmax_scale: defaults to ``head_dim ** -0.5``.
        return_lse: also return the natural-log log-sum-exp, float32 (batch, q_heads).
        out: optional (batch, 1, q_heads, head_dim) tensor to write into.
        num_programs: persistent grid size; defaults to SMs x programs per SM.

    Returns:
        (batch, 1, q_heads, head_dim) in q's dtype, and the LSE when ``return_lse``.
    """
    _validate(q, k_cache, v_cache, cache_seqlens, block_table, out, cache_leftpad)
    if num_programs is not None and (not isinstance(num_programs, int) or num_programs < 1):
        raise ValueError(f"num_programs must be a positive int, got {num_programs!r}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    result = torch.empty_like(q) if out is None else out
    lse = torch.empty(q.shape[0], q.shape[2], dtype=torch.float32, device=q.device) if return_lse else None
    if torch.compiler.is_compiling():
        torch.ops.leanattn.decode_into(
            q, k_cache, v_cache, result, lse, cache_seqlens, block_table, scale, num_programs or 0, cache_leftpad
        )
    else:
        launch(q, k_cache, v_cache, result, lse, cache_seqlens, block_table, scale, num_programs,
               cache_leftpad=cache_leftpad)
    return (result, lse) if return_lse else result
