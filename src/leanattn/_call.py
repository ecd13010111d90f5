"""The one builder of a decode-kernel call.

From validated arguments it derives the launch config and grid, the workspace buffers, the
kernel's arguments and compile-time parameters, and the key of the compiled kernel, then
launches it (``_launch.launch``). ``leanattn.decode``, ``decode(plan=)``,
``DecodeWrapper.run``, the custom op and context-parallel decode all launch through a
:class:`Call`; no other module names the kernel.
"""

from __future__ import annotations

import functools

import torch
import triton.language as tl

from ._checks import capacity_of
from ._features import Features, kernel_scale, scale_tensor
from ._launch import default_num_programs, grid_size, launch, prepare, use_pdl
from ._workspace import Workspace, workspace_for
from .kernels.config import KernelConfig, choose_config, interpreting, large_call, next_pow2
from .kernels.lean_decode import EVENTS, lean_decode_kernel, lean_merge_kernel
from .kernels.plan import BLOCK_B

# Most programs that count their arrival on one chunk ticket (contention on one address grows
# fast); the chunks' sums then meet on one ticket per head.
ARRIVE_CHUNK = 16

# The most fp32 partial values a merge-kernel program loads in one step (64 registers a thread of
# its 4 warps), for partials of up to 8 rows; half as many from 16 rows. The next step's loads
# are in flight during a step's math, so two steps live at once: two steps of 8192 values at 16
# or more rows, with their addresses and their partials' m and l, spill, as does one step at 32
# rows (sm_90, triton 3.6, compiled offline; at these sizes no block of the default grids of 16
# or more rows, or of up to 8 rows and over 4096 values, spills; tests/test_gpu.py compiles the
# largest of each rows count). At most MERGE_MEMBERS members a step (a head over a grid of two
# programs an SM fits one step), so a larger grid's m and l a step stay those of the shapes
# checked.
MERGE_LOAD = 8192
MERGE_MEMBERS = 512


def merge_load(merge_rows: int) -> int:
    """The most partial values a merge-kernel step of ``merge_rows`` rows loads."""
    return MERGE_LOAD if merge_rows <= 8 else MERGE_LOAD // 2


MERGE_LAUNCH = KernelConfig(tile=1, num_warps=4, num_stages=1, programs_per_sm=0)

# An eager call (not under CUDA-graph capture) that the merge-kernel rule gives a second launch
# merges by the ticket tree instead when it reads at most this many K/V bytes: such a call's GPU
# time (~10 µs at 32 MiB on an H200) is below its host path, of which the second launch is 4-8 µs
# (benchmarks/NOTES.md), while larger eager calls are GPU-bound and keep the faster merge kernel.
# Under capture the host path is paid once, so graphs always take the rule's choice.
EAGER_ONE_LAUNCH_BYTES = 32 << 20


@functools.lru_cache(maxsize=None)
def heuristic(head_dim: int, kv_dtype: torch.dtype, rows: int, paged: bool, batch_invariant: bool,
              large: bool = False) -> KernelConfig:
    """The launch heuristic's config for ``rows`` (q_len x group) query rows of a kv head of a
    contiguous or ``paged`` cache, in the default or the ``batch_invariant`` mode, for a
    ``large`` call (see :func:`large`) or not."""
    return choose_config(head_dim, kv_dtype, rows, paged, batch_invariant, large)


def large(device: torch.device, heads: int, capacity: int) -> bool:
    """Whether a call of ``heads`` kv heads (batch x kv_heads) over at most ``capacity`` tokens
    is large on ``device`` (``kernels.config.large_call``; never on the CPU)."""
    return device.type == "cuda" and large_call(heads, capacity, grid_size(device, 1))


@functools.lru_cache(maxsize=None)
def padded_sizes(head_dim: int, rows: int) -> tuple[int, int, int, bool]:
    """(rows of a dot block, rows of a partial, padded head dim, 8-wide merge steps) for ``rows``
    query rows of a kv head."""
    rows_pad = max(16, next_pow2(rows))  # tl.dot needs M >= 16
    merge_rows = next_pow2(rows)  # partials keep only the real rows
    head_dim_pad = next_pow2(head_dim)
    # A merge step loads 8 partials at once when they fit in 64 fp32 registers a thread of four
    # warps, else 4 (the merge's latency is its number of steps). At d=512, whose kernels take
    # at most 16 rows (kernels/config.py), 8 at once up to 2 rows (8 x 2 x 512 floats); 4
    # partials of 16 rows are 4 x 16 x 512 / 256 = 128 registers a thread of its 8 warps, plus
    # the running sum's 32: within the main loop's ~250.
    return rows_pad, merge_rows, head_dim_pad, 8 * merge_rows * head_dim_pad <= 64 * 128


def grid(device: torch.device, config: KernelConfig, num_programs: int | None) -> int:
    """Persistent grid size: ``num_programs``, else SMs x the config's programs per SM."""
    return num_programs or default_num_programs(device, config)


def slots(programs: int, split: int, batch: int, kv_heads: int, capacity: int) -> int:
    """Workspace slots a call needs: two per program, or in batch-invariant mode one per split
    of every head at full capacity."""
    if split:
        return batch * kv_heads * max(1, -(-capacity // split))
    return 2 * programs


def buffers(
    workspace: Workspace, device: torch.device, slots: int, head_dim: int, rows: int, planned: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The workspace's (acc, stats, head tickets, chunk tickets, merge jobs) with ``slots`` slots
    (see :func:`slots`), grown if it must be; ``planned``: for a call that reads a plan (whose
    tickets are kept apart: see ``Workspace``)."""
    _, merge_rows, head_dim_pad, _ = padded_sizes(head_dim, rows)
    return workspace.get(device, slots, merge_rows, head_dim_pad, planned)


def pdl_of(config: KernelConfig, device: torch.device) -> bool:
    """Whether the launch uses programmatic dependent launch (see ``_launch.use_pdl``)."""
    return use_pdl(device) if config.pdl is None else (config.pdl and use_pdl(device, forced=True))


def layout_of(*tensors: torch.Tensor | None) -> tuple:
    """Shapes, strides, dtypes, devices and 16-byte alignment of tensors (None stays None)."""
    return tuple([
        None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0) for t in tensors
    ])


_NO_LAYOUTS = (None, None, None)  # layout_of(None, None, None), without the call (every run asks)


def call_key(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor | None,
    lse: torch.Tensor | None, block_table: torch.Tensor | None, sinks: torch.Tensor | None, k_scale: object,
    v_scale: object, softcap: float, lengths: object,
) -> tuple:
    """Everything the compiled kernel depends on in a call: the layouts of its tensors, the
    feature arguments, and ``lengths`` (the caller's part: the lengths' or plan's layout, batch,
    capacity, grid, config, causal, window, split and a varying softmax scale, or a key of its
    own for them). ``out`` None: the call's output is ``torch.empty_like(q)``, whose layout
    follows q's and whose address the allocator aligns. Calls with one key share one
    :class:`Call`."""
    if out is None:
        ptrs = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr())
        out_layout = None
        any_bits = ptrs[0] | ptrs[1] | ptrs[2]
    else:
        ptrs = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr())
        out_layout = (out.shape, out.stride(), out.dtype, out.device)
        any_bits = ptrs[0] | ptrs[1] | ptrs[2] | ptrs[3]
    # Triton specialises each pointer on 16-byte alignment: one bool when all are aligned.
    aligned = any_bits % 16 == 0 or tuple(p % 16 == 0 for p in ptrs)
    # Devices and the scales' types too: DecodeWrapper.run skips its checks for a key it has seen.
    none = lse is None and block_table is None and sinks is None
    optional = _NO_LAYOUTS if none else layout_of(lse, block_table, sinks)
    return (q.shape, q.stride(), q.dtype, q.device, k_cache.shape, k_cache.stride(), k_cache.dtype, k_cache.device,
            v_cache.shape, v_cache.stride(), v_cache.dtype, v_cache.device, out_layout, aligned, optional, softcap,
            (type(k_scale), k_scale) if not isinstance(k_scale, torch.Tensor) else layout_of(k_scale),
            (type(v_scale), v_scale) if not isinstance(v_scale, torch.Tensor) else layout_of(v_scale), lengths)


def unit_of(config: KernelConfig, split: int) -> tuple[int, int]:
    """(tokens per unit of the shares, units a share aims at): tiles, or in batch-invariant mode
    whole splits (one split is already many tiles)."""
    return (split, 1) if split else (config.tile, config.target_share)


def dot_dtype_of(config: KernelConfig, q_dtype: torch.dtype, kv_dtype: torch.dtype):
    """The Triton dtype of the kernels' products (their DOT_DTYPE)."""
    # The interpreter's bf16 dot is wrong: it computes in fp32. On the GPU the dots take q's
    # dtype, except with an fp8 cache: its tiles are converted in registers to fp16, exactly (every
    # e4m3 and e5m2 value is an fp16 value), and q (times a power of two, exactly) and p follow;
    # products in bf16 measured slower (docs/decisions.md, fp8).
    if interpreting():
        return tl.float32
    if config.dot_dtype is not None:
        return getattr(tl, config.dot_dtype)
    if kv_dtype.itemsize == 1 or q_dtype == torch.float16:
        return tl.float16
    return tl.bfloat16


# The kernel's compile-time parameters a config's ``constexprs`` may set (probes), with their
# defaults; every other one follows from the call, so a config naming it is refused.
PROBES: dict[str, object] = {"TIMELINE": False}


def _probes(config: KernelConfig) -> dict:
    """PROBES, as ``config.constexprs`` sets them."""
    given = dict(config.constexprs)
    bad = sorted(set(given) - set(PROBES))
    if bad:
        raise ValueError(f"KernelConfig.constexprs may set only {', '.join(PROBES)}: the launch sets {', '.join(bad)} "
                         "itself from the call")
    return PROBES | given


def busy_programs(config: KernelConfig, heads: int, programs: int, capacity: int) -> int:
    """The programs a call of ``heads`` kv heads of at most ``capacity`` tokens keeps busy on a
    grid of ``programs``: its tiles at full capacity over ``target_share`` tiles a share, at most
    the grid."""
    return min(programs, -(-heads * max(1, -(-capacity // config.tile)) // config.target_share))


def merge_kernel_of(config: KernelConfig, split: int, heads: int, programs: int, capacity: int = 0) -> bool:
    """Whether a call of ``heads`` kv heads (batch x kv_heads) on ``programs``, whose heads cover
    at most ``capacity`` tokens (the cache's, or a window's width: ``covered``), merges its cut
    heads in a second kernel (``lean_merge_kernel``, whose grid is the heads x column ranges), or
    else by the last arrivers' ticket tree; ``config.merge_kernel`` forces either.

    - Batch-invariant mode (``split``): the tree unless the config asks for the merge kernel (and
      a head can have two splits). The choice must not depend on the batch, since the two merges
      differ in their last bits; there the merge kernel's block shape depends on the head dim and
      rows alone (``merge_constexprs``). Measured (benchmarks/NOTES.md), of ten shapes it was
      faster on four (0.2-1.6 µs; 1 x 32k at 512 tokens, 64 splits a head) and slower on six
      (0.1-1.9 µs; heads of 8, 16, 32 and 256 splits, whose chunks the tree merges in parallel).
    - Default mode: never for no heads, nor with more heads than programs (the workspace holds a
      job per program); the merge kernel when a head has ARRIVE_CHUNK members or more on average
      at full capacity (``busy_programs``).

    Why: the kernel boundary costs about one atomic round trip (0.6-0.8 µs on an H200), and the
    next kernel then waits for a second kernel. In the kernel, a head's last arriver merges after
    one ticket, eight partials a load step; beyond ARRIVE_CHUNK members a chunk's last arriver
    merges it, stores its sum and draws a second ticket, and the last one merges the sums, where
    the merge kernel loads every member's partial in one step, a head spread over many SMs.
    Measured (benchmarks/NOTES.md): 1-8 heads over 132-264 programs 0.2-2.6 µs faster a call,
    heads of ~8 members 2 µs slower."""
    if heads == 0:
        return False
    if split:
        # (With one split a head at most, every head is written by its program: no merge at all.)
        return bool(config.merge_kernel) and capacity > split
    if heads > programs:
        return False
    if config.merge_kernel is not None:
        return bool(config.merge_kernel)
    return busy_programs(config, heads, programs, capacity) >= ARRIVE_CHUNK * heads


def constexprs(
    q: torch.Tensor, k_cache: torch.Tensor, page_size: int, config: KernelConfig, features: Features, *,
    has_seqlens: bool, has_leftpad: bool, planned: bool, return_lse: bool, pdl: bool, split: int,
    has_bounds: bool = False, batch: int = 1, programs: int = 1, capacity: int = 0,
) -> dict:
    """The compile-time parameters of the kernel for one call of ``batch`` sequences whose heads
    cover at most ``capacity`` tokens, on ``programs`` (``split``: tokens per split in
    batch-invariant mode, else 0; ``has_bounds``: per-query key bounds replace the window's, see
    ``DecodeWrapper._plan_bounded``)."""
    _, q_len, q_heads, head_dim = q.shape
    group = q_heads // k_cache.shape[2]
    rows, merge_rows, head_dim_pad, merge_wide = padded_sizes(head_dim, q_len * group)
    unit, target_share = unit_of(config, split)
    dot_dtype = dot_dtype_of(config, q.dtype, k_cache.dtype)
    return dict(
        GROUP=group, Q_LEN=q_len, ROWS=rows, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        TILE=config.tile, PAGE_SIZE=page_size, SPLIT=split, UNIT=unit, TARGET_SHARE=target_share,
        MERGE_ROWS=merge_rows, MERGE_WIDE=merge_wide, ARRIVE_CHUNK=ARRIVE_CHUNK,
        HAS_SEQLENS=has_seqlens, HAS_LEFTPAD=has_leftpad, HAS_WINDOW=features.has_window,
        HAS_MASK=features.has_mask, HAS_SOFTCAP=features.softcap > 0, HAS_SINKS=features.has_sinks,
        K_SCALE_KIND=features.k_scale_kind, V_SCALE_KIND=features.v_scale_kind, HAS_BOUNDS=has_bounds,
        PLANNED=planned,
        RETURN_LSE=return_lse, DOT_DTYPE=dot_dtype, BLOCK_B=BLOCK_B, USE_PDL=pdl,
        MERGE_KERNEL=merge_kernel_of(config, split, batch * k_cache.shape[2], programs, capacity), **_probes(config),
    )


def covered(capacity: int, features: Features, q_len: int) -> int:
    """The most keys a head of a cache of ``capacity`` tokens can attend to: with a window, its
    width (a query row sees ``window_left`` keys before it, the q_len rows together q_len - 1 more)."""
    if features.has_window:
        return min(capacity, features.window_left + q_len)
    return capacity


def merge_shape(head_dim: int, merge_rows: int, busy: int, heads: int) -> tuple[int, int]:
    """(columns of a merge-kernel program, members it loads at once) for ``heads`` kv heads cut
    among ``busy`` programs: every member of a head of average length at once (a program's loads
    are all in flight together, so its latency is its number of steps; at most MERGE_MEMBERS), in
    as few columns as fit ``merge_load`` values (fewer programs); a power of two from 4 that
    divides ``head_dim``."""
    load = merge_load(merge_rows)
    members = min(MERGE_MEMBERS, next_pow2(min(busy, -(-busy // heads) + 1)))
    cols = 4
    while head_dim % (2 * cols) == 0 and members * merge_rows * 2 * cols <= load and 2 * cols <= 64:
        cols *= 2
    return cols, max(1, min(members, load // (merge_rows * cols)))


# Batch-invariant mode's merge programs: columns a program (a power of two that divides every
# supported head dim) and the most members a load step. Constants, so that a head's sums never
# depend on its companions: 64 members are a 32k-token head at the default split.
INVARIANT_MERGE_COLS = 16
INVARIANT_MERGE_MEMBERS = 64


def merge_constexprs(params: dict, busy: int, heads: int, features: Features) -> dict:
    """The merge kernel's compile-time parameters for a decode call of compile-time parameters
    ``params`` over ``heads`` kv heads that keeps ``busy`` programs busy. In batch-invariant mode
    (``SPLIT``) the shape is fixed by the head dim and rows alone."""
    rows = params["MERGE_ROWS"]
    if params["SPLIT"]:
        cols = INVARIANT_MERGE_COLS
        members = max(1, min(INVARIANT_MERGE_MEMBERS, merge_load(rows) // (rows * cols)))
    else:
        cols, members = merge_shape(params["HEAD_DIM"], rows, busy, heads)
    return dict(
        GROUP=params["GROUP"], Q_LEN=params["Q_LEN"], MERGE_ROWS=rows, HEAD_DIM=params["HEAD_DIM"],
        HEAD_DIM_PAD=params["HEAD_DIM_PAD"], COLS=cols, MEMBERS=members,
        V_SCALE_KIND=features.v_scale_kind, RETURN_LSE=params["RETURN_LSE"], HAS_SINKS=params["HAS_SINKS"],
        USE_PDL=params["USE_PDL"], BY_SLOT=params["SPLIT"] > 0,
    )


class Call:
    """The kernel call for one call key, built once: its compile-time parameters, grid and every
    argument fixed by the key (strides, sizes, window, scale), plus the compiled kernel after
    the first launch. :meth:`launch` fills in the tensors of each call.

    Calls with one key (:func:`call_key`) share a ``Call``: ``DecodeWrapper.run`` and
    ``leanattn.decode`` keep them in a dict, so a step's host path is one dict lookup and one
    launch (small calls are host-bound)."""

    __slots__ = ("features", "kernel", "programs", "device", "config", "pdl", "params", "scales", "fixed", "hit",
                 "timeline", "merge_params", "merge_grid", "merge_fixed", "merge_hit", "eager_params", "eager_hit",
                 "graph_loaded")

    def __init__(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor | None, *, block_table: torch.Tensor | None, k_scale: float | torch.Tensor | None,
        v_scale: float | torch.Tensor | None, has_seqlens: bool, has_leftpad: bool, planned: bool,
        features: Features, softmax_scale: float, batch: int, capacity: int, programs: int, config: KernelConfig,
        split: int, has_bounds: bool = False,
    ) -> None:
        kv_heads = k_cache.shape[2]
        if block_table is None:
            page_size, stride_btb, num_pages = 0, 0, 0
        else:
            page_size, stride_btb, num_pages = k_cache.shape[1], block_table.stride(0), k_cache.shape[0]
        self.features, self.programs, self.device, self.config = features, programs, q.device, config
        self.kernel = config.kernel or lean_decode_kernel
        self.pdl = pdl_of(config, q.device)
        keys = covered(capacity, features, q.shape[1])  # the most keys a head attends to
        self.params = constexprs(q, k_cache, page_size, config, features, has_seqlens=has_seqlens,
                                 has_leftpad=has_leftpad, planned=planned, return_lse=lse is not None, pdl=self.pdl,
                                 split=split, has_bounds=has_bounds, batch=batch, programs=programs, capacity=keys)
        # Float scales are part of the key: their (kv_heads,) tensors are resolved once. Tensor
        # scales' kinds (their dims) are part of it too, through their layouts.
        self.scales = tuple(
            None if not features.fp8 or isinstance(x, torch.Tensor) else scale_tensor(1.0 if x is None else x, kv_heads, q.device)
            for x in (k_scale, v_scale))
        self.fixed = (
            # (the last stride of q, k_cache, v_cache and out is 1)
            *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:3],
            *(lse.stride() if lse is not None else (0, 0, 0)), stride_btb,
            batch, kv_heads, capacity, num_pages, features.window_left, features.window_right,
            kernel_scale(softmax_scale, features), features.softcap,
        )
        self.hit: tuple | None = None
        # The merge kernel's compile-time parameters, grid and fixed arguments, when the call has one.
        self.merge_params, self.merge_grid = None, (0, 0)
        if self.params["MERGE_KERNEL"]:
            heads = batch * kv_heads
            busy = busy_programs(config, heads, programs, keys)
            self.merge_params = merge_constexprs(self.params, busy, heads, features)
            self.merge_grid = (batch * kv_heads, self.params["HEAD_DIM"] // self.merge_params["COLS"])
        self.merge_fixed = (*out.stride()[:3], *(lse.stride() if lse is not None else (0, 0, 0)), kv_heads)
        self.merge_hit: tuple | None = None
        # Eager calls of the rule's merge kernel that are small enough to be host-bound merge by
        # the ticket tree, in one launch (EAGER_ONE_LAUNCH_BYTES); agreeing to fp32 rounding, not
        # bitwise, with the graph's. Not under the interpreter (no graphs, no host cost to save).
        self.eager_params: dict | None = None
        self.eager_hit: tuple | None = None
        self.graph_loaded = False  # the graph's form is compiled and loaded (by the first eager call)
        read = 2 * batch * kv_heads * keys * q.shape[3] * k_cache.element_size()
        if (self.merge_params is not None and config.merge_kernel is None and not split and not interpreting()
                and read <= EAGER_ONE_LAUNCH_BYTES):
            self.eager_params = {**self.params, "MERGE_KERNEL": False}
        # A probe's per-program stamps (config.constexprs with ("TIMELINE", True)): see
        # kernels/lean_decode.py's EV_* events. The last launch's stamps; zero where none.
        self.timeline: torch.Tensor | None = None
        if interpreting() and self.params["TIMELINE"]:
            raise ValueError("TIMELINE stamps are a GPU instruction (%globaltimer): the interpreter has none")
        if self.params["TIMELINE"]:
            self.timeline = torch.zeros(programs, EVENTS.value, dtype=torch.int64, device=q.device)

    def launch(
        self, bufs: tuple[torch.Tensor, ...], q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        out: torch.Tensor, lse: torch.Tensor | None, cache_seqlens: torch.Tensor | None,
        cache_leftpad: torch.Tensor | None, block_table: torch.Tensor | None, sinks: torch.Tensor | None,
        k_scale: torch.Tensor | float | None, v_scale: torch.Tensor | float | None, plan: torch.Tensor | None,
        bounds: torch.Tensor | None = None,
    ) -> None:
        """Launch on the workspace ``bufs`` (acc, stats, head tickets, chunk tickets, merge jobs) for
        tensors of this call's key, writing ``out`` (and ``lse`` (batch, q_heads, q_len) when given).
        ``plan`` (rows = the grid) gives each program its share; without it each program locates
        its own. ``bounds``: int32 (batch, q_len, 2) key bounds of each query token, for a call
        built with ``has_bounds``."""
        acc, stats, tickets, chunk_tickets, jobs = bufs
        if self.features.fp8:
            k_scale = self.scales[0] if self.scales[0] is not None else k_scale
            v_scale = self.scales[1] if self.scales[1] is not None else v_scale
        else:
            k_scale = v_scale = acc
        args = (
            q, k_cache, v_cache, out, lse if lse is not None else acc,
            cache_seqlens if cache_seqlens is not None else tickets,
            cache_leftpad if cache_leftpad is not None else tickets,
            block_table if block_table is not None else tickets, sinks if sinks is not None else acc, k_scale,
            v_scale, bounds if bounds is not None else tickets, plan if plan is not None else tickets, acc, stats, tickets, chunk_tickets,
            jobs, self.timeline if self.timeline is not None else tickets, *self.fixed,
        )
        merge_args = () if self.merge_params is None else (
            jobs, acc, stats, out, lse if lse is not None else acc, sinks if sinks is not None else acc, v_scale,
            *self.merge_fixed)
        if self.eager_params is not None and not torch.cuda.is_current_stream_capturing():
            if not self.graph_loaded:
                # The graph's two kernels, compiled and loaded now (CUDA cannot load a kernel
                # during capture), not run; where that is not possible, run once to load them.
                self.hit = self.hit or prepare(self.kernel, self.programs, args, self.params, self.config, self.pdl,
                                               self.device, self.config.programs_per_sm)
                self.merge_hit = self.merge_hit or prepare(lean_merge_kernel, self.merge_grid, merge_args,
                                                           self.merge_params, MERGE_LAUNCH, self.pdl, self.device)
                if self.hit is None or self.merge_hit is None:
                    self._launch_graph_form(args, merge_args)
                self.graph_loaded = True
            self.eager_hit = launch(self.kernel, self.programs, args, self.eager_params, self.config, self.pdl,
                                    self.device, self.eager_hit, self.config.programs_per_sm)
            return
        self._launch_graph_form(args, merge_args)

    def _launch_graph_form(self, args: tuple, merge_args: tuple) -> None:
        """The rule's launches: the decode kernel, and the merge kernel when the call has one."""
        self.hit = launch(self.kernel, self.programs, args, self.params, self.config, self.pdl, self.device, self.hit,
                          self.config.programs_per_sm)
        if self.merge_params is not None:
            self.merge_hit = launch(lean_merge_kernel, self.merge_grid, merge_args, self.merge_params, MERGE_LAUNCH,
                                    self.pdl, self.device, self.merge_hit)


# leanattn.decode's calls by call key (each DecodeWrapper keeps its own).
_DECODE_CALLS: dict[tuple, Call] = {}


def decode_into(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None, *,
    cache_seqlens: torch.Tensor | None, cache_leftpad: torch.Tensor | None, block_table: torch.Tensor | None,
    sinks: torch.Tensor | None, k_scale: float | torch.Tensor | None, v_scale: float | torch.Tensor | None,
    plan: torch.Tensor | None, features: Features, softmax_scale: float, num_programs: int | None,
    config: KernelConfig | None, causal: bool, window_size: tuple[int, int], split: int,
) -> tuple[Call, int] | None:
    """``leanattn.decode``'s launch (eager, or inside its custom op), on the device's shared
    workspace: config (``config`` or the heuristic's), grid (the plan's rows, ``num_programs``
    or the default), buffers and key, then the key's :class:`Call`. ``split``: tokens per split
    in batch-invariant mode (a multiple of the config's tile), else 0. Returns the Call and the
    workspace slots it needs (None for an empty batch: nothing to launch)."""
    batch, q_len, q_heads, head_dim = q.shape
    if batch == 0:
        return None
    rows = q_len * (q_heads // k_cache.shape[2])
    kv_heads = k_cache.shape[2]
    given = config is not None
    capacity = capacity_of(k_cache, block_table)
    big = large(q.device, batch * kv_heads, capacity)
    config = config or heuristic(head_dim, k_cache.dtype, rows, block_table is not None, split > 0, big)
    programs = plan.shape[0] if plan is not None else grid(q.device, config, num_programs)
    need = slots(programs, split, batch, kv_heads, capacity)
    if not given and not split:
        # The heuristic's grid follows the call's size (large): the workspace a warm-up call
        # grows fits the other size's grid too, so a capture of another batch needs nothing.
        other = heuristic(head_dim, k_cache.dtype, rows, block_table is not None, False, not big)
        need = max(need, slots(grid(q.device, other, num_programs), 0, batch, kv_heads, capacity))
    bufs = buffers(workspace_for(q.device), q.device, need, head_dim, rows, plan is not None)
    lengths = (layout_of(cache_seqlens, cache_leftpad, plan), batch, capacity, programs, config, causal,
               tuple(window_size), softmax_scale, split)
    key = call_key(q, k_cache, v_cache, out, lse, block_table, sinks, k_scale, v_scale, features.softcap, lengths)
    call = _DECODE_CALLS.get(key)
    if call is None:
        call = _DECODE_CALLS[key] = Call(
            q, k_cache, v_cache, out, lse, block_table=block_table, k_scale=k_scale, v_scale=v_scale,
            has_seqlens=cache_seqlens is not None, has_leftpad=cache_leftpad is not None, planned=plan is not None,
            features=features, softmax_scale=softmax_scale, batch=batch, capacity=capacity, programs=programs,
            config=config, split=split)
    call.launch(bufs, q, k_cache, v_cache, out, lse, cache_seqlens, cache_leftpad, block_table, sinks, k_scale,
                v_scale, plan)
    return call, need
