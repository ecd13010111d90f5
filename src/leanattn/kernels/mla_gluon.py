"""The MLA tile loop in Gluon for Hopper: the GPU fast path of ``mla_decode_kernel``'s TMA loop.

Triton's pipeliner, given two buffers of 64-key tiles (three do not fit beside q in shared
memory), issues tile t + 1's copy after tile t's products and waits for it at the top of the next
iteration: the copy never overlaps the math. Here the loop is pipelined by hand on the same two
buffers: tile t + 1's copy is in flight while tile t computes, and tile t + 2's is issued into
tile t's buffer as soon as its last product is done. Same products as ``_mla_attend_tma``
(swap-AB: scores (TILE, ROWS) = k . q^T, output (DV, ROWS) += v^T . p^T, one TMA box per part).

``mla_attend_gluon`` walks a planned share like ``mla_decode_kernel`` and writes each segment:
a whole block straight to the output, a cut one as a partial in the workspace slot the Triton
kernel's merge expects (``2 pid``, or ``2 pid + 1`` for a share's later segment). The merge of
cut blocks is then ``mla_decode.mla_merge_kernel``, one launch after this kernel, which each
program lets start (programmatic dependent launch) once its first segment's tiles are done. No
Gluon interpreter exists: the CPU and every call this kernel does not take run the Triton
kernel, and GPU tests compare the two.

Its kernel is defined only where Triton has Gluon's Hopper API under the names of Triton 3.6,
which it is written and GPU-tested against (``AVAILABLE``); the module imports everywhere.
"""

from __future__ import annotations

import functools

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # Gluon is experimental and its names move (Triton 3.9 renamed thread_barrier to barrier):
    # the kernel is written and GPU-tested against Triton 3.6's; elsewhere the Triton kernel serves.
    AVAILABLE = hasattr(gl, "thread_barrier")
except ImportError:  # a Triton without Gluon: the Triton kernel serves every call
    AVAILABLE = False

# TIMELINE's counts, a row of 16 int64 a program: SM clocks (%clock64) by phase, the number of
# tiles in slot 8. The uniform kernel's phases 0-8; the fp8 kernel's product warpgroup 0, 1 and
# 3-8, its converting warpgroups 9-14.
TIMELINE_PHASES = (
    "total", "wait for the tile", "convert or zero dead rows", "scores", "softmax and p", "output product",
    "segment start", "segment write", "tiles", "convert 0: loads", "convert 0: wait free", "convert 0: store",
    "convert 1: loads", "convert 1: wait free", "convert 1: store", "unused",
)

if AVAILABLE:
    LN2 = gl.constexpr(0.6931471805599453)

    @gluon.jit
    def _plan_field(row, fields, i: gl.constexpr):
        return gl.sum(gl.where(fields == i, row, 0), axis=0)

    @gluon.jit
    def _share(Plan, pid, vec_layout: gl.constexpr):
        """Program ``pid``'s share in ``lean_plan_kernel``'s plan: units [start, end) from tile t
        of request b's block h (an empty one for a program past the plan's)."""
        fields = gl.arange(0, 8, layout=vec_layout)
        plan_row = gl.load(Plan + pid * 8 + fields)
        programs = _plan_field(plan_row, fields, 1)
        start = _plan_field(plan_row, fields, 2).to(gl.int64)
        end = _plan_field(plan_row, fields, 3).to(gl.int64)
        end = gl.where(pid < programs, end, start)
        return start, end, _plan_field(plan_row, fields, 4), _plan_field(plan_row, fields, 5), \
            _plan_field(plan_row, fields, 6)

    @gluon.jit
    def _tile_row(BlockTable, table_row, b, first, tile, live, capacity, num_pages,
                  TILE: gl.constexpr, PAGE_SIZE: gl.constexpr):
        """Row of tile ``tile``'s first key in the cache's 2-D view, and whether its page is out of
        range (then row 0 stands in: the page is never read, its keys NaN the rows that see them).
        ``live``: whether the tile holds a live key (else no block-table entry is read)."""
        if PAGE_SIZE == 0:
            row = b * capacity + first + tile * TILE
            bad = row < 0  # never
        else:
            page = gl.load(BlockTable + table_row + (tile * TILE) // PAGE_SIZE, mask=live, other=0)
            bad = (page < 0) | (page >= num_pages)
            row = gl.where(bad, 0, page * PAGE_SIZE + (tile * TILE) % PAGE_SIZE)
        return row, bad

    @gluon.jit
    def _launch_dependents():
        """``griddepcontrol.launch_dependents``: the next kernel, if launched with PDL (the merge),
        may start once every program has issued it or exited; it still waits for this kernel's
        end and memory before reading (``gdc_wait``). A no-op for a launch without PDL. The PTX
        that Triton 3.6's ``gdc_launch_dependents`` emits: Gluon has no op of its own for it."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _clock():
        """The SM's clock (%clock64), for TIMELINE's counts."""
        return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)

    @gluon.jit
    def _lap(counts, last, k: gl.constexpr):
        """TIMELINE: ``counts`` (a [16] int64 vector of SM clocks by phase) with the clocks since
        ``last`` added to phase k, and now."""
        now = _clock()
        slots = gl.arange(0, 16, layout=counts.type.layout)
        return counts + gl.where(slots == k, now - last, 0), now

    @gluon.jit
    def _store_counts(Timeline, pid, counts, first: gl.constexpr, last: gl.constexpr):
        """TIMELINE: phases [first, last] of ``counts`` into Timeline's row ``pid`` (16 int64)."""
        slots = gl.arange(0, 16, layout=counts.type.layout)
        gl.store(Timeline + pid * 16 + slots, counts, mask=(slots >= first) & (slots <= last))

    @gluon.jit
    def _softmax_tile(s, tok, query, length, bad, m_i, l_i, scale, HAS_MASK: gl.constexpr, PAGED: gl.constexpr,
                      KEYS: gl.constexpr):
        """One tile's step of the online softmax on its raw scores ``s``, whose axis KEYS holds the
        keys ``tok`` (the other the rows, at positions ``query``): masked past ``length`` (and
        after each row's position, HAS_MASK), NaN where a live key's page is ``bad`` (PAGED).
        Returns (p, alpha, m, l): the probabilities against the new running max m, the old sums'
        rescale alpha, and the new running sum l."""
        ROWS_AXIS: gl.constexpr = 1 - KEYS
        keep = gl.expand_dims(tok < length, ROWS_AXIS)
        if HAS_MASK:
            keep = keep & (gl.expand_dims(tok, ROWS_AXIS) <= gl.expand_dims(query, KEYS))
        s = gl.where(keep, s * scale, float("-inf"))
        if PAGED:
            s = gl.where(keep & bad, float("nan"), s)
        m_new = gl.maximum(m_i, gl.max(s, axis=KEYS))
        m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: no inf - inf
        alpha = gl.exp2(m_i - m_shift)
        p = gl.exp2(s - gl.expand_dims(m_shift, KEYS))
        return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=KEYS)

    @gluon.jit
    def _issue(kv_desc, kr_desc, bar, kv_buf, kr_buf, row, pred,
               DV: gl.constexpr, ROPE_APART: gl.constexpr, NBYTES: gl.constexpr):
        mbarrier.expect(bar, NBYTES, pred=pred)
        tma.async_copy_global_to_shared(kv_desc, [row, 0], bar, kv_buf, pred=pred)
        tma.async_copy_global_to_shared(kr_desc, [row, 0 if ROPE_APART else DV], bar, kr_buf, pred=pred)

    @gluon.jit
    def _zero_dead_rows(buf, live_rows, COLS: gl.constexpr, CHUNK: gl.constexpr, TILE: gl.constexpr,
                        layout: gl.constexpr):
        """Zero the rows from ``live_rows`` on of a landed tile in shared memory: a bulk copy reads
        past a sequence's end too, and NaN there would reach the output through 0 x NaN."""
        keep = gl.expand_dims(gl.arange(0, TILE, layout=gl.SliceLayout(1, layout)) < live_rows, 1)
        for c in gl.static_range(COLS // CHUNK):
            part = buf.slice(c * CHUNK, CHUNK, dim=1)
            x = part.load(layout)
            part.store(gl.where(keep, x, gl.zeros_like(x)))

    @gluon.jit
    def _convert_rows(src, dst, live_rows, COLS: gl.constexpr, CHUNK: gl.constexpr, TILE: gl.constexpr,
                      WARPS: gl.constexpr):
        """An fp8 tile ``src`` (TILE, COLS) as landed, into ``dst`` in fp16 (exact: e4m3's and
        e5m2's values are fp16 values), its rows from ``live_rows`` on zeroed (a bulk copy reads past a
        sequence's end, and NaN there would reach the output through 0 x NaN). CHUNK columns a
        pass: one 128-byte swizzle row of the source."""
        THREADS_N: gl.constexpr = CHUNK // 16
        layout: gl.constexpr = gl.BlockedLayout([1, 16], [32 // THREADS_N, THREADS_N], [WARPS, 1], [1, 0])
        if live_rows < TILE:
            keep = gl.expand_dims(gl.arange(0, TILE, layout=gl.SliceLayout(1, layout)) < live_rows, 1)
            for c in gl.static_range(COLS // CHUNK):
                x = src.slice(c * CHUNK, CHUNK, dim=1).load(layout).to(gl.float16)
                dst.slice(c * CHUNK, CHUNK, dim=1).store(gl.where(keep, x, gl.zeros_like(x)))
        else:  # a whole tile: no select per value
            for c in gl.static_range(COLS // CHUNK):
                dst.slice(c * CHUNK, CHUNK, dim=1).store(src.slice(c * CHUNK, CHUNK, dim=1).load(layout).to(gl.float16))

    @gluon.jit
    def _fp16_powers(amax):
        """(2^s, 2^-s) for the power of two that brings ``amax`` (finite, >= 0) into [2^13, 2^14),
        s within [-126, 126]: q times 2^s is exact in fp16 (11 significant bits
        hold bf16's 8) for every element within 2^27 of the largest, as the Triton kernel's
        ``_pow2_factors``; 2^-s undoes it on the fp32 scores."""
        e = ((amax.to(gl.int32, bitcast=True) >> 23) & 0xFF) - 127  # amax's exponent (-127: 0 or subnormal)
        shift = gl.minimum(gl.maximum(13 - e, -126), 126)
        up = ((shift + 127) << 23).to(gl.float32, bitcast=True)
        down = ((127 - shift) << 23).to(gl.float32, bitcast=True)
        return up, down

    @gluon.jit
    def _fp8_query(q_base, cols_v, cols_r, q_real, q_smem, qr_smem, KScale, b, scale, DV: gl.constexpr,
                   SCALE_KIND: gl.constexpr):
        """A block's query rows (``q_base`` + columns, rows where ``q_real``) into q_smem / qr_smem
        in fp16 for an fp8 cache, by one power of two for both parts (their products are
        summed); only finite values set it: an inf or NaN row stays non-finite on its own.
        Returns request b's dequantisation scale (SCALE_KIND 1: KScale[0], 2: KScale[b]) and the
        scores' scale: ``scale`` x that x the power's inverse."""
        q_l = gl.load(q_base + cols_v, mask=q_real, other=0.0).to(gl.float32)
        q_p = gl.load(q_base + DV + cols_r, mask=q_real, other=0.0).to(gl.float32)
        amax = gl.maximum(gl.max(gl.max(gl.where(gl.abs(q_l) < float("inf"), gl.abs(q_l), 0.0), 1), 0),
                          gl.max(gl.max(gl.where(gl.abs(q_p) < float("inf"), gl.abs(q_p), 0.0), 1), 0))
        up, down = _fp16_powers(amax)
        q_smem.store((q_l * up).to(gl.float16))
        qr_smem.store((q_p * up).to(gl.float16))
        if SCALE_KIND == 1:
            kv_scale = gl.load(KScale)
        else:
            kv_scale = gl.load(KScale + b)
        return kv_scale, scale * kv_scale * down

    @gluon.jit
    def _segment(SeqLens, LeftPad, b, t, g, end, capacity, TILE: gl.constexpr, HAS_SEQLENS: gl.constexpr,
                 HAS_LEFTPAD: gl.constexpr):
        """The segment of a share that starts at unit ``g`` (tile ``t`` of request ``b``'s block):
        (first key, live length, the block's tiles, the segment's end tile, its last live tile + 1)."""
        if HAS_LEFTPAD:
            first = gl.minimum(gl.maximum(gl.load(LeftPad + b), 0), capacity)
        else:
            first = 0
        if HAS_SEQLENS:
            length = gl.minimum(gl.maximum(gl.load(SeqLens + b), first), capacity) - first
        else:
            length = capacity - first
        n_units = gl.maximum((length + TILE - 1) // TILE, 1)
        t_end = gl.minimum(n_units.to(gl.int64), t + (end - g)).to(gl.int32)
        # tiles holding a live key (int32 like t: an int64 ``capacity`` makes ``length`` int64)
        t_live = gl.minimum(t_end, ((length + TILE - 1) // TILE).to(gl.int32))
        return first, length, n_units, t_end, t_live

    @gluon.jit
    def _next_segment(g, t, t_end, h, b, blocks):
        """Past a segment of tiles [t, t_end) at unit g: the next block's first unit, tile,
        block and request."""
        g += (t_end - t).to(gl.int64)
        h += 1
        if h == blocks:
            h = 0
            b += 1
        return g, t * 0, h, b  # t * 0: tile 0 as t's type (a literal would not be a tensor)

    @gluon.jit
    def _write_swapped(acc, m_i, l_i, Out, Lse, WsAcc, WsStats, b, h, slot, whole,
                       stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                       GROUP: gl.constexpr, Q_LEN: gl.constexpr, ROWS: gl.constexpr, MERGE_ROWS: gl.constexpr,
                       DV: gl.constexpr, RETURN_LSE: gl.constexpr, o_layout: gl.constexpr):
        """A segment's output from the swapped products' acc (DV, ROWS) and its rows' m and l:
        normalised into Out and the LSE for a whole block (an empty row 0, a NaN row NaN), else
        the unnormalised partial and its m and l in workspace ``slot`` for the merge kernel."""
        o_rows = gl.arange(0, ROWS, layout=gl.SliceLayout(0, o_layout))
        o_cols = gl.arange(0, DV, layout=gl.SliceLayout(1, o_layout))
        if whole:
            empty = l_i == 0.0
            o = gl.where(gl.expand_dims(empty, 0), 0.0, acc / gl.expand_dims(gl.where(empty, 1.0, l_i), 0))
            real = o_rows < Q_LEN * GROUP
            qh = h * GROUP + o_rows % GROUP
            o_ptrs = (Out + b.to(gl.int64) * stride_ob + gl.expand_dims((o_rows // GROUP) * stride_ot + qh * stride_oh, 0)
                      + gl.expand_dims(o_cols, 1))
            gl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=gl.expand_dims(real, 0))
            if RETURN_LSE:
                has_mass = l_i > 0.0
                lse = gl.where(has_mass, (m_i + gl.log2(gl.where(has_mass, l_i, 1.0))) * LN2, float("-inf"))
                lse = gl.where(l_i != l_i, float("nan"), lse)
                gl.store(Lse + b.to(gl.int64) * stride_lb + qh * stride_lh + (o_rows // GROUP) * stride_lt, lse,
                         mask=real)
        else:
            keep = o_rows < MERGE_ROWS
            gl.store(WsAcc + slot.to(gl.int64) * (MERGE_ROWS * DV) + gl.expand_dims(o_rows, 0) * DV
                     + gl.expand_dims(o_cols, 1), acc, mask=gl.expand_dims(keep, 0))
            stats = WsStats + slot * (2 * MERGE_ROWS) + o_rows
            gl.store(stats, m_i, mask=keep)
            gl.store(stats + MERGE_ROWS, l_i, mask=keep)

    @gluon.jit(do_not_specialize=["blocks", "capacity", "num_pages"])
    def mla_attend_gluon(
        Q, kv_desc, kr_desc, Out, Lse, SeqLens, LeftPad, BlockTable, Plan, WsAcc, WsStats, KScale, Timeline,
        stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
        stride_btb, blocks, capacity, num_pages, scale,
        GROUP: gl.constexpr, Q_LEN: gl.constexpr, ROWS: gl.constexpr, MERGE_ROWS: gl.constexpr,
        DV: gl.constexpr, DR: gl.constexpr, TILE: gl.constexpr, PAGE_SIZE: gl.constexpr,
        HAS_SEQLENS: gl.constexpr, HAS_LEFTPAD: gl.constexpr, HAS_MASK: gl.constexpr, RETURN_LSE: gl.constexpr,
        ROPE_APART: gl.constexpr, SCALE_KIND: gl.constexpr, WARPS: gl.constexpr, TIMELINE: gl.constexpr = False,
    ):
        """Program ``pid``'s planned share of (request, block, 64-key tile) units.

        Q (batch, Q_LEN, q_heads, DV + DR) by strides; kv_desc / kr_desc: tensor descriptors of the
        cache's rows as a 2-D tensor with boxes (TILE, DV) and (TILE, DR) (``_mla_call.tma_view``);
        Out (batch, Q_LEN, q_heads, DV); Lse (batch, q_heads, Q_LEN); Plan as ``lean_plan_kernel``
        writes it for ``blocks`` blocks a request. ``scale``: softmax scale x log2(e). A block's
        rows are packed as in ``mla_decode_kernel``; with WARPS = 8 the two warpgroups split the
        rows of the scores and the value columns of the output.

        SCALE_KIND 0: a 16-bit cache, KScale unused. fp8 caches (e4m3, e5m2): 1, KScale (1,) float32 is
        the dequantisation scale; 2, (batch,) one a request. Each landed fp8 tile is converted to
        an fp16 tile in shared memory, and the products run in fp16 (q by a power of two, as in
        the Triton kernel); the scale goes on the fp32 scores and output.

        TIMELINE (tools): SM clocks by phase into Timeline's row pid (16 int64, ``TIMELINE_PHASES``)."""
        pid = gl.program_id(0)
        FP8: gl.constexpr = SCALE_KIND != 0
        WN: gl.constexpr = WARPS // 4
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, WN], instr_shape=[16, ROWS // WN, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, ROWS, 16])
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
        vec_layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
        q_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, DV], gl.bfloat16)
        qr_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, DR], gl.bfloat16)
        p_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([TILE, ROWS], gl.bfloat16)
        NBYTES: gl.constexpr = TILE * (DV + DR) * (1 if FP8 else 2)
        RCHUNK: gl.constexpr = 128 if DR % 128 == 0 else 64  # fp8 rope columns converted a pass

        if FP8:
            # Two landing buffers of fp8 tiles, one fp16 tile the products read.
            dtype: gl.constexpr = gl.float16
            kv8_smem = gl.allocate_shared_memory(kv_desc.dtype, [2, TILE, DV], kv_desc.layout)
            kr8_smem = gl.allocate_shared_memory(kr_desc.dtype, [2, TILE, DR], kr_desc.layout)
            kv_smem = gl.allocate_shared_memory(dtype, [1, TILE, DV],
                                                gl.NVMMASharedLayout.get_default_for([TILE, DV], dtype))
            kr_smem = gl.allocate_shared_memory(dtype, [1, TILE, DR],
                                                gl.NVMMASharedLayout.get_default_for([TILE, DR], dtype))
        else:
            dtype: gl.constexpr = kv_desc.dtype
            kv_smem = gl.allocate_shared_memory(dtype, [2, TILE, DV], kv_desc.layout)
            kr_smem = gl.allocate_shared_memory(dtype, [2, TILE, DR], kr_desc.layout)
            kv8_smem = kv_smem  # tiles land where the products read them
            kr8_smem = kr_smem
        q_smem = gl.allocate_shared_memory(dtype, [ROWS, DV], q_shared)
        qr_smem = gl.allocate_shared_memory(dtype, [ROWS, DR], qr_shared)
        p_smem = gl.allocate_shared_memory(dtype, [TILE, ROWS], p_shared)
        bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(bars.index(i), count=1)
        fence_async_shared()

        fields = gl.arange(0, 8, layout=vec_layout)
        plan_row = gl.load(Plan + pid * 8 + fields)
        total = _plan_field(plan_row, fields, 0).to(gl.int64)
        programs = _plan_field(plan_row, fields, 1)
        start = _plan_field(plan_row, fields, 2).to(gl.int64)
        end = _plan_field(plan_row, fields, 3).to(gl.int64)
        b = _plan_field(plan_row, fields, 4)
        h = _plan_field(plan_row, fields, 5)
        t = _plan_field(plan_row, fields, 6)
        if pid < programs:
            if TIMELINE:
                clk = gl.zeros([16], gl.int64, vec_layout)
                t_start = _clock()
                last = t_start
            # Query rows of a block, as loaded (ld_layout) and as the scores' columns (s_layout).
            q_r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, ld_layout))
            q_offs = (q_r // GROUP) * stride_qt + (q_r % GROUP) * stride_qh
            q_real = gl.expand_dims(q_r < Q_LEN * GROUP, 1)
            cols_v = gl.expand_dims(gl.arange(0, DV, layout=gl.SliceLayout(0, ld_layout)), 0)
            cols_r = gl.expand_dims(gl.arange(0, DR, layout=gl.SliceLayout(0, ld_layout)), 0)
            s_rows = gl.arange(0, ROWS, layout=gl.SliceLayout(0, s_layout))
            s_keys = gl.arange(0, TILE, layout=gl.SliceLayout(1, s_layout))
            q_t = q_smem.permute([1, 0])
            qr_t = qr_smem.permute([1, 0])
            used = 0  # tiles consumed so far: tile j of the program is in buffer j % 2, phase (j // 2) & 1
            g = start
            while g < end:
                first, length, n_units, t_end, t_live = _segment(SeqLens, LeftPad, b, t, g, end, capacity, TILE,
                                                                 HAS_SEQLENS, HAS_LEFTPAD)
                table_row = b.to(gl.int64) * stride_btb

                # This block's query rows into shared memory (every product of the last segment
                # has been waited for, by every warp).
                gl.thread_barrier()
                q_base = Q + b.to(gl.int64) * stride_qb + h * GROUP * stride_qh + gl.expand_dims(q_offs, 1)
                if FP8:
                    kv_scale, seg_scale = _fp8_query(q_base, cols_v, cols_r, q_real, q_smem, qr_smem, KScale, b, scale,
                                                     DV, SCALE_KIND)
                else:
                    q_smem.store(gl.load(q_base + cols_v, mask=q_real, other=0.0).to(dtype))
                    qr_smem.store(gl.load(q_base + DV + cols_r, mask=q_real, other=0.0).to(dtype))
                    kv_scale = 1.0
                    seg_scale = scale
                fence_async_shared()
                gl.thread_barrier()
                for i in gl.static_range(2):
                    live = t + i < t_live
                    row, _ = _tile_row(BlockTable, table_row, b, first, t + i, live, capacity, num_pages, TILE,
                                       PAGE_SIZE)
                    buf = (used + i) % 2
                    _issue(kv_desc, kr_desc, bars.index(buf), kv8_smem.index(buf), kr8_smem.index(buf), row, live, DV,
                           ROPE_APART, NBYTES)

                query = length - Q_LEN + s_rows // GROUP  # each row's position, in keys
                acc = gl.zeros([DV, ROWS], gl.float32, o_layout)
                m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(0, s_layout))
                l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(0, s_layout))
                if TIMELINE:
                    clk, last = _lap(clk, last, 6)
                for tile in range(t, t_live):
                    buf = used % 2
                    mbarrier.wait(bars.index(buf), (used // 2) & 1)
                    if TIMELINE:
                        clk, last = _lap(clk, last, 1)
                    used += 1
                    live_rows = length - tile * TILE
                    if FP8:
                        kv = kv_smem.index(0)
                        kr = kr_smem.index(0)
                        _convert_rows(kv8_smem.index(buf), kv, live_rows, DV, 128, TILE, WARPS)
                        _convert_rows(kr8_smem.index(buf), kr, live_rows, DR, RCHUNK, TILE, WARPS)
                        fence_async_shared()
                        gl.thread_barrier()
                        # The landing buffer is free already: tile + 2's copy now, so two are in
                        # flight during this tile's products.
                        ahead = tile + 2 < t_live
                        ahead_row, _ahead_bad = _tile_row(BlockTable, table_row, b, first, tile + 2, ahead, capacity,
                                                          num_pages, TILE, PAGE_SIZE)
                        _issue(kv_desc, kr_desc, bars.index(buf), kv8_smem.index(buf), kr8_smem.index(buf), ahead_row,
                               ahead, DV, ROPE_APART, NBYTES)
                    else:
                        kv = kv_smem.index(buf)
                        kr = kr_smem.index(buf)
                        if live_rows < TILE:
                            _zero_dead_rows(kv, live_rows, DV, 64, TILE, ld_layout)
                            _zero_dead_rows(kr, live_rows, DR, DR, TILE, ld_layout)
                            fence_async_shared()
                            gl.thread_barrier()
                    if TIMELINE:
                        clk, last = _lap(clk, last, 2)
                    s = warpgroup_mma(kv, q_t, gl.zeros([TILE, ROWS], gl.float32, s_layout), is_async=True)
                    s = warpgroup_mma(kr, qr_t, s, is_async=True)
                    s = warpgroup_mma_wait(0, deps=[s])
                    if TIMELINE:
                        clk, last = _lap(clk, last, 3)
                    bad = False
                    if PAGE_SIZE > 0:
                        _row, bad = _tile_row(BlockTable, table_row, b, first, tile, True, capacity, num_pages, TILE,
                                           PAGE_SIZE)
                    p, alpha, m_i, l_i = _softmax_tile(s, tile * TILE + s_keys, query, length, bad, m_i, l_i,
                                                       seg_scale, HAS_MASK, PAGE_SIZE > 0, 0)
                    p_smem.store(p.to(dtype))
                    fence_async_shared()
                    gl.thread_barrier()
                    if TIMELINE:
                        clk, last = _lap(clk, last, 4)
                    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(0, o_layout)), 0)
                    acc = warpgroup_mma(kv.permute([1, 0]), p_smem, acc, is_async=True)
                    acc = warpgroup_mma_wait(0, deps=[acc])
                    gl.thread_barrier()  # both warpgroups are done with this buffer and with p
                    if not FP8:
                        live = tile + 2 < t_live
                        row, _ = _tile_row(BlockTable, table_row, b, first, tile + 2, live, capacity, num_pages, TILE,
                                           PAGE_SIZE)
                        _issue(kv_desc, kr_desc, bars.index(buf), kv, kr, row, live, DV, ROPE_APART, NBYTES)
                    if TIMELINE:
                        clk, last = _lap(clk, last, 5)
                        clk += gl.where(gl.arange(0, 16, layout=vec_layout) == 8, 1, 0)  # tiles

                # Tiles done: the merge may launch (the first call counts, repeats are no-ops),
                # overlapping the writes and the other programs' last tiles. Its programs take no
                # SM this grid still needs: they launch once every program has come this far.
                _launch_dependents()
                if FP8:
                    acc = acc * kv_scale  # V's dequantisation (a partial too: the merge is linear in it)
                _write_swapped(acc, gl.convert_layout(m_i, gl.SliceLayout(0, o_layout)),
                               gl.convert_layout(l_i, gl.SliceLayout(0, o_layout)), Out, Lse, WsAcc, WsStats, b, h,
                               2 * pid + (g != start).to(gl.int32), (t == 0) & (t_end == n_units), stride_ob,
                               stride_ot, stride_oh, stride_lb, stride_lh, stride_lt, GROUP, Q_LEN, ROWS, MERGE_ROWS,
                               DV, RETURN_LSE, o_layout)
                if TIMELINE:
                    clk, last = _lap(clk, last, 7)

                g, t, h, b = _next_segment(g, t, t_end, h, b, blocks)
            if TIMELINE:
                clk, last = _lap(clk, t_start, 0)
                _store_counts(Timeline, pid, clk, 0, 8)
        for i in gl.static_range(2):
            mbarrier.invalidate(bars.index(i))

    @gluon.jit
    def _ws_write(acc, m_i, l_i, Out, Lse, WsAcc, WsStats, b, h, slot, whole,
                  stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                  COL0: gl.constexpr, GROUP: gl.constexpr, Q_LEN: gl.constexpr, ROWS: gl.constexpr,
                  MERGE_ROWS: gl.constexpr, DV: gl.constexpr, RETURN_LSE: gl.constexpr, STATS: gl.constexpr,
                  o_layout: gl.constexpr):
        """A segment's (ROWS, DV / 2) half of the output at columns COL0: normalised into Out (and
        the LSE, STATS) for a whole block, else the unnormalised partial and (STATS) its m and l in
        workspace ``slot`` for the merge kernel."""
        HALF: gl.constexpr = DV // 2
        rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
        cols = COL0 + gl.arange(0, HALF, layout=gl.SliceLayout(0, o_layout))
        if whole:
            empty = l_i == 0.0
            o = gl.where(gl.expand_dims(empty, 1), 0.0, acc / gl.expand_dims(gl.where(empty, 1.0, l_i), 1))
            real = rows < Q_LEN * GROUP
            qh = h * GROUP + rows % GROUP
            o_ptrs = (Out + b.to(gl.int64) * stride_ob + gl.expand_dims((rows // GROUP) * stride_ot + qh * stride_oh, 1)
                      + gl.expand_dims(cols, 0))
            gl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=gl.expand_dims(real, 1))
            if STATS and RETURN_LSE:
                has_mass = l_i > 0.0
                lse = gl.where(has_mass, (m_i + gl.log2(gl.where(has_mass, l_i, 1.0))) * LN2, float("-inf"))
                lse = gl.where(l_i != l_i, float("nan"), lse)
                gl.store(Lse + b.to(gl.int64) * stride_lb + qh * stride_lh + (rows // GROUP) * stride_lt, lse,
                         mask=real)
        else:
            keep = rows < MERGE_ROWS
            gl.store(WsAcc + slot.to(gl.int64) * (MERGE_ROWS * DV) + gl.expand_dims(rows, 1) * DV
                     + gl.expand_dims(cols, 0), acc, mask=gl.expand_dims(keep, 1))
            if STATS:
                stats = WsStats + slot * (2 * MERGE_ROWS) + rows
                gl.store(stats, m_i, mask=keep)
                gl.store(stats + MERGE_ROWS, l_i, mask=keep)

    @gluon.jit
    def _ws_scores(Q, Out, Lse, SeqLens, LeftPad, BlockTable, WsAcc, WsStats,
                   stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                   stride_btb, blocks, capacity, num_pages, scale, pid, start, end, b, h, t,
                   kv_desc, kr_desc, q_smem, qr_smem, kv_smem, kr_smem, alpha_smem, stats_smem, bars,
                   GROUP: gl.constexpr, Q_LEN: gl.constexpr, ROWS: gl.constexpr, MERGE_ROWS: gl.constexpr,
                   DV: gl.constexpr, DR: gl.constexpr, TILE: gl.constexpr, PAGE_SIZE: gl.constexpr,
                   HAS_SEQLENS: gl.constexpr, HAS_LEFTPAD: gl.constexpr, HAS_MASK: gl.constexpr,
                   RETURN_LSE: gl.constexpr, ROPE_APART: gl.constexpr):
        """Warpgroup 0 of ``mla_attend_gluon_ws``: per tile the scores S = q k^T (ROWS, TILE), the
        online softmax, P into the tile's rope columns (S is done with them) and its rescale into
        ``alpha_smem`` for warpgroup 1, then the left half of the output, O[:, :DV/2] += P V."""
        HALF: gl.constexpr = DV // 2
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, TILE, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HALF, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        dtype: gl.constexpr = kv_desc.dtype
        q_r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, ld_layout))
        q_offs = gl.expand_dims((q_r // GROUP) * stride_qt + (q_r % GROUP) * stride_qh, 1)
        q_real = gl.expand_dims(q_r < Q_LEN * GROUP, 1)
        cols64 = gl.expand_dims(gl.arange(0, 64, layout=gl.SliceLayout(0, ld_layout)), 0)
        s_rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        s_keys = gl.arange(0, TILE, layout=gl.SliceLayout(0, s_layout))
        used = 0  # tiles consumed: tile j of the program is in buffer j % 2, phase (j // 2) & 1
        seg = 0
        g = start
        while g < end:
            first, length, n_units, t_end, t_live = _segment(SeqLens, LeftPad, b, t, g, end, capacity, TILE,
                                                             HAS_SEQLENS, HAS_LEFTPAD)
            table_row = b.to(gl.int64) * stride_btb
            # This block's query rows (this warpgroup's own products of the last segment are done).
            q_base = Q + b.to(gl.int64) * stride_qb + h * GROUP * stride_qh + q_offs
            for c in gl.static_range(DV // 64):
                q_smem.slice(c * 64, 64, dim=1).store(
                    gl.load(q_base + c * 64 + cols64, mask=q_real, other=0.0).to(dtype))
            for c in gl.static_range(DR // 64):
                qr_smem.slice(c * 64, 64, dim=1).store(
                    gl.load(q_base + DV + c * 64 + cols64, mask=q_real, other=0.0).to(dtype))
            fence_async_shared()
            gl.thread_barrier()

            query = length - Q_LEN + s_rows // GROUP  # each row's position, in keys
            acc = gl.zeros([ROWS, HALF], gl.float32, o_layout)
            m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
            l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
            for tile in range(t, t_live):
                buf = used % 2
                phase = (used // 2) & 1
                mbarrier.wait(bars.index(buf), phase)
                kv = kv_smem.index(buf)
                kr = kr_smem.index(buf)
                live_rows = length - tile * TILE
                if live_rows < TILE:
                    # A bulk copy reads past a sequence's end: zero those value rows (NaN there
                    # would reach the output through 0 x NaN; their scores are masked below).
                    _zero_dead_rows(kv, live_rows, DV, 64, TILE, ld_layout)
                    fence_async_shared()
                    gl.thread_barrier()
                s = warpgroup_mma(q_smem, kv.permute([1, 0]), gl.zeros([ROWS, TILE], gl.float32, s_layout),
                                  is_async=True)
                s = warpgroup_mma(qr_smem, kr.permute([1, 0]), s, is_async=True)
                s = warpgroup_mma_wait(0, deps=[s])
                bad = False
                if PAGE_SIZE > 0:
                    _, bad = _tile_row(BlockTable, table_row, b, first, tile, True, capacity, num_pages, TILE,
                                       PAGE_SIZE)
                p, alpha, m_i, l_i = _softmax_tile(s, tile * TILE + s_keys, query, length, bad, m_i, l_i, scale,
                                                   HAS_MASK, PAGE_SIZE > 0, 1)
                p16 = p.to(dtype)
                kr.store(p16)  # P (ROWS, TILE) over the tile's rope columns, for warpgroup 1
                alpha_smem.index(buf).store(alpha)
                fence_async_shared()
                gl.thread_barrier()
                mbarrier.arrive(bars.index(2 + buf))  # P and alpha of this tile are in place
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
                acc = warpgroup_mma(gl.convert_layout(p16, p_layout), kv.slice(0, HALF, dim=1), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=[acc])
                mbarrier.arrive(bars.index(4 + buf))  # this half of the tile's values is done
                used += 1

            # The segment's m and l for warpgroup 1 (once it has read the last segment's).
            mbarrier.wait(bars.index(7), (seg & 1) ^ 1)
            stats_smem.index(0).store(m_i)
            stats_smem.index(1).store(l_i)
            gl.thread_barrier()
            mbarrier.arrive(bars.index(6))
            _launch_dependents()
            whole = (t == 0) & (t_end == n_units)
            slot = 2 * pid + (g != start).to(gl.int32)
            _ws_write(acc, gl.convert_layout(m_i, gl.SliceLayout(1, o_layout)),
                      gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), Out, Lse, WsAcc, WsStats, b, h, slot,
                      whole, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt, 0, GROUP, Q_LEN, ROWS,
                      MERGE_ROWS, DV, RETURN_LSE, True, o_layout)
            seg += 1
            g, t, h, b = _next_segment(g, t, t_end, h, b, blocks)

    @gluon.jit
    def _ws_values(Q, Out, Lse, SeqLens, LeftPad, BlockTable, WsAcc, WsStats,
                   stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                   stride_btb, blocks, capacity, num_pages, scale, pid, start, end, b, h, t,
                   kv_desc, kr_desc, q_smem, qr_smem, kv_smem, kr_smem, alpha_smem, stats_smem, bars,
                   GROUP: gl.constexpr, Q_LEN: gl.constexpr, ROWS: gl.constexpr, MERGE_ROWS: gl.constexpr,
                   DV: gl.constexpr, DR: gl.constexpr, TILE: gl.constexpr, PAGE_SIZE: gl.constexpr,
                   HAS_SEQLENS: gl.constexpr, HAS_LEFTPAD: gl.constexpr, HAS_MASK: gl.constexpr,
                   RETURN_LSE: gl.constexpr, ROPE_APART: gl.constexpr):
        """Warpgroup 1 of ``mla_attend_gluon_ws``: the copies of every tile, and per tile the right
        half of the output, O[:, DV/2:] = alpha O[:, DV/2:] + P V, with P and alpha from warpgroup 0.
        A buffer takes tile t + 2 once both halves of tile t are done."""
        HALF: gl.constexpr = DV // 2
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HALF, 16])
        NBYTES: gl.constexpr = TILE * (DV + DR) * 2
        used = 0
        seg = 0
        g = start
        while g < end:
            first, length, n_units, t_end, t_live = _segment(SeqLens, LeftPad, b, t, g, end, capacity, TILE,
                                                             HAS_SEQLENS, HAS_LEFTPAD)
            table_row = b.to(gl.int64) * stride_btb
            for i in gl.static_range(2):  # both buffers are free: every tile before is done
                live = t + i < t_live
                row, _ = _tile_row(BlockTable, table_row, b, first, t + i, live, capacity, num_pages, TILE, PAGE_SIZE)
                buf = (used + i) % 2
                _issue(kv_desc, kr_desc, bars.index(buf), kv_smem.index(buf), kr_smem.index(buf), row, live, DV,
                       ROPE_APART, NBYTES)
            acc = gl.zeros([ROWS, HALF], gl.float32, o_layout)
            for tile in range(t, t_live):
                buf = used % 2
                phase = (used // 2) & 1
                mbarrier.wait(bars.index(2 + buf), phase)
                kv = kv_smem.index(buf)
                alpha = alpha_smem.index(buf).load(gl.SliceLayout(1, o_layout))
                acc = acc * gl.expand_dims(alpha, 1)
                acc = warpgroup_mma(kr_smem.index(buf), kv.slice(HALF, HALF, dim=1), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=[acc])
                mbarrier.wait(bars.index(4 + buf), phase)
                live = tile + 2 < t_live
                row, _ = _tile_row(BlockTable, table_row, b, first, tile + 2, live, capacity, num_pages, TILE,
                                   PAGE_SIZE)
                fence_async_shared()
                _issue(kv_desc, kr_desc, bars.index(buf), kv, kr_smem.index(buf), row, live, DV, ROPE_APART, NBYTES)
                used += 1

            mbarrier.wait(bars.index(6), seg & 1)
            m_i = stats_smem.index(0).load(gl.SliceLayout(1, o_layout))
            l_i = stats_smem.index(1).load(gl.SliceLayout(1, o_layout))
            gl.thread_barrier()
            mbarrier.arrive(bars.index(7))  # warpgroup 0 may write the next segment's
            whole = (t == 0) & (t_end == n_units)
            slot = 2 * pid + (g != start).to(gl.int32)
            _ws_write(acc, m_i, l_i, Out, Lse, WsAcc, WsStats, b, h, slot, whole, stride_ob, stride_ot, stride_oh,
                      stride_lb, stride_lh, stride_lt, HALF, GROUP, Q_LEN, ROWS, MERGE_ROWS, DV, RETURN_LSE, False,
                      o_layout)
            seg += 1
            g, t, h, b = _next_segment(g, t, t_end, h, b, blocks)

    @gluon.jit(do_not_specialize=["blocks", "capacity", "num_pages"])
    def mla_attend_gluon_ws(
        Q, kv_desc, kr_desc, Out, Lse, SeqLens, LeftPad, BlockTable, Plan, WsAcc, WsStats,
        stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
        stride_btb, blocks, capacity, num_pages, scale,
        GROUP: gl.constexpr, Q_LEN: gl.constexpr, ROWS: gl.constexpr, MERGE_ROWS: gl.constexpr,
        DV: gl.constexpr, DR: gl.constexpr, TILE: gl.constexpr, PAGE_SIZE: gl.constexpr,
        HAS_SEQLENS: gl.constexpr, HAS_LEFTPAD: gl.constexpr, HAS_MASK: gl.constexpr, RETURN_LSE: gl.constexpr,
        ROPE_APART: gl.constexpr, VALUE_REGS: gl.constexpr,
    ):
        """``mla_attend_gluon`` for blocks of 64 rows, warp-specialised (4 warps a program, plus 4
        with VALUE_REGS registers a thread). Same arguments, same results up to rounding.

        Warpgroup 0 (``_ws_scores``) computes each tile's scores once, unsplit (M = the block's 64
        rows, N = the tile's 64 keys), its softmax, and the left half of the output with P from
        registers; warpgroup 1 (``_ws_values``) issues the copies and computes the right half with
        P from shared memory, so one tile's softmax overlaps the other half's product. Shared
        memory: q, two tiles (P of a tile goes over its rope columns once its scores are done)."""
        pid = gl.program_id(0)
        vec_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        q_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, DV], gl.bfloat16)
        qr_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, DR], gl.bfloat16)
        vec_shared: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])  # of each [ROWS] buffer
        dtype: gl.constexpr = kv_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [ROWS, DV], q_shared)
        qr_smem = gl.allocate_shared_memory(dtype, [ROWS, DR], qr_shared)
        kv_smem = gl.allocate_shared_memory(dtype, [2, TILE, DV], kv_desc.layout)
        kr_smem = gl.allocate_shared_memory(dtype, [2, TILE, DR], kr_desc.layout)
        alpha_smem = gl.allocate_shared_memory(gl.float32, [2, ROWS], vec_shared)
        stats_smem = gl.allocate_shared_memory(gl.float32, [2, ROWS], vec_shared)
        # 0-1 tile landed, 2-3 its P and alpha written, 4-5 its left half done (by buffer);
        # 6 a segment's m and l written, 7 read.
        bars = gl.allocate_shared_memory(gl.int64, [8, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(8):
            mbarrier.init(bars.index(i), count=1)
        fence_async_shared()

        start, end, b, h, t = _share(Plan, pid, vec_layout)
        # Each partition's arguments as one tuple literal: a tuple bound to a name first loses
        # its constexprs (Triton 3.6).
        gl.warp_specialize([
            (_ws_scores, (Q, Out, Lse, SeqLens, LeftPad, BlockTable, WsAcc, WsStats, stride_qb, stride_qt, stride_qh,
                          stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt, stride_btb, blocks,
                          capacity, num_pages, scale, pid, start, end, b, h, t, kv_desc, kr_desc, q_smem, qr_smem,
                          kv_smem, kr_smem, alpha_smem, stats_smem, bars, GROUP, Q_LEN, ROWS, MERGE_ROWS, DV, DR,
                          TILE, PAGE_SIZE, HAS_SEQLENS, HAS_LEFTPAD, HAS_MASK, RETURN_LSE, ROPE_APART)),
            (_ws_values, (Q, Out, Lse, SeqLens, LeftPad, BlockTable, WsAcc, WsStats, stride_qb, stride_qt, stride_qh,
                          stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt, stride_btb, blocks,
                          capacity, num_pages, scale, pid, start, end, b, h, t, kv_desc, kr_desc, q_smem, qr_smem,
                          kv_smem, kr_smem, alpha_smem, stats_smem, bars, GROUP, Q_LEN, ROWS, MERGE_ROWS, DV, DR,
                          TILE, PAGE_SIZE, HAS_SEQLENS, HAS_LEFTPAD, HAS_MASK, RETURN_LSE, ROPE_APART)),
        ], [4], [VALUE_REGS])
        for i in gl.static_range(8):
            mbarrier.invalidate(bars.index(i))

    @gluon.jit
    def _fp8_tile(KV, KR, BlockTable, table_row, b, first, tile, length, capacity, num_pages, stride_kv, stride_kr,
                  DV: gl.constexpr, TILE: gl.constexpr, PAGE_SIZE: gl.constexpr, ROPE_APART: gl.constexpr,
                  layout: gl.constexpr, r_layout: gl.constexpr):
        """Tile ``tile``'s fp8 keys as loaded, 0 past ``length``: the latent's four 128-column
        chunks (TILE, 128) in ``layout`` and the rope part (TILE, 64) in ``r_layout``."""
        row, _bad = _tile_row(BlockTable, table_row, b, first, tile, True, capacity, num_pages, TILE, PAGE_SIZE)
        keys = gl.arange(0, TILE, layout=gl.SliceLayout(1, layout))
        live = gl.expand_dims(tile * TILE + keys < length, 1)
        base = KV + gl.expand_dims((row.to(gl.int64) + keys) * stride_kv, 1) + \
            gl.expand_dims(gl.arange(0, 128, layout=gl.SliceLayout(0, layout)), 0)
        x0 = gl.load(base, mask=live, other=0.0)
        x1 = gl.load(base + 128, mask=live, other=0.0)
        x2 = gl.load(base + 256, mask=live, other=0.0)
        x3 = gl.load(base + 384, mask=live, other=0.0)
        r_keys = gl.arange(0, TILE, layout=gl.SliceLayout(1, r_layout))
        r_base = KR + gl.expand_dims((row.to(gl.int64) + r_keys) * stride_kr, 1) + \
            gl.expand_dims(gl.arange(0, 64, layout=gl.SliceLayout(0, r_layout)), 0)
        xr = gl.load(r_base + (0 if ROPE_APART else DV), mask=gl.expand_dims(tile * TILE + r_keys < length, 1),
                     other=0.0)
        return x0, x1, x2, x3, xr

    @gluon.jit
    def _fp8_convert(KV, KR, SeqLens, LeftPad, BlockTable, Timeline, stride_btb, stride_kv, stride_kr, blocks,
                     capacity, num_pages, pid, start, end, b, h, t, kv_smem, kr_smem, bars, DV: gl.constexpr,
                     TILE: gl.constexpr, PAGE_SIZE: gl.constexpr, HAS_SEQLENS: gl.constexpr,
                     HAS_LEFTPAD: gl.constexpr, ROPE_APART: gl.constexpr, TIMELINE: gl.constexpr, WHICH: gl.constexpr):
        """A converting warpgroup of ``mla_attend_gluon_fp8``: every other tile of the program's
        share (those of fp16 buffer WHICH), loaded from global memory as fp8 (the next one's loads
        in flight while its buffer is still being read) and stored into the buffer in fp16."""
        layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
        r_layout: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [4, 1], [1, 0])
        kv = kv_smem.index(WHICH)
        kr = kr_smem.index(WHICH)
        if TIMELINE:
            clk = gl.zeros([16], gl.int64, gl.BlockedLayout([1], [32], [4], [0]))
            last = _clock()
        used = 0  # tiles of the share so far: tile j is in buffer j % 2
        g = start
        while g < end:
            first, length, n_units, t_end, t_live = _segment(SeqLens, LeftPad, b, t, g, end, capacity, TILE,
                                                             HAS_SEQLENS, HAS_LEFTPAD)
            table_row = b.to(gl.int64) * stride_btb
            for tile in range(t, t_live):
                if used % 2 == WHICH:
                    x0, x1, x2, x3, xr = _fp8_tile(KV, KR, BlockTable, table_row, b, first, tile, length, capacity,
                                                   num_pages, stride_kv, stride_kr, DV, TILE, PAGE_SIZE, ROPE_APART,
                                                   layout, r_layout)
                    if TIMELINE:
                        clk, last = _lap(clk, last, 9 + 3 * WHICH)
                    # The buffer's last tile is done (its first use passes at once).
                    mbarrier.wait(bars.index(2 + WHICH), ((used // 2) & 1) ^ 1)
                    if TIMELINE:
                        clk, last = _lap(clk, last, 10 + 3 * WHICH)
                    kv.slice(0, 128, dim=1).store(x0.to(gl.float16))
                    kv.slice(128, 128, dim=1).store(x1.to(gl.float16))
                    kv.slice(256, 128, dim=1).store(x2.to(gl.float16))
                    kv.slice(384, 128, dim=1).store(x3.to(gl.float16))
                    kr.store(xr.to(gl.float16))
                    fence_async_shared()
                    gl.thread_barrier()
                    mbarrier.arrive(bars.index(WHICH))  # the tile is in place
                    if TIMELINE:
                        clk, last = _lap(clk, last, 11 + 3 * WHICH)
                used += 1
            g, t, h, b = _next_segment(g, t, t_end, h, b, blocks)
        if TIMELINE:
            _store_counts(Timeline, pid, clk, 9 + 3 * WHICH, 11 + 3 * WHICH)

    @gluon.jit
    def _fp8_scores(Q, Out, Lse, SeqLens, LeftPad, BlockTable, WsAcc, WsStats, KScale, Timeline,
                    stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                    stride_btb, blocks, capacity, num_pages, scale, pid, start, end, b, h, t,
                    q_smem, qr_smem, kv_smem, kr_smem, p_smem, bars,
                    GROUP: gl.constexpr, Q_LEN: gl.constexpr, ROWS: gl.constexpr, MERGE_ROWS: gl.constexpr,
                    DV: gl.constexpr, DR: gl.constexpr, TILE: gl.constexpr, PAGE_SIZE: gl.constexpr,
                    HAS_SEQLENS: gl.constexpr, HAS_LEFTPAD: gl.constexpr, HAS_MASK: gl.constexpr,
                    RETURN_LSE: gl.constexpr, SCALE_KIND: gl.constexpr, TIMELINE: gl.constexpr):
        """The product warpgroup of ``mla_attend_gluon_fp8``: per tile, once its fp16 buffer is
        filled, the swapped products of ``mla_attend_gluon`` (scores (TILE, ROWS) = k q^T, output
        (DV, ROWS) += v^T p^T) and the online softmax between them; then each segment's output."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, ROWS, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, ROWS, 16])
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        q_r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, ld_layout))
        q_offs = gl.expand_dims((q_r // GROUP) * stride_qt + (q_r % GROUP) * stride_qh, 1)
        q_real = gl.expand_dims(q_r < Q_LEN * GROUP, 1)
        cols_v = gl.expand_dims(gl.arange(0, DV, layout=gl.SliceLayout(0, ld_layout)), 0)
        cols_r = gl.expand_dims(gl.arange(0, DR, layout=gl.SliceLayout(0, ld_layout)), 0)
        s_rows = gl.arange(0, ROWS, layout=gl.SliceLayout(0, s_layout))
        s_keys = gl.arange(0, TILE, layout=gl.SliceLayout(1, s_layout))
        q_t = q_smem.permute([1, 0])
        qr_t = qr_smem.permute([1, 0])
        if TIMELINE:
            clk = gl.zeros([16], gl.int64, gl.BlockedLayout([1], [32], [4], [0]))
            t_start = _clock()
            last = t_start
        used = 0
        g = start
        while g < end:
            first, length, n_units, t_end, t_live = _segment(SeqLens, LeftPad, b, t, g, end, capacity, TILE,
                                                             HAS_SEQLENS, HAS_LEFTPAD)
            table_row = b.to(gl.int64) * stride_btb
            # This warpgroup's products of the last segment are done.
            q_base = Q + b.to(gl.int64) * stride_qb + h * GROUP * stride_qh + q_offs
            kv_scale, seg_scale = _fp8_query(q_base, cols_v, cols_r, q_real, q_smem, qr_smem, KScale, b, scale, DV,
                                             SCALE_KIND)
            fence_async_shared()
            gl.thread_barrier()

            query = length - Q_LEN + s_rows // GROUP  # each row's position, in keys
            acc = gl.zeros([DV, ROWS], gl.float32, o_layout)
            m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(0, s_layout))
            l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(0, s_layout))
            if TIMELINE:
                clk, last = _lap(clk, last, 6)
            for tile in range(t, t_live):
                buf = used % 2
                bad = False
                if PAGE_SIZE > 0:
                    _row, bad = _tile_row(BlockTable, table_row, b, first, tile, True, capacity, num_pages, TILE,
                                          PAGE_SIZE)
                mbarrier.wait(bars.index(buf), (used // 2) & 1)
                if TIMELINE:
                    clk, last = _lap(clk, last, 1)
                kv = kv_smem.index(buf)
                s = warpgroup_mma(kv, q_t, gl.zeros([TILE, ROWS], gl.float32, s_layout), is_async=True)
                s = warpgroup_mma(kr_smem.index(buf), qr_t, s, is_async=True)
                s = warpgroup_mma_wait(0, deps=[s])
                if TIMELINE:
                    clk, last = _lap(clk, last, 3)
                p, alpha, m_i, l_i = _softmax_tile(s, tile * TILE + s_keys, query, length, bad, m_i, l_i, seg_scale,
                                                   HAS_MASK, PAGE_SIZE > 0, 0)
                p_smem.store(p.to(gl.float16))
                fence_async_shared()
                gl.thread_barrier()
                if TIMELINE:
                    clk, last = _lap(clk, last, 4)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(0, o_layout)), 0)
                acc = warpgroup_mma(kv.permute([1, 0]), p_smem, acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=[acc])
                mbarrier.arrive(bars.index(2 + buf))  # the buffer may take the next tile
                if TIMELINE:
                    clk, last = _lap(clk, last, 5)
                    clk += gl.where(gl.arange(0, 16, layout=clk.type.layout) == 8, 1, 0)  # tiles
                used += 1

            _launch_dependents()
            acc = acc * kv_scale  # V's dequantisation (a partial too: the merge is linear in it)
            _write_swapped(acc, gl.convert_layout(m_i, gl.SliceLayout(0, o_layout)),
                           gl.convert_layout(l_i, gl.SliceLayout(0, o_layout)), Out, Lse, WsAcc, WsStats, b, h,
                           2 * pid + (g != start).to(gl.int32), (t == 0) & (t_end == n_units), stride_ob, stride_ot,
                           stride_oh, stride_lb, stride_lh, stride_lt, GROUP, Q_LEN, ROWS, MERGE_ROWS, DV, RETURN_LSE,
                           o_layout)
            if TIMELINE:
                clk, last = _lap(clk, last, 7)
            g, t, h, b = _next_segment(g, t, t_end, h, b, blocks)
        if TIMELINE:
            clk, last = _lap(clk, t_start, 0)
            _store_counts(Timeline, pid, clk, 0, 8)

    @gluon.jit(do_not_specialize=["blocks", "capacity", "num_pages"])
    def mla_attend_gluon_fp8(
        Q, KV, KR, Out, Lse, SeqLens, LeftPad, BlockTable, Plan, WsAcc, WsStats, KScale, Timeline,
        stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
        stride_btb, stride_kv, stride_kr, blocks, capacity, num_pages, scale,
        GROUP: gl.constexpr, Q_LEN: gl.constexpr, ROWS: gl.constexpr, MERGE_ROWS: gl.constexpr,
        DV: gl.constexpr, DR: gl.constexpr, TILE: gl.constexpr, PAGE_SIZE: gl.constexpr,
        HAS_SEQLENS: gl.constexpr, HAS_LEFTPAD: gl.constexpr, HAS_MASK: gl.constexpr, RETURN_LSE: gl.constexpr,
        ROPE_APART: gl.constexpr, SCALE_KIND: gl.constexpr, CONVERT_REGS: gl.constexpr,
        TIMELINE: gl.constexpr = False,
    ):
        """``mla_attend_gluon`` for fp8 caches (e4m3 or e5m2; SCALE_KIND and KScale as there) of
        DeepSeek's widths (DV 512, DR 64) in blocks of 16 rows, warp-specialised: 4 warps a program for
        the products, plus two warpgroups of 4 with CONVERT_REGS registers a thread that convert.

        KV / KR: the cache's rows, ``stride_kv`` / ``stride_kr`` apart (the 2-D view of
        ``_mla_call.tma_view``; KR's rope columns start at DV unless ROPE_APART). Converting tiles
        to fp16 costs about as much SM time as their products (one conversion instruction per two
        values), so here it runs beside them: converting warpgroup k loads the fp8 tiles of fp16
        buffer k (every other tile) into registers while that buffer is still being read, and
        stores them in fp16 once it is free; the product warpgroup reads the buffers in turn.
        Shared memory: q, two fp16 tiles, p. TIMELINE as in ``mla_attend_gluon``, the converting
        warpgroups' phases too."""
        pid = gl.program_id(0)
        vec_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        q_smem = gl.allocate_shared_memory(gl.float16, [ROWS, DV], gl.NVMMASharedLayout.get_default_for(
            [ROWS, DV], gl.float16))
        qr_smem = gl.allocate_shared_memory(gl.float16, [ROWS, DR], gl.NVMMASharedLayout.get_default_for(
            [ROWS, DR], gl.float16))
        kv_smem = gl.allocate_shared_memory(gl.float16, [2, TILE, DV], gl.NVMMASharedLayout.get_default_for(
            [TILE, DV], gl.float16))
        kr_smem = gl.allocate_shared_memory(gl.float16, [2, TILE, DR], gl.NVMMASharedLayout.get_default_for(
            [TILE, DR], gl.float16))
        p_smem = gl.allocate_shared_memory(gl.float16, [TILE, ROWS], gl.NVMMASharedLayout.get_default_for(
            [TILE, ROWS], gl.float16))
        # 0-1 buffer filled, 2-3 buffer free (by buffer)
        bars = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(4):
            mbarrier.init(bars.index(i), count=1)
        fence_async_shared()

        start, end, b, h, t = _share(Plan, pid, vec_layout)
        # Each partition's arguments as one tuple literal (see mla_attend_gluon_ws).
        gl.warp_specialize([
            (_fp8_scores, (Q, Out, Lse, SeqLens, LeftPad, BlockTable, WsAcc, WsStats, KScale, Timeline, stride_qb,
                           stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                           stride_btb, blocks, capacity, num_pages, scale, pid, start, end, b, h, t, q_smem, qr_smem,
                           kv_smem, kr_smem, p_smem, bars, GROUP, Q_LEN, ROWS, MERGE_ROWS, DV, DR, TILE, PAGE_SIZE,
                           HAS_SEQLENS, HAS_LEFTPAD, HAS_MASK, RETURN_LSE, SCALE_KIND, TIMELINE)),
            (_fp8_convert, (KV, KR, SeqLens, LeftPad, BlockTable, Timeline, stride_btb, stride_kv, stride_kr, blocks,
                            capacity, num_pages, pid, start, end, b, h, t, kv_smem, kr_smem, bars, DV, TILE, PAGE_SIZE,
                            HAS_SEQLENS, HAS_LEFTPAD, ROPE_APART, TIMELINE, 0)),
            (_fp8_convert, (KV, KR, SeqLens, LeftPad, BlockTable, Timeline, stride_btb, stride_kv, stride_kr, blocks,
                            capacity, num_pages, pid, start, end, b, h, t, kv_smem, kr_smem, bars, DV, TILE, PAGE_SIZE,
                            HAS_SEQLENS, HAS_LEFTPAD, ROPE_APART, TIMELINE, 1)),
        ], [4, 4], [CONVERT_REGS, CONVERT_REGS])
        for i in gl.static_range(4):
            mbarrier.invalidate(bars.index(i))

    def descriptor(cache: torch.Tensor, rows: int, stride: int, tile: int, width: int) -> TensorDescriptor:
        """A Gluon tensor descriptor of a 16-bit or fp8 e4m3 ``cache``'s rows as a (rows,
        cache.shape[-1]) tensor with boxes (tile, width)."""
        return TensorDescriptor(cache, [rows, cache.shape[-1]], [stride, 1], [tile, width],
                                _box_layout(tile, width, cache.dtype))

    _GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float8_e4m3fn: gl.float8e4nv,
                  torch.float8_e5m2: gl.float8e5}

    @functools.lru_cache(maxsize=None)
    def _box_layout(tile: int, width: int, dtype: torch.dtype):
        # Made once per box: computing it is most of a descriptor's host time.
        return gl.NVMMASharedLayout.get_default_for([tile, width], _GL_DTYPES[dtype])
