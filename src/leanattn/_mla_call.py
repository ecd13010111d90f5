"""The one builder of an MLA-kernel call (``kernels/mla_decode.py``), as ``_call`` is decode's.

From validated arguments it derives the launch config, the packing of query heads into blocks,
the grid, the workspace buffers, the kernel's arguments and compile-time parameters, and the key
of the compiled kernel. ``leanattn.mla_decode``, ``MLAWrapper.run`` and the custom op launch
through an :class:`MLACall`.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from . import _call
from ._checks import capacity_of
from ._features import SCALE_HEAD, SCALE_SEQ, scale_kind, scale_tensor
from ._launch import _capability, launch
from ._workspace import Workspace, outside_graph_pools
from .kernels import mla_gluon
from .kernels.config import MLAConfig, choose_mla_config, interpreting, next_pow2
from .kernels.lean_decode import LOG2E
from .kernels.mla_decode import mla_decode_kernel, mla_merge_kernel
from .kernels.plan import BLOCK_B, PLAN_FIELDS, lean_plan_kernel


@functools.lru_cache(maxsize=None)
def heuristic(head_dim: int, head_dim_v: int, kv_dtype: torch.dtype, rows: int,
              device: torch.device | None = None) -> MLAConfig:
    """The launch heuristic's config for ``rows`` (q_len x q_heads) query rows of a request on
    ``device`` (None: one that does not run mla_gluon's kernels)."""
    return choose_mla_config(head_dim, head_dim_v, kv_dtype, rows, device is not None and gluon_device(device))


def packing(q_len: int, q_heads: int, block_rows: int) -> tuple[int, int]:
    """(query heads per block, blocks per request): the most heads whose q_len tokens fit in
    ``block_rows`` rows and divide q_heads (q_len <= 16 <= block_rows, so at least one). Not
    cached, so torch.compile traces it; the launch path uses :func:`blocks_of`."""
    group = max(g for g in range(1, q_heads + 1) if q_heads % g == 0 and q_len * g <= block_rows)
    return group, q_heads // group


blocks_of = functools.lru_cache(maxsize=None)(packing)


def mla_slots(programs: int, split: int, batch: int, blocks: int, capacity: int) -> int:
    """Workspace slots of an MLA call: decode's (``_call.slots``), plus a third per program
    outside batch-invariant mode for the chunk sums of ``mla_merge_kernel`` (after mla_gluon's
    kernel; its tickets are the call's own, :attr:`MLACall.merge_tickets`)."""
    return _call.slots(programs, split, batch, blocks, capacity) + (0 if split else programs)


def rows_of(q_len: int, q_heads: int, config: MLAConfig) -> int:
    """Query rows of a block (q_len x heads per block): what the workspace's partials hold."""
    return q_len * blocks_of(q_len, q_heads, config.block_rows)[0]


class MLACall:
    """The MLA kernel call for one key (see :func:`mla_decode_into`), built once: compile-time
    parameters, grid and every argument fixed by the key; :meth:`launch` fills in the tensors."""

    __slots__ = ("programs", "device", "config", "pdl", "params", "scale", "fixed", "hit", "blocks", "fp8", "tma",
                 "gluon", "gluon_ws", "gluon_fp8", "gluon_eager", "gluon_loaded", "gluon_view", "gluon_params", "gluon_fixed", "gluon_hit",
                 "gluon_configs", "timeline", "plan", "plan_args", "plan_params", "plan_hit", "merge_params", "merge_grid", "merge_fixed",
                 "merge_tickets", "merge_hit")

    def __init__(
        self, q: torch.Tensor, kv_cache: torch.Tensor, rope_cache: torch.Tensor | None, out: torch.Tensor,
        lse: torch.Tensor | None, *,
        block_table: torch.Tensor | None, kv_scale: float | torch.Tensor | None, has_seqlens: bool, has_leftpad: bool,
        planned: bool, causal: bool, softmax_scale: float, head_dim_v: int, batch: int, capacity: int,
        programs: int, config: MLAConfig, split: int,
    ) -> None:
        _, q_len, q_heads, head_dim = q.shape
        group, self.blocks = blocks_of(q_len, q_heads, config.block_rows)
        rows, merge_rows, dv_pad, merge_wide = _call.padded_sizes(head_dim_v, q_len * group)
        if block_table is None:
            page_size, stride_btb, num_pages = 0, 0, 0
        else:
            page_size, stride_btb, num_pages = kv_cache.shape[1], block_table.stride(0), kv_cache.shape[0]
        # The caches' 2-D views when the TMA loop can take them, else None. A left pad need not
        # be a multiple of the tile, so paged tiles could cross pages. Batch-invariant mode
        # takes the pointer loop always: the two loops sum in different orders, and a
        # sequence's bits must not depend on its cache's layout.
        view = None if split or (has_leftpad and page_size) else \
            tma_view(kv_cache, rope_cache, page_size, head_dim_v, head_dim - head_dim_v, config.tile)
        self.fp8 = kv_cache.dtype.itemsize == 1
        kind = scale_kind(kv_scale) if self.fp8 else 0
        # Hopper: a call whose caches have a 2-D view (16-bit, or fp8 with one scale or one a
        # request) can run as mla_gluon's hand-pipelined kernel, then mla_merge_kernel as the
        # merge of the blocks the shares cut, on one plan (two launches, three unplanned: see
        # launch for when).
        self.gluon = view is not None and config.gluon is not False and kind in (0, SCALE_HEAD, SCALE_SEQ) and \
            gluon_serves(q.device, config.tile, head_dim_v, head_dim - head_dim_v, rows, kv_cache.element_size())
        self.gluon_loaded = False
        self.gluon_ws = self.gluon_fp8 = False
        self.timeline: torch.Tensor | None = None
        self.gluon_view = view
        self.gluon_eager = config.gluon is True or rows >= 32 or \
            batch * capacity * head_dim * kv_cache.element_size() >= GLUON_EAGER_BYTES
        self.tma = view if config.tma and not self.fp8 else None  # the Triton TMA loop: 16-bit caches
        self.programs, self.device, self.config = programs, q.device, config
        self.pdl = _call.pdl_of(config, q.device)
        unit, target_share = _call.unit_of(config, split)
        self.params = dict(
            GROUP=group, Q_LEN=q_len, ROWS=rows, DV=head_dim_v, DV_PAD=dv_pad, DR=head_dim - head_dim_v,
            DR_PAD=max(16, next_pow2(head_dim - head_dim_v)), TILE=config.tile, PAGE_SIZE=page_size,
            TARGET_SHARE=target_share, SPLIT=split, UNIT=unit, MERGE_ROWS=merge_rows, MERGE_WIDE=merge_wide,
            ARRIVE_CHUNK=_call.ARRIVE_CHUNK, HAS_SEQLENS=has_seqlens, HAS_LEFTPAD=has_leftpad,
            HAS_MASK=causal and q_len > 1, SCALE_KIND=kind, PLANNED=planned,
            RETURN_LSE=lse is not None, DOT_DTYPE=_call.dot_dtype_of(config, q.dtype, kv_cache.dtype),
            BLOCK_B=BLOCK_B, USE_PDL=self.pdl, USE_TMA=self.tma is not None, ROPE_APART=rope_cache is not None,
            **dict(config.constexprs),
        )
        # A float scale is part of the key: its (1,) tensor is made once.
        self.scale = scale_tensor(1.0 if kv_scale is None else kv_scale, 1, q.device) \
            if self.fp8 and not isinstance(kv_scale, torch.Tensor) else None
        self.fixed = (
            *q.stride()[:3], *kv_cache.stride()[:2], *(rope_cache if rope_cache is not None else kv_cache).stride()[:2],
            *out.stride()[:3],
            *(lse.stride() if lse is not None else (0, 0, 0)), stride_btb,
            batch, self.blocks, capacity, num_pages, softmax_scale * LOG2E,
        )
        self.hit: tuple | None = None
        if self.gluon:
            # Made outside any CUDA graph's private pool: the call outlives the step.
            self.plan = None if planned else outside_graph_pools(q.device, lambda: (
                torch.zeros(programs, PLAN_FIELDS.value, dtype=torch.int32, device=q.device),))[0]
            # The merge's tickets, one per (cut block, column chunk), the block named by its first
            # member: P x 16 at a 512-wide latent, more than the workspace's 3P of a kind. Zero
            # between launches (each is put back by the chunk that draws its last number).
            self.merge_tickets = outside_graph_pools(q.device, lambda: (
                torch.zeros(programs * (dv_pad // MERGE_COLS), dtype=torch.int32, device=q.device),))[0]
            self.plan_args = (batch, self.blocks, capacity, 0, 0)  # (no tickets: ZERO_TICKETS off)
            self.plan_params = dict(HAS_SEQLENS=has_seqlens, HAS_LEFTPAD=has_leftpad, Q_LEN=q_len, HAS_WINDOW=False,
                                    TILE=unit, TARGET_SHARE=target_share, BLOCK_B=BLOCK_B, USE_PDL=self.pdl,
                                    ZERO_TICKETS=False)
            self.plan_hit = None
            self.merge_params = dict(
                GROUP=group, Q_LEN=q_len, MERGE_ROWS=merge_rows, DV_PAD=dv_pad, TILE=config.tile, COLS=MERGE_COLS,
                ARRIVE_CHUNK=_call.ARRIVE_CHUNK, HAS_SEQLENS=has_seqlens, HAS_LEFTPAD=has_leftpad,
                RETURN_LSE=lse is not None, USE_PDL=self.pdl,
            )
            self.merge_grid = (programs, dv_pad // MERGE_COLS)
            self.merge_fixed = (*out.stride()[:3], *(lse.stride() if lse is not None else (0, 0, 0)), capacity)
            # Warp-specialised kernels: 16-bit 64-row blocks where P fits over a tile's rope
            # columns (4 + 4 warps), fp8 16-row blocks of DeepSeek's widths (4 + 2 x 4 warps).
            # Other blocks take the uniform one: 4 warps for 16-bit 16-row blocks, else 8 (fp8
            # tiles are converted by every warp: 16 rows, 4 x 32k at 16 heads on an H200, 86.0 µs
            # at 4 warps, 69.9 at 8).
            self.gluon_ws = not self.fp8 and ws_serves(rows, config.tile, head_dim - head_dim_v)
            self.gluon_fp8 = self.fp8 and fp8_ws_serves(rows, config.tile, head_dim_v, head_dim - head_dim_v)
            warps = 4 if (rows == 16 and not self.fp8) or self.gluon_ws or self.gluon_fp8 else 8
            self.gluon_params = dict(
                GROUP=group, Q_LEN=q_len, ROWS=rows, MERGE_ROWS=merge_rows, DV=head_dim_v, DR=head_dim - head_dim_v,
                TILE=config.tile, PAGE_SIZE=page_size, HAS_SEQLENS=has_seqlens, HAS_LEFTPAD=has_leftpad,
                HAS_MASK=causal and q_len > 1, RETURN_LSE=lse is not None, ROPE_APART=rope_cache is not None,
                **(dict(VALUE_REGS=WS_VALUE_REGS) if self.gluon_ws else
                   dict(SCALE_KIND=kind, CONVERT_REGS=FP8_CONVERT_REGS) if self.gluon_fp8 else
                   dict(SCALE_KIND=kind, WARPS=warps)),
            )
            # config.timeline: the uniform and fp8 kernels count SM clocks by phase into a row of 16
            # a program (mla_gluon.TIMELINE_PHASES).
            stamped = config.timeline and not self.gluon_ws
            if stamped:
                self.timeline = outside_graph_pools(q.device, lambda: (
                    torch.zeros(programs, 16, dtype=torch.int64, device=q.device),))[0]
                self.gluon_params["TIMELINE"] = True
            # The fp8 kernel reads the caches' rows by pointer, the others by tensor descriptor.
            row_strides = (view[2][0], view[3][0]) if self.gluon_fp8 else ()
            self.gluon_fixed = (
                *q.stride()[:3], *out.stride()[:3], *(lse.stride() if lse is not None else (0, 0, 0)), stride_btb,
                *row_strides, self.blocks, capacity, num_pages, softmax_scale * LOG2E,
            )
            self.merge_hit, self.gluon_hit = None, None
            self.gluon_configs = (dataclasses.replace(config, num_warps=4, num_stages=1),
                                  dataclasses.replace(config, num_warps=warps, num_stages=1))

    def launch(
        self, bufs: tuple[torch.Tensor, ...], q: torch.Tensor, kv_cache: torch.Tensor, rope_cache: torch.Tensor | None,
        out: torch.Tensor, lse: torch.Tensor | None, cache_seqlens: torch.Tensor | None,
        cache_leftpad: torch.Tensor | None, block_table: torch.Tensor | None, kv_scale: torch.Tensor | float | None,
        plan: torch.Tensor | None,
    ) -> None:
        """Launch on the workspace ``bufs`` (acc, stats, head tickets, chunk tickets) for tensors
        of this call's key; ``plan`` (rows = the grid) gives each program its share."""
        acc, stats, tickets, chunk_tickets = bufs[:4]
        scale = (self.scale if self.scale is not None else kv_scale) if self.fp8 else acc
        rope = rope_cache if rope_cache is not None else kv_cache
        # The Gluon path's kernel time is the smaller on every shape measured, its host time the
        # larger (about 40 µs more a call on an H200's host): taken in CUDA-graph capture always,
        # and in eager calls where its kernel saves more (see GLUON_EAGER_BYTES). Bits therefore
        # depend on the mode for the calls the eager rule sends to the Triton kernel.
        if self.gluon and (self.gluon_eager or torch.cuda.is_current_stream_capturing()):
            self._launch_gluon(bufs, q, kv_cache, rope, out, lse, cache_seqlens, cache_leftpad, block_table, scale,
                               plan)
            return
        if self.gluon and not self.gluon_loaded:
            # A kernel's binary is loaded at its first launch, which CUDA refuses inside graph
            # capture: the Gluon path runs once here, eagerly, so that a later capture finds
            # its kernels loaded. The Triton kernel's launch below writes the call's results.
            self._launch_gluon(bufs, q, kv_cache, rope, out, lse, cache_seqlens, cache_leftpad, block_table, scale,
                               plan)
        if self.tma is not None:
            # A descriptor holds the cache's address: made for each call (each layer's cache).
            rows, tile, (kv_stride, dv), (rope_stride, dr) = self.tma
            kv_desc = TensorDescriptor(kv_cache, [rows, kv_cache.shape[-1]], [kv_stride, 1], [tile, dv])
            kr_desc = TensorDescriptor(rope, [rows, rope.shape[-1]], [rope_stride, 1], [tile, dr])
        else:
            kv_desc = kr_desc = kv_cache
        args = (
            q, kv_cache, rope, kv_desc, kr_desc, out, lse if lse is not None else acc,
            cache_seqlens if cache_seqlens is not None else tickets,
            cache_leftpad if cache_leftpad is not None else tickets,
            block_table if block_table is not None else tickets, scale,
            plan if plan is not None else tickets, acc, stats, tickets, chunk_tickets, *self.fixed,
        )
        kernel = self.config.kernel or mla_decode_kernel
        self.hit = launch(kernel, self.programs, args, self.params, self.config, self.pdl, self.device, self.hit)

    def _launch_gluon(
        self, bufs: tuple[torch.Tensor, ...], q: torch.Tensor, kv_cache: torch.Tensor, rope: torch.Tensor,
        out: torch.Tensor, lse: torch.Tensor | None, cache_seqlens: torch.Tensor | None,
        cache_leftpad: torch.Tensor | None, block_table: torch.Tensor | None, scale: torch.Tensor,
        plan: torch.Tensor | None,
    ) -> None:
        """The plan (unplanned calls), mla_gluon's attention, then the merge of cut blocks.
        ``scale``: an fp8 cache's float32 scale tensor (else any tensor: unread)."""
        self.gluon_loaded = True
        acc, stats, tickets = bufs[:3]
        seqlens = cache_seqlens if cache_seqlens is not None else tickets
        leftpad = cache_leftpad if cache_leftpad is not None else tickets
        small, wide = self.gluon_configs
        if plan is None:
            plan = self.plan
            self.plan_hit = launch(lean_plan_kernel, self.programs, (seqlens, leftpad, plan, plan, *self.plan_args),
                                   self.plan_params, small, self.pdl, self.device, self.plan_hit)
        rows, tile, (kv_stride, dv), (rope_stride, dr) = self.gluon_view
        table = block_table if block_table is not None else tickets
        lse_t = lse if lse is not None else acc
        if self.gluon_fp8:
            kernel, caches = mla_gluon.mla_attend_gluon_fp8, (kv_cache, rope)
        else:
            kernel = mla_gluon.mla_attend_gluon_ws if self.gluon_ws else mla_gluon.mla_attend_gluon
            caches = (mla_gluon.descriptor(kv_cache, rows, kv_stride, tile, dv),
                      mla_gluon.descriptor(rope, rows, rope_stride, tile, dr))
        timeline = self.timeline if self.timeline is not None else self.merge_tickets  # unread when not stamped
        args = (q, *caches, out, lse_t, seqlens, leftpad, table, plan, acc, stats,
                *(() if self.gluon_ws else (scale, timeline)), *self.gluon_fixed)
        self.gluon_hit = launch(kernel, self.programs, args, self.gluon_params, wide, False, self.device,
                                self.gluon_hit)
        args = (out, lse_t, seqlens, leftpad, plan, acc, stats, self.merge_tickets, *self.merge_fixed)
        self.merge_hit = launch(mla_merge_kernel, self.merge_grid, args, self.merge_params, small, self.pdl,
                                self.device, self.merge_hit)


@torch.compiler.assume_constant_result  # torch.compile traces the MLA config's choice: a constant there
def gluon_device(device: torch.device) -> bool:
    """Whether ``mla_gluon``'s kernels run on ``device``: a Hopper GPU (their warpgroup
    products), a Triton with Gluon, LEANATTN_GLUON not 0 (read at import)."""
    return (_GLUON and mla_gluon.AVAILABLE and device.type == "cuda" and not interpreting()
            and _capability(device) == 9)


def gluon_serves(device: torch.device, tile: int, head_dim_v: int, rope_dim: int, rows: int, itemsize: int = 2) -> bool:
    """Whether ``mla_gluon``'s kernel takes a call of a cache of ``itemsize`` bytes a value (2,
    or 1 for fp8) whose 2-D view it can read (``tma_view``): a device of ``gluon_device``,
    64-key tiles (the products' M), latent and rope widths that are multiples of 64 (its
    shared-memory passes), a latent of at least 128 (the output product's M over two
    warpgroups), and in a block's shared memory q, two tiles as they land (fp8: and one in fp16)
    and p."""
    width = head_dim_v + rope_dim
    tiles = 2 * tile * width * itemsize + (2 * tile * width if itemsize == 1 else 0)
    shared = 2 * (rows * width + tile * rows) + tiles + 2048  # barriers, reductions
    return (gluon_device(device) and tile == 64 and head_dim_v % 64 == 0 and rope_dim % 64 == 0
            and head_dim_v >= 128 and shared <= 232448)


def ws_serves(rows: int, tile: int, rope_dim: int) -> bool:
    """Whether a call ``gluon_serves`` takes runs as ``mla_attend_gluon_ws``: blocks of 64 rows,
    and P (rows x tile) fits over a tile's rope columns (tile x rope_dim), LEANATTN_GLUON_WS not
    0 (read at import)."""
    return _GLUON_WS and rows == 64 and tile == 64 and rope_dim == 64


def fp8_ws_serves(rows: int, tile: int, head_dim_v: int, rope_dim: int) -> bool:
    """Whether an fp8 call ``gluon_serves`` takes runs as ``mla_attend_gluon_fp8``: blocks of 16
    rows (at 32 its product warpgroup spills), 64-key tiles, DeepSeek's latent 512 and rope 64
    (its loads), LEANATTN_GLUON_WS not 0 (read at import)."""
    return _GLUON_WS and rows == 16 and tile == 64 and head_dim_v == 512 and rope_dim == 64


_GLUON = os.environ.get("LEANATTN_GLUON", "1") != "0"
_GLUON_WS = os.environ.get("LEANATTN_GLUON_WS", "1") != "0"
# Registers a thread of mla_attend_gluon_ws's value warpgroup asks for (the other gets the rest).
WS_VALUE_REGS = 192
# Registers a thread of mla_attend_gluon_fp8's converting warpgroups ask for (the product one
# gets the rest): sm_90, triton 3.6, 24 bytes of spills in all at 120, 216 at 152.
FP8_CONVERT_REGS = 120
# Eager calls (outside CUDA-graph capture) take mla_gluon's kernel for blocks of 32 or 64 rows
# (2.2-3.2x faster than the Triton kernel at 32-128 heads on an H200; about even on eager 36 MiB
# calls, which are host-bound) or, at 16 rows, caches of at least this many bytes (it saves
# 5-20% there, 16 µs at 144 MiB, less than its extra host time below about 512 MiB);
# MLAConfig(gluon=True) takes it always, gluon=False never.
GLUON_EAGER_BYTES = 512 * 2**20
# Columns of a partial each program of the merge after mla_gluon's kernel takes: 16 programs
# share a 512-wide block (64 rows x 32 columns: 16 registers a thread of 4 warps a partial,
# four partials a step, no spills).
MERGE_COLS = 32


def tma_view(
    kv_cache: torch.Tensor, rope_cache: torch.Tensor | None, page_size: int, head_dim_v: int, rope_dim: int, tile: int,
) -> tuple | None:
    """The 2-D views (rows, width) of the caches that the kernel's TMA loop reads a tile of, as
    (rows, tile, (kv row stride, head_dim_v), (rope row stride, rope_dim)); None when it cannot:
    a cache is neither 16-bit nor fp8 (the Triton kernel's TMA loop reads 16-bit ones only), the
    latent or rope width is not a power of two of at least 16, a cache's rows are not evenly
    spaced with 16-byte aligned starts, or a tile would cross a page (``page_size`` not a
    multiple of ``tile``). ``rope_cache`` None: the rope columns follow the
    latent ones in ``kv_cache``."""
    n, per = kv_cache.shape[:2]
    size = kv_cache.element_size()
    if size not in (1, 2) or page_size % tile or not 0 < n * per < 2**31:
        return None
    if any(w < 16 or w & (w - 1) for w in (head_dim_v, rope_dim)):
        return None
    strides = []
    for cache in (kv_cache, rope_cache if rope_cache is not None else kv_cache):
        stride = cache.stride(1)
        spaced = n == 1 or cache.stride(0) == per * stride  # row r at r x stride, across batch or pages
        if cache.stride(-1) != 1 or (stride * size) % 16 or cache.data_ptr() % 16 or not spaced:
            return None
        strides.append(stride)
    return n * per, tile, (strides[0], head_dim_v), (strides[1], rope_dim)


def call_key(
    q: torch.Tensor, kv_cache: torch.Tensor, rope_cache: torch.Tensor | None, out: torch.Tensor,
    lse: torch.Tensor | None, cache_seqlens: torch.Tensor | None, cache_leftpad: torch.Tensor | None,
    block_table: torch.Tensor | None, kv_scale: object, plan: torch.Tensor | None, rest: tuple,
) -> tuple:
    """Everything the compiled kernel depends on in a call (the tensors' layouts and 16-byte
    alignment, the scale's kind or value) plus ``rest``, the caller's part (head_dim_v, scale,
    causal, batch, capacity, grid, config, split)."""
    scale = _call.layout_of(kv_scale) if isinstance(kv_scale, torch.Tensor) else (type(kv_scale), kv_scale)
    layouts = _call.layout_of(q, kv_cache, rope_cache, out, lse, cache_seqlens, cache_leftpad, block_table, plan)
    return layouts, scale, rest


# leanattn.mla_decode's calls by call key (each MLAWrapper keeps its own).
_MLA_CALLS: dict[tuple, MLACall] = {}


def mla_decode_into(
    q: torch.Tensor, kv_cache: torch.Tensor, rope_cache: torch.Tensor | None, out: torch.Tensor,
    lse: torch.Tensor | None, *,
    cache_seqlens: torch.Tensor | None, cache_leftpad: torch.Tensor | None, block_table: torch.Tensor | None,
    kv_scale: float | torch.Tensor | None, head_dim_v: int, softmax_scale: float, causal: bool,
    num_programs: int | None, split: int, workspace: Workspace,
) -> tuple[MLACall, int, int] | None:
    """``leanattn.mla_decode``'s launch (eager, or inside its custom op) on ``workspace``: the
    heuristic's config, the default or given grid, buffers and key, then the key's
    :class:`MLACall`. ``split``: tokens per split in batch-invariant mode, else 0. Returns the
    call and its workspace's (slots, rows), None for an empty batch."""
    batch, q_len, q_heads, head_dim = q.shape
    if batch == 0:
        return None
    config = heuristic(head_dim, head_dim_v, kv_cache.dtype, q_len * q_heads, q.device)
    programs = _call.grid(q.device, config, num_programs)
    capacity = capacity_of(kv_cache, block_table)
    blocks = blocks_of(q_len, q_heads, config.block_rows)[1]
    slots, rows = mla_slots(programs, split, batch, blocks, capacity), rows_of(q_len, q_heads, config)
    bufs = _call.buffers(workspace, q.device, slots, head_dim_v, rows)
    key = call_key(q, kv_cache, rope_cache, out, lse, cache_seqlens, cache_leftpad, block_table, kv_scale, None,
                   (head_dim_v, softmax_scale, causal, batch, capacity, programs, split))
    call = _MLA_CALLS.get(key)
    if call is None:
        call = _MLA_CALLS[key] = MLACall(
            q, kv_cache, rope_cache, out, lse, block_table=block_table, kv_scale=kv_scale,
            has_seqlens=cache_seqlens is not None, has_leftpad=cache_leftpad is not None, planned=False, causal=causal,
            softmax_scale=softmax_scale, head_dim_v=head_dim_v, batch=batch, capacity=capacity, programs=programs,
            config=config, split=split)
    call.launch(bufs, q, kv_cache, rope_cache, out, lse, cache_seqlens, cache_leftpad, block_table, kv_scale, None)
    return call, slots, rows
