"""LeanAttention decode kernel: one persistent launch, stream-K shares, last-arriver merge.

Each program takes the contiguous tile range that ``leanattn.schedule`` assigns it and walks it
head by head. For every head it touches it runs flash-decoding's online softmax over its tiles,
loading each K/V tile once for the whole GQA group (the group's query rows are the M dimension of
the two ``tl.dot``s). A head whose tiles all lie in the share is normalised and written at once.
A head cut by a share boundary leaves an fp32 partial in the workspace; the partials are merged in
program order by a two-level tree of last arrivers (chunks of ARRIVE_CHUNK consecutive programs,
then the chunks), and the last one writes the result, or (MERGE_KERNEL) by ``lean_merge_kernel``
in a second launch. No program ever waits for another.

Scores are kept in the log2 domain (``qk_scale`` includes log2(e)) so the kernel uses ``exp2``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .plan import _live_range, _num_tiles, _read_plan_row, _share_of

LOG2E: float = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)

# Kinds of an fp8 cache's dequantisation scales (the kernel's K_SCALE_KIND and V_SCALE_KIND):
# none (an fp16/bf16 cache), one per kv head, one per (sequence, kv head), and one per cache row
# and kv head (shaped like the cache without head_dim).
SCALE_NONE = tl.constexpr(0)
SCALE_HEAD = tl.constexpr(1)
SCALE_SEQ = tl.constexpr(2)
SCALE_TOKEN = tl.constexpr(3)


# Events of a program's timeline (TIMELINE=True): its start, the end of gdc_wait, its share
# known, its first tile's scores computed, its last tile's, its chunk ticket drawn (a member of
# a cut head: the last one it leaves a partial for; with the merge kernel, that partial
# stored), its exit. Slots of a (programs, EVENTS) int64 tensor of %globaltimer nanoseconds; a
# program with no share writes only its start and the end of its wait.
EV_START = tl.constexpr(0)
EV_WAITED = tl.constexpr(1)
EV_SHARE = tl.constexpr(2)
EV_FIRST_TILE = tl.constexpr(3)
EV_LAST_TILE = tl.constexpr(4)
EV_TICKET = tl.constexpr(5)
EV_EXIT = tl.constexpr(6)
EVENTS = tl.constexpr(7)


@triton.jit
def _stamp(Timeline, pid, event: tl.constexpr, after):
    """Write %globaltimer to Timeline[pid, event] once ``after`` (an int32 scalar) is computed:
    taking it as an operand keeps the read behind the loads and math it depends on."""
    now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [after], dtype=tl.int64, is_pure=False,
                                    pack=1)
    tl.store(Timeline + pid * EVENTS + event, now)


@triton.jit
def _tanh(x):
    """tanh from exp2, exact to fp32 rounding in absolute terms (what a softmax exponent needs)."""
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def _pow2_factors(amax, TARGET: tl.constexpr):
    """(2^s, 2^-s) for the power of two 2^s that brings ``amax`` > 0 into [2^TARGET,
    2^(TARGET + 1)) (s = TARGET for amax 0), s clamped to [-126, 126] so both factors are normal
    fp32."""
    e = tl.floor(tl.log2(tl.where(amax > 0.0, amax, 1.0)))
    shift = tl.minimum(tl.maximum(TARGET - e, -126.0), 126.0).to(tl.int32)
    up = ((shift + 127) << 23).to(tl.float32, bitcast=True)
    down = ((127 - shift) << 23).to(tl.float32, bitcast=True)
    return up, down


@triton.jit
def _exact_fp16(x, DOT_DTYPE: tl.constexpr):
    """``x`` (ROWS, D) fp32 holding fp16 or bf16 values, times the power of two 2^e that brings
    max|x| into [2^13, 2^15), in DOT_DTYPE (fp16): exact for every element within 2^27 of the
    largest (those stay normal in fp16, whose 11 significant bits hold bf16's 8). Returns the
    scaled tile and 2^-e, the factor that undoes it on the fp32 scores."""
    # Only finite values set the scale: an inf or NaN row stays non-finite (and poisons its own
    # row) instead of pushing every other row of the group out of fp16's range.
    mag = tl.abs(x)
    amax = tl.max(tl.max(tl.where(mag < float("inf"), mag, 0.0), axis=1), axis=0)
    up, down = _pow2_factors(amax, 13.0)
    return (x * up).to(DOT_DTYPE), down


@triton.jit
def _token_weights(p, v_scale):
    """The softmax weights ``p`` (ROWS, TILE) times each key's V scale ``v_scale`` (TILE,), times
    the power of two 2^s that brings the tile's largest finite |scale| into [1, 2), and 2^-s,
    which undoes it on the fp32 product: the weights stay within fp16's normal range whatever
    the scales' size (engines' per-token scales are often ~1e-3). A NaN or inf scale stays
    non-finite and reaches every row that reads its key, as a NaN or inf in V would."""
    mag = tl.abs(v_scale)
    up, down = _pow2_factors(tl.max(tl.where(mag < float("inf"), mag, 0.0), axis=0), 0.0)
    return p * (v_scale * up)[None, :], down


@triton.jit
def _score_mod(
    qk, scale, softcap, key, in_range, bad, query, window_left, window_right, key_lo, key_hi,
    HAS_SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BOUNDS: tl.constexpr, PAGED: tl.constexpr,
):
    """Scores in log2 units from the raw products ``qk`` (ROWS, TILE), then every mask.

    ``scale`` is softmax_scale x k_scale in natural units with HAS_SOFTCAP (softcap * tanh(s /
    softcap), flash-attn's convention, before the softmax), else already times log2(e).
    ``key`` (TILE,) numbers the keys from the sequence's first live key, ``query`` (ROWS,) is each
    row's query position in the same numbering: a row sees keys in [query - window_left, query +
    window_right] (causal: window_right = 0). HAS_BOUNDS: a row sees keys in [key_lo, key_hi)
    (ROWS,), same numbering, instead (context parallel: bounds from each key's position in the
    whole sequence). Keys past the live range or outside a row's window give -inf; keys a row
    sees on an out-of-range page (``bad``) NaN, which poisons that row as the API promises."""
    if HAS_SOFTCAP:
        s = _tanh(qk * (scale / softcap)) * (softcap * 1.4426950408889634)
    else:
        s = qk * scale
    keep = in_range[None, :]
    if HAS_MASK:
        keep = keep & (key[None, :] >= query[:, None] - window_left) & (key[None, :] <= query[:, None] + window_right)
    if HAS_BOUNDS:
        keep = keep & (key[None, :] >= key_lo[:, None]) & (key[None, :] < key_hi[:, None])
    s = tl.where(keep, s, float("-inf"))
    if PAGED:
        s = tl.where(keep & bad[None, :], float("nan"), s)
    return s


@triton.jit
def _attend_tiles(
    q, K, V, BlockTable, KScale, VScale, Bounds, b, h, first, length, lo, live, tile_start, tile_end, scale, softcap,
    window_left, window_right, num_pages, kv_heads, capacity,
    stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_btb,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, TILE: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BOUNDS: tl.constexpr, K_SCALE_KIND: tl.constexpr,
    V_SCALE_KIND: tl.constexpr, DOT_DTYPE: tl.constexpr, Timeline, pid, stamp_first, TIMELINE: tl.constexpr,
    WsAcc, WsStats, slot0, flush_last, SPLIT_TILES: tl.constexpr, MERGE_ROWS: tl.constexpr,
    BF16_WEIGHTS: tl.constexpr,
):
    """Online softmax of the packed query rows ``q`` (ROWS, HEAD_DIM_PAD) over tiles
    ``[tile_start, tile_end)`` of head (b, h). The tiles cover cache positions ``[first, first +
    length)``, keys ``lo ...`` of the ``live`` live keys (see plan._live_range). Row r is query
    token r // GROUP of head h * GROUP + r % GROUP. Returns unnormalised (acc, m, l), m in log2
    units. HAS_BOUNDS: Bounds int32 (batch, Q_LEN, 2) holds each query token's keys [lo, hi),
    numbered as ``_score_mod``'s ``key``, in place of the window's.

    Loading K/V (contiguous or paged, any dtype, converted to DOT_DTYPE in registers) is the first
    stage of a tile, ``_score_mod`` the second, the online softmax the third. Paged: a live token
    whose page number is outside [0, num_pages) is never read. PAGE_SIZE is any size from 1 to
    256: a tile may span several pages or a part of one, each token finds its own page and slot
    (``//`` and ``%`` by the constant compile to shifts, and to integer multiplies and shifts
    when it is not a power of two: no division instruction).

    Per-token fp8 scales (SCALE_TOKEN) are read with the tile from KScale/VScale, packed like the
    cache's rows ((batch, capacity, kv_heads), or (num_pages, PAGE_SIZE, kv_heads)) and masked
    like K and V: K's multiply the fp32 score columns before the score stage, V's the weights of
    the PV product (not the row sums).

    TIMELINE: with ``stamp_first``, the first tile's scores stamp EV_FIRST_TILE of program
    ``pid`` in Timeline.

    SPLIT_TILES > 0 (batch-invariant mode): the tiles are cut into splits of SPLIT_TILES tiles
    (split u: tiles [u SPLIT_TILES, (u + 1) SPLIT_TILES)), each attended alone: at the end of
    every split its (acc, m, l) goes to workspace slot slot0 + u (a masked store, no branch) and
    the state restarts empty, the same arithmetic as a loop per split, while the pipeline's loads
    run on into the next split. The range's last split is kept in registers and returned unless
    ``flush_last``."""
    offs_n = tl.arange(0, TILE)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_d = offs_d < HEAD_DIM
    rows = tl.arange(0, ROWS)
    query = live - Q_LEN + rows // GROUP  # each row's position, in keys
    if HAS_BOUNDS:
        # Padding rows (past Q_LEN * GROUP) see nothing; they are never written.
        bound = Bounds + (b.to(tl.int64) * Q_LEN + rows // GROUP) * 2
        key_lo = tl.load(bound, mask=rows < Q_LEN * GROUP, other=0)
        key_hi = tl.load(bound + 1, mask=rows < Q_LEN * GROUP, other=0)
    else:
        key_lo = query
        key_hi = query
    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, HEAD_DIM_PAD), dtype=tl.float32)
    b64 = b.to(tl.int64)
    table = BlockTable + b64 * stride_btb
    bad = offs_n < 0
    if PAGE_SIZE > 0:
        # Page numbers are read one tile ahead, so a tile's K/V addresses never wait on a load
        # issued in the same iteration.
        tok = tile_start * TILE + offs_n
        page = tl.load(table + (first + tok) // PAGE_SIZE, mask=tok < length, other=0)
    for tile in range(tile_start, tile_end):
        # Load the tile's K and V.
        tok = tile * TILE + offs_n
        in_range = tok < length
        pos = first + tok  # cache position
        read = in_range
        if PAGE_SIZE == 0:
            k_rows = b64 * stride_kb + pos.to(tl.int64) * stride_kn
            v_rows = b64 * stride_vb + pos.to(tl.int64) * stride_vn
        else:
            bad = in_range & ((page < 0) | (page >= num_pages))
            read = in_range & ~bad
            slot = pos % PAGE_SIZE
            k_rows = page.to(tl.int64) * stride_kb + slot * stride_kn
            v_rows = page.to(tl.int64) * stride_vb + slot * stride_vn
            if (K_SCALE_KIND == SCALE_TOKEN) or (V_SCALE_KIND == SCALE_TOKEN):
                s_rows = (page.to(tl.int64) * PAGE_SIZE + slot) * kv_heads + h
            next_tok = tok + TILE
            page = tl.load(table + (first + next_tok) // PAGE_SIZE,
                           mask=(next_tok < length) & (next_tok < tile_end * TILE), other=0)
        if PAGE_SIZE == 0:
            if (K_SCALE_KIND == SCALE_TOKEN) or (V_SCALE_KIND == SCALE_TOKEN):
                s_rows = (b64 * capacity + pos) * kv_heads + h
        mask_nd = read[:, None] & mask_d[None, :]
        k = tl.load(K + (k_rows + h * stride_kh)[:, None] + offs_d[None, :], mask=mask_nd, other=0.0).to(DOT_DTYPE)
        v = tl.load(V + (v_rows + h * stride_vh)[:, None] + offs_d[None, :], mask=mask_nd, other=0.0)
        if (V_SCALE_KIND == SCALE_TOKEN) & BF16_WEIGHTS:
            v = v.to(tl.bfloat16)
        else:
            v = v.to(DOT_DTYPE)
        if K_SCALE_KIND == SCALE_TOKEN:
            k_scale = tl.load(KScale + s_rows, mask=read, other=0.0)
        if V_SCALE_KIND == SCALE_TOKEN:
            v_scale = tl.load(VScale + s_rows, mask=read, other=0.0)
        # Scores, then the online softmax.
        qk = tl.dot(q, tl.trans(k))
        if K_SCALE_KIND == SCALE_TOKEN:
            qk = qk * k_scale[None, :]
        s = _score_mod(qk, scale, softcap, lo + tok, in_range, bad, query,
                       window_left, window_right, key_lo, key_hi, HAS_SOFTCAP, HAS_MASK, HAS_BOUNDS,
                       PAGE_SIZE > 0)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        if TIMELINE:
            if stamp_first & (tile == tile_start):
                _stamp(Timeline, pid, EV_FIRST_TILE, tl.max(m_new, axis=0).to(tl.int32, bitcast=True))
        # A row that has seen no valid token keeps m = -inf; shift by 0 there to avoid inf - inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if V_SCALE_KIND == SCALE_TOKEN:
            if BF16_WEIGHTS:
                # Each key's weight times its V scale, in bf16: fp32's range, so no scale is too
                # small or too large and no per-tile reduction is needed; V's fp8 values are
                # exact in bf16. The weights keep bf16's 8 bits, as a bf16 q's output does.
                w = p * v_scale[None, :]
                acc = acc * alpha[:, None] + tl.dot(w.to(tl.bfloat16), v)
            else:
                # fp16 weights (an fp16 q's precision), the tile's scales brought into range.
                w, down = _token_weights(p, v_scale)
                acc = acc * alpha[:, None] + tl.dot(w.to(DOT_DTYPE), v) * down
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v)
        m_i = m_new
        if SPLIT_TILES > 0:
            done = ((tile + 1) % SPLIT_TILES == 0) | (tile + 1 == tile_end)
            done = done & ((tile + 1 < tile_end) | flush_last)
            _store_partial(WsAcc, WsStats, slot0 + tile // SPLIT_TILES, acc, m_i, l_i, ROWS, MERGE_ROWS,
                           HEAD_DIM_PAD, done)
            # m = -inf alone would zero finite sums at the next tile (alpha = 0); the sums restart
            # too, so a split's bits never depend on what its program attended before it (a NaN,
            # the sign of a zero).
            acc = tl.where(done, 0.0, acc)
            m_i = tl.where(done, float("-inf"), m_i)
            l_i = tl.where(done, 0.0, l_i)
    return acc, m_i, l_i


@triton.jit
def _write_output(
    Out, Lse, Sinks, b, h, acc, m_i, l_i, v_scale,
    stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, RETURN_LSE: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    """Normalise and store the real rows (the first Q_LEN * GROUP of ROWS).

    With sinks, each head's sink logit joins the softmax's denominator and carries no value. An
    empty row gives zeros (whatever ``v_scale`` holds) and LSE -inf (the sink's logit with sinks),
    a NaN row (a NaN input it sees, an out-of-range page) NaN for both. ``v_scale`` dequantises V (1 for fp16/bf16 caches)."""
    rows = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    real = rows < Q_LEN * GROUP
    qh = h * GROUP + rows % GROUP
    tok = rows // GROUP
    if HAS_SINKS:
        sink = tl.load(Sinks + qh, mask=real, other=0.0) * 1.4426950408889634
        m_new = tl.maximum(m_i, sink)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key and a -inf sink: no inf - inf
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.exp2(sink - m_shift)
        acc = acc * alpha[:, None]
        m_i = m_new
    has_mass = l_i > 0.0
    empty = l_i == 0.0  # not NaN: a NaN row stays NaN
    o = tl.where(empty[:, None], 0.0, acc * (v_scale / tl.where(empty, 1.0, l_i))[:, None])
    mask = real[:, None] & (offs_d < HEAD_DIM)[None, :]
    ptrs = Out + b.to(tl.int64) * stride_ob + (tok * stride_ot + qh * stride_oh)[:, None] + offs_d[None, :]
    tl.store(ptrs, o.to(Out.dtype.element_ty), mask=mask)
    if RETURN_LSE:
        lse = tl.where(has_mass, (m_i + tl.log2(tl.where(has_mass, l_i, 1.0))) * LN2, float("-inf"))
        lse = tl.where(l_i != l_i, float("nan"), lse)
        tl.store(Lse + b.to(tl.int64) * stride_lb + qh * stride_lh + tok * stride_lt, lse, mask=real)


@triton.jit
def _write_cols(
    Out, Lse, Sinks, b, h, acc, m_i, l_i, v_scale, col0,
    stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, RETURN_LSE: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    """Columns [col0, col0 + COLS) of a merged head (acc holds only those) to Out, as
    ``_write_output`` writes whole rows; column 0's program also the LSE."""
    if col0 == 0:
        _write_output(Out, Lse, Sinks, b, h, acc, m_i, l_i, v_scale, stride_ob, stride_ot, stride_oh, stride_lb,
                      stride_lh, stride_lt, GROUP, Q_LEN, ROWS, COLS, COLS, RETURN_LSE, HAS_SINKS)
    else:
        _write_output(Out + col0, Lse, Sinks, b, h, acc, m_i, l_i, v_scale, stride_ob, stride_ot, stride_oh,
                      stride_lb, stride_lh, stride_lt, GROUP, Q_LEN, ROWS, COLS, COLS, False, HAS_SINKS)


@triton.jit
def _floor_div(x, d):
    """x // d for int64 0 <= x < 2^53 and 0 < d < 2^53: the truncated fp64 quotient. Exact: x
    and d are exact in fp64, and when x / d is not an integer it lies at least 1 / d below the
    next one while rounding moves it by at most (x / d) 2^-53 < 1 / d (div.rn.f64 is correctly
    rounded). The merge's operands are tiles (< 2^31) times programs (<= 2^22, the API's bound).
    A 64-bit integer division is a long subroutine on the GPU, and the merge's path would wait on
    several before its first load."""
    return (x.to(tl.float64) / d.to(tl.float64)).to(tl.int64)


@triton.jit
def _write_job(Jobs, bh, first, last, flag):
    """Row ``bh`` of the merge kernel's Jobs (4 int32 a head): its first and last member and a
    flag (the first member's partial in its program's second slot), read by
    ``lean_merge_kernel``."""
    job = Jobs + 4 * bh
    tl.store(job, first)
    tl.store(job + 1, last)
    tl.store(job + 2, flag)


@triton.jit
def _head_members(head_first, n, total, programs):
    """(first, last) int32 program of the stream-K grid whose shares cover the head of ``n`` tiles
    whose tile 0 is global tile ``head_first`` (``total`` tiles dealt to ``programs``)."""
    first = _floor_div((head_first + 1) * programs - 1, total).to(tl.int32)
    last = _floor_div((head_first + n) * programs - 1, total).to(tl.int32)
    return first, last


@triton.jit
def _first_odd(first_prog, head_first, total, programs):
    """Whether the head whose tile 0 is global tile head_first keeps its first program's
    partial in that program's second slot (the share started before the head)."""
    return _floor_div(first_prog.to(tl.int64) * total, programs.to(tl.int64)) < head_first


@triton.jit
def _partial_slot(p, first_prog, first_odd):
    """Workspace slot of program p's partial for a head whose first program is first_prog: 2p,
    or 2p + 1 for first_prog when ``first_odd`` (see ``_first_odd``)."""
    return 2 * p + ((p == first_prog) & first_odd).to(tl.int32)


@triton.jit
def _load_partial(
    WsAcc, WsStats, p, first_prog, last_prog, first_odd,
    ROWS: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BY_SLOT: tl.constexpr,
):
    """Partial (acc, m, l) of program p for a head whose first program is first_prog (slots by
    ``_partial_slot``; BY_SLOT: the partial in slot p); an empty partial when p is past
    last_prog."""
    rows = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    valid = (tl.zeros((ROWS,), dtype=tl.int32) + p) <= last_prog  # a block mask, not a scalar
    if BY_SLOT:
        src = p
    else:
        src = _partial_slot(p, first_prog, first_odd)
    stats = WsStats + src * (2 * ROWS) + rows
    m = tl.load(stats, mask=valid, other=float("-inf"), cache_modifier=".cg")
    l = tl.load(stats + ROWS, mask=valid, other=0.0, cache_modifier=".cg")
    acc_ptrs = WsAcc + src * (ROWS * HEAD_DIM_PAD) + rows[:, None] * HEAD_DIM_PAD + offs_d[None, :]
    acc = tl.load(acc_ptrs, mask=valid[:, None], other=0.0, cache_modifier=".cg")
    return acc, m, l


@triton.jit
def _load4(
    WsAcc, WsStats, p, first_prog, p_last, first_odd,
    STEP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BY_SLOT: tl.constexpr,
):
    """Partials of programs p, p + STEP, p + 2 STEP, p + 3 STEP: (acc, m, l) four times."""
    a0, m0, l0 = _load_partial(WsAcc, WsStats, p, first_prog, p_last, first_odd, ROWS, HEAD_DIM_PAD,
                               BY_SLOT)
    a1, m1, l1 = _load_partial(WsAcc, WsStats, p + STEP, first_prog, p_last, first_odd, ROWS, HEAD_DIM_PAD,
                               BY_SLOT)
    a2, m2, l2 = _load_partial(WsAcc, WsStats, p + 2 * STEP, first_prog, p_last, first_odd, ROWS, HEAD_DIM_PAD,
                               BY_SLOT)
    a3, m3, l3 = _load_partial(WsAcc, WsStats, p + 3 * STEP, first_prog, p_last, first_odd, ROWS, HEAD_DIM_PAD,
                               BY_SLOT)
    return a0, m0, l0, a1, m1, l1, a2, m2, l2, a3, m3, l3


@triton.jit
def _combine4(acc, m_i, l_i, a0, m0, l0, a1, m1, l1, a2, m2, l2, a3, m3, l3):
    """Online-softmax merge of four partials into the running (acc, m, l)."""
    m_new = tl.maximum(tl.maximum(m_i, tl.maximum(m0, m1)), tl.maximum(m2, m3))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    w0 = tl.exp2(m0 - m_shift)
    w1 = tl.exp2(m1 - m_shift)
    w2 = tl.exp2(m2 - m_shift)
    w3 = tl.exp2(m3 - m_shift)
    l_i = l_i * alpha + l0 * w0 + l1 * w1 + l2 * w2 + l3 * w3
    acc = acc * alpha[:, None] + a0 * w0[:, None] + a1 * w1[:, None] + a2 * w2[:, None] + a3 * w3[:, None]
    return acc, m_new, l_i


@triton.jit
def _merge_partials(
    WsAcc, WsStats, p_first, p_last, first_prog, first_odd,
    STEP: tl.constexpr, WIDE: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BY_SLOT: tl.constexpr,
):
    """Merge the partials of programs p_first, p_first + STEP, ... up to p_last (BY_SLOT: of
    those workspace slots), in that order, four per step, or eight when WIDE. Each step issues all its loads before any of its math, so
    they are in flight together: the merge's latency is its number of steps."""
    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, HEAD_DIM_PAD), dtype=tl.float32)
    if WIDE:
        for p in range(p_first, p_last + 1, 8 * STEP):
            a0, m0, l0, a1, m1, l1, a2, m2, l2, a3, m3, l3 = _load4(
                WsAcc, WsStats, p, first_prog, p_last, first_odd, STEP, ROWS, HEAD_DIM_PAD, BY_SLOT)
            a4, m4, l4, a5, m5, l5, a6, m6, l6, a7, m7, l7 = _load4(
                WsAcc, WsStats, p + 4 * STEP, first_prog, p_last, first_odd, STEP, ROWS, HEAD_DIM_PAD, BY_SLOT)
            acc, m_i, l_i = _combine4(acc, m_i, l_i, a0, m0, l0, a1, m1, l1, a2, m2, l2, a3, m3, l3)
            acc, m_i, l_i = _combine4(acc, m_i, l_i, a4, m4, l4, a5, m5, l5, a6, m6, l6, a7, m7, l7)
    else:
        for p in range(p_first, p_last + 1, 4 * STEP):
            a0, m0, l0, a1, m1, l1, a2, m2, l2, a3, m3, l3 = _load4(
                WsAcc, WsStats, p, first_prog, p_last, first_odd, STEP, ROWS, HEAD_DIM_PAD, BY_SLOT)
            acc, m_i, l_i = _combine4(acc, m_i, l_i, a0, m0, l0, a1, m1, l1, a2, m2, l2, a3, m3, l3)
    return acc, m_i, l_i


@triton.jit
def _store_partial(
    WsAcc, WsStats, slot, acc, m_i, l_i,
    ROWS_IN: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, when=True,
):
    """Write (acc, m, l), ROWS_IN rows, to workspace slot ``slot``: the first ROWS rows (the rest
    are padding); nothing unless ``when``."""
    rows = tl.arange(0, ROWS_IN)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    keep = (rows < ROWS) & when
    tl.store(WsAcc + slot * (ROWS * HEAD_DIM_PAD) + rows[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=keep[:, None])
    tl.store(WsStats + slot * (2 * ROWS) + rows, m_i, mask=keep)
    tl.store(WsStats + slot * (2 * ROWS) + ROWS + rows, l_i, mask=keep)


@triton.jit
def _arrive_and_merge(
    WsAcc, WsStats, Tickets, ChunkTickets, Out, Lse, Sinks, acc, m_i, l_i, v_scale,
    b, h, pid, u, g, start, t, n, total, programs,
    stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, ROWS: tl.constexpr, MERGE_ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, MERGE_WIDE: tl.constexpr, ARRIVE_CHUNK: tl.constexpr,
    RETURN_LSE: tl.constexpr, HAS_SINKS: tl.constexpr, BY_SLOT: tl.constexpr, Timeline, TIMELINE: tl.constexpr,
    STORED: tl.constexpr = False, count=1,
):
    """A member of a head cut among several leaves its partial (acc, m, l) (STORED: it already
    has), counts its arrival, and merges if it is the last. With STORED, ``count`` consecutive
    members of one chunk from member ``u`` on, all stored, arrive at once. The head's unit ``t``
    is global unit ``g`` (its unit 0 is global unit g - t); it has ``n`` units.

    The members are the programs covering the head's tiles (program ``pid``, whose share started
    at global tile ``start``, here; their slots from ``_partial_slot``), or with BY_SLOT the
    head's ``n`` splits in batch-invariant mode (split ``u`` here; member = slot = global split
    index: what is summed, and in which order, then depends only on the head's length, never on
    which program computed a split or when).

    The merge is a two-level tree of last arrivers, so no program waits: the members are cut
    into chunks of ARRIVE_CHUNK consecutive ones; the last arriver of a chunk merges the chunk's
    partials in member order into its first member's slot; the last chunk to finish merges the
    chunks' sums in member order and writes the head. A chunk ticket has at most ARRIVE_CHUNK
    contenders, the head ticket (index ``first``) one per chunk."""
    if BY_SLOT:
        first = g - t  # int64: slots x rows x head_dim may pass 2^31 with many splits
        member = first + u
        if not STORED:
            _store_partial(WsAcc, WsStats, member, acc, m_i, l_i, ROWS, MERGE_ROWS, HEAD_DIM_PAD)
        last = first + n - 1
        first_odd = False
    else:
        member = pid
        if not STORED:
            _store_partial(WsAcc, WsStats, 2 * pid + (g != start).to(tl.int32), acc, m_i, l_i,
                           ROWS, MERGE_ROWS, HEAD_DIM_PAD)
        head_first = g - t
        first, last = _head_members(head_first, n, total, programs)
        first_odd = _first_odd(first, head_first, total, programs)
    chunk_first = first + (member - first) // ARRIVE_CHUNK * ARRIVE_CHUNK
    chunk_last = tl.minimum(chunk_first + ARRIVE_CHUNK - 1, last)
    # A chunk is named by its first member's slot for this head (unique per head and chunk).
    if BY_SLOT:
        chunk_slot = chunk_first
    else:
        chunk_slot = _partial_slot(chunk_first, first, first_odd)
    # Every thread's partial stores must be ordered before the ticket (release).
    tl.debug_barrier()
    arrived = tl.atomic_add(ChunkTickets + chunk_slot, count, sem="acq_rel", scope="gpu")
    if TIMELINE:
        _stamp(Timeline, pid, EV_TICKET, arrived)
    if arrived + count == chunk_last - chunk_first + 1:
        tl.atomic_xchg(ChunkTickets + chunk_slot, 0, sem="relaxed", scope="gpu")
        acc_c, m_c, l_c = _merge_partials(
            WsAcc, WsStats, chunk_first, chunk_last, first, first_odd,
            1, MERGE_WIDE, MERGE_ROWS, HEAD_DIM_PAD, BY_SLOT,
        )
        if last - first < ARRIVE_CHUNK:  # one chunk: it is the whole head
            _write_output(Out, Lse, Sinks, b, h, acc_c, m_c, l_c, v_scale,
                          stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                          GROUP, Q_LEN, MERGE_ROWS, HEAD_DIM, HEAD_DIM_PAD, RETURN_LSE, HAS_SINKS)
        else:
            # The chunk's members have all been read: its first slot takes the chunk's sum.
            _store_partial(WsAcc, WsStats, chunk_slot, acc_c, m_c, l_c, MERGE_ROWS, MERGE_ROWS, HEAD_DIM_PAD)
            tl.debug_barrier()
            arrived = tl.atomic_add(Tickets + first, 1, sem="acq_rel", scope="gpu")
            if arrived == (last - first) // ARRIVE_CHUNK:
                # Last chunk of the head: merge the chunks' sums in member order.
                tl.atomic_xchg(Tickets + first, 0, sem="relaxed", scope="gpu")
                acc_m, m_m, l_m = _merge_partials(
                    WsAcc, WsStats, first, last, first, first_odd,
                    ARRIVE_CHUNK, MERGE_WIDE, MERGE_ROWS, HEAD_DIM_PAD, BY_SLOT,
                )
                _write_output(Out, Lse, Sinks, b, h, acc_m, m_m, l_m, v_scale,
                              stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                              GROUP, Q_LEN, MERGE_ROWS, HEAD_DIM, HEAD_DIM_PAD, RETURN_LSE, HAS_SINKS)


@triton.jit
def _head_scale(Scale, b, h, kv_heads, KIND: tl.constexpr):
    """Kv head (b, h)'s dequantisation scale for a per-head or per-(sequence, head) KIND; 1 for
    per-token scales (applied per tile)."""
    if KIND == SCALE_HEAD:
        x = tl.load(Scale + h)
    elif KIND == SCALE_SEQ:
        x = tl.load(Scale + b * kv_heads + h)
    else:
        x = 1.0
    return x


@triton.jit
def _load_q(
    Q, KScale, VScale, b, h, kv_heads, q_rows, mask_q, offs_d, stride_qb, stride_qh, scale,
    GROUP: tl.constexpr, K_SCALE_KIND: tl.constexpr, V_SCALE_KIND: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """The packed query rows of kv head (b, h) in DOT_DTYPE, the scale of their scores and V's
    dequantisation scale.

    fp8 caches (scale kinds other than SCALE_NONE): the products run in fp16. q takes fp16 by a
    power of two that keeps any bf16 q in fp16's range (exact for every element within 2^27 of the
    largest finite one: _exact_fp16); the softmax scale, K's scale and the inverse power scale the
    fp32 scores, V's scale the output. Per-token scales are applied per tile instead
    (_attend_tiles): here they count as 1."""
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h * GROUP * stride_qh + q_rows[:, None] + offs_d[None, :]
    if K_SCALE_KIND != SCALE_NONE:
        q, unscale = _exact_fp16(tl.load(q_ptrs, mask=mask_q, other=0.0).to(tl.float32), DOT_DTYPE)
        head_scale = scale * _head_scale(KScale, b, h, kv_heads, K_SCALE_KIND) * unscale
        v_scale = _head_scale(VScale, b, h, kv_heads, V_SCALE_KIND)
    else:
        q = tl.load(q_ptrs, mask=mask_q, other=0.0).to(DOT_DTYPE)
        head_scale = scale
        v_scale = 1.0
    return q, head_scale, v_scale


@triton.jit(do_not_specialize=["batch", "kv_heads", "capacity", "num_pages", "window_left", "window_right"])
def lean_decode_kernel(
    Q, K, V, Out, Lse, SeqLens, LeftPad, BlockTable, Sinks, KScale, VScale, Bounds,
    Plan, WsAcc, WsStats, Tickets, ChunkTickets, Jobs, Timeline,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh, stride_lt,
    stride_btb,
    batch, kv_heads, capacity, num_pages, window_left, window_right, scale, softcap,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    TILE: tl.constexpr, PAGE_SIZE: tl.constexpr, TARGET_SHARE: tl.constexpr, SPLIT: tl.constexpr, UNIT: tl.constexpr,
    MERGE_ROWS: tl.constexpr, MERGE_WIDE: tl.constexpr, ARRIVE_CHUNK: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, HAS_LEFTPAD: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, K_SCALE_KIND: tl.constexpr, V_SCALE_KIND: tl.constexpr,
    HAS_BOUNDS: tl.constexpr, PLANNED: tl.constexpr, RETURN_LSE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_B: tl.constexpr, USE_PDL: tl.constexpr, TIMELINE: tl.constexpr, MERGE_KERNEL: tl.constexpr,
):
    """Decode attention over a persistent grid.

    Q (batch, Q_LEN, q_heads, head_dim) by strides; K, V (batch, capacity, kv_heads, head_dim) by
    strides, or pages (num_pages, PAGE_SIZE, kv_heads, head_dim) with BlockTable (batch,
    max_pages) when PAGE_SIZE > 0; Out like Q; Lse (batch, q_heads, Q_LEN) float32; SeqLens and
    LeftPad (batch,) int32; Sinks (q_heads,) float32; KScale, VScale the fp8 cache's float32
    scales, packed, of K_SCALE_KIND and V_SCALE_KIND: (kv_heads,), (batch, kv_heads), or per
    token (batch, capacity, kv_heads), or (num_pages, PAGE_SIZE, kv_heads) when paged.
    The Q_LEN x GROUP query rows of a kv head share each K/V tile. ``scale`` is the softmax scale
    (times log2(e) unless HAS_SOFTCAP). A row sees keys in [query - window_left, query +
    window_right]; HAS_WINDOW: tiles before every row's window are skipped (and not counted);
    HAS_MASK: the per-row bounds are applied. HAS_BOUNDS: Bounds int32 (batch, Q_LEN, 2) gives
    each query token's keys [lo, hi) instead, numbered from the sequence's first live key.
    Shares are dealt in units of UNIT tokens: TILE, or SPLIT > 0 (batch-invariant mode: each
    split of SPLIT tokens, a multiple of TILE, is attended alone and the splits of a head merge
    in split order). With PLANNED, program p reads its share from Plan[p] (written by
    ``lean_plan_kernel`` for the same lengths and UNIT); otherwise it locates the share itself.
    Workspace: WsAcc (S, MERGE_ROWS, HEAD_DIM_PAD) fp32, WsStats (S, 2, MERGE_ROWS) fp32, Tickets
    and ChunkTickets int32, zero between calls (the last arriver on each ticket puts it back);
    S = 2 * grid slots, grid head tickets and 2 * grid chunk tickets, or with SPLIT one slot and
    ticket of each kind per split of the call.
    MERGE_KERNEL: the members of a cut head only leave their partials, for ``lean_merge_kernel``,
    launched next. The program that ends head (b, h) writes its row of Jobs (batch * kv_heads, 4)
    int32: (the head's first program, its last, whether the first one's partial is in its second
    slot; the fourth is unused), or with SPLIT (its first split's slot, its last split's, 0), or
    a first program of -1 when the head was whole.
    TIMELINE (a probe, GPU only): Timeline (grid, EVENTS) int64 takes each program's EV_* stamps.
    """
    pid = tl.program_id(0)
    if TIMELINE:
        _stamp(Timeline, pid, EV_START, pid)
    if USE_PDL:
        # Launched early behind the previous kernel (programmatic dependent launch): wait for it
        # to finish before reading anything it may have written (q, the cache, the plan).
        gdc_wait()
    if TIMELINE:
        _stamp(Timeline, pid, EV_WAITED, pid)
    if PLANNED:
        total, programs, start, end, b, h, t = _read_plan_row(Plan, pid)
    else:
        total, programs, start, end, b, h, t = _share_of(
            SeqLens, LeftPad, batch, kv_heads, capacity, window_left, pid, tl.num_programs(0),
            HAS_SEQLENS, HAS_LEFTPAD, Q_LEN, HAS_WINDOW, UNIT, TARGET_SHARE, BLOCK_B,
        )
    if pid >= programs:
        return
    if TIMELINE:
        _stamp(Timeline, pid, EV_SHARE, (end - start).to(tl.int32))

    rows = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    real = rows < Q_LEN * GROUP
    mask_q = real[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_rows = (rows // GROUP) * stride_qt + (rows % GROUP) * stride_qh
    # Per-token V scales weigh the PV product in bf16 when q is bf16 (_attend_tiles).
    BF16_WEIGHTS: tl.constexpr = (DOT_DTYPE == tl.float16) & (Q.dtype.element_ty == tl.bfloat16)

    g = start
    while g < end:
        first, length, lo, live = _live_range(SeqLens, LeftPad, b, b >= 0, capacity, window_left,
                                              HAS_SEQLENS, HAS_LEFTPAD, Q_LEN, HAS_WINDOW)
        n_units = _num_tiles(length, UNIT)
        t_end = tl.minimum(n_units.to(tl.int64), t + (end - g)).to(tl.int32)
        q, head_scale, v_scale = _load_q(Q, KScale, VScale, b, h, kv_heads, q_rows, mask_q, offs_d, stride_qb,
                                         stride_qh, scale, GROUP, K_SCALE_KIND, V_SCALE_KIND, DOT_DTYPE)
        if SPLIT > 0:
            # Each split is attended on its own and merged in split order (_arrive_and_merge), so
            # its bits are the same whichever program takes it. One tile loop runs through all of
            # the head's splits in the share (the pipeline never drains between them) and leaves
            # each split's partial in its slot; only then do they arrive, those of a chunk on one
            # ticket at once. A head of one split is written from the registers.
            # int32 like the tile indices (int64 ``capacity`` makes ``length`` int64; the host
            # bounds every tile count below 2**31)
            n_tiles = _num_tiles(length, TILE).to(tl.int32)
            acc, m_i, l_i = _attend_tiles(
                q, K, V, BlockTable, KScale, VScale, Bounds, b, h, first, length, lo, live, t * (SPLIT // TILE),
                tl.minimum(t_end * (SPLIT // TILE), n_tiles), head_scale, softcap,
                window_left, window_right, num_pages, kv_heads, capacity,
                stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_btb,
                GROUP, Q_LEN, ROWS, HEAD_DIM, HEAD_DIM_PAD, TILE, PAGE_SIZE, HAS_SOFTCAP, HAS_MASK, HAS_BOUNDS,
                K_SCALE_KIND, V_SCALE_KIND, DOT_DTYPE, Timeline, pid, g == start, TIMELINE,
                WsAcc, WsStats, g - t, n_units > 1, SPLIT // TILE, MERGE_ROWS,
                BF16_WEIGHTS,
            )
            if TIMELINE:
                if g + (t_end - t) >= end:
                    _stamp(Timeline, pid, EV_LAST_TILE, tl.max(m_i, axis=0).to(tl.int32, bitcast=True))
            if USE_PDL:  # as below, with the total counted in tiles
                if (g + (t_end - t) >= end) & (total * (SPLIT // TILE) <= 8 * tl.num_programs(0)):
                    gdc_launch_dependents()
            if n_units == 1:
                _write_output(Out, Lse, Sinks, b, h, acc, m_i, l_i, v_scale,
                              stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                              GROUP, Q_LEN, ROWS, HEAD_DIM, HEAD_DIM_PAD, RETURN_LSE, HAS_SINKS)
                if MERGE_KERNEL:
                    tl.store(Jobs + 4 * (b * kv_heads + h), -1)  # one split: nothing to merge
            elif MERGE_KERNEL:
                # The splits' partials are in slots g - t .. g - t + n_units - 1 (split order):
                # the program holding the last split names them for the merge kernel.
                if TIMELINE:  # the splits' partials are stored
                    _stamp(Timeline, pid, EV_TICKET, tl.max(l_i, axis=0).to(tl.int32, bitcast=True))
                if t_end == n_units:
                    _write_job(Jobs, b * kv_heads + h, (g - t).to(tl.int32), (g - t + n_units - 1).to(tl.int32), 0)
            else:
                for c in range(t // ARRIVE_CHUNK * ARRIVE_CHUNK, t_end, ARRIVE_CHUNK):
                    u = tl.maximum(c, t)
                    _arrive_and_merge(
                        WsAcc, WsStats, Tickets, ChunkTickets, Out, Lse, Sinks, acc, m_i, l_i, v_scale,
                        b, h, pid, u, g, start, t, n_units, total, programs,
                        stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                        GROUP, Q_LEN, ROWS, MERGE_ROWS, HEAD_DIM, HEAD_DIM_PAD, MERGE_WIDE, ARRIVE_CHUNK, RETURN_LSE,
                        HAS_SINKS, True, Timeline, TIMELINE, True, tl.minimum(c + ARRIVE_CHUNK, t_end) - u,
                    )
        else:
            n_tiles = n_units
            acc, m_i, l_i = _attend_tiles(
                q, K, V, BlockTable, KScale, VScale, Bounds, b, h, first, length, lo, live, t, t_end, head_scale,
                softcap, window_left, window_right, num_pages, kv_heads, capacity,
                stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_btb,
                GROUP, Q_LEN, ROWS, HEAD_DIM, HEAD_DIM_PAD, TILE, PAGE_SIZE, HAS_SOFTCAP, HAS_MASK, HAS_BOUNDS,
                K_SCALE_KIND, V_SCALE_KIND, DOT_DTYPE, Timeline, pid, g == start, TIMELINE,
                WsAcc, WsStats, 0, False, 0, MERGE_ROWS,
                BF16_WEIGHTS,
            )
            if TIMELINE:
                if g + (t_end - t) >= end:
                    _stamp(Timeline, pid, EV_LAST_TILE, tl.max(m_i, axis=0).to(tl.int32, bitcast=True))
            if USE_PDL:
                # Small calls let the next kernel launch once every program has streamed its last
                # tile, so its launch overlaps the merges. Large calls leave it to their exit: there
                # an early launch measured slower (its programs take SM slots while they wait).
                if (g + (t_end - t) >= end) & (total <= 8 * tl.num_programs(0)):
                    gdc_launch_dependents()

            if (t == 0) & (t_end == n_tiles):
                _write_output(Out, Lse, Sinks, b, h, acc, m_i, l_i, v_scale,
                              stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                              GROUP, Q_LEN, ROWS, HEAD_DIM, HEAD_DIM_PAD, RETURN_LSE, HAS_SINKS)
                if MERGE_KERNEL:
                    tl.store(Jobs + 4 * (b * kv_heads + h), -1)  # nothing to merge
            else:
                # Program pid covered tiles [t, t_end) of the head, not all of them: its partial
                # goes to its slot, for the head's last arriver or the merge kernel.
                _store_partial(WsAcc, WsStats, 2 * pid + (g != start).to(tl.int32), acc, m_i, l_i,
                               ROWS, MERGE_ROWS, HEAD_DIM_PAD)
                if MERGE_KERNEL:
                    if TIMELINE:
                        _stamp(Timeline, pid, EV_TICKET, tl.max(l_i, axis=0).to(tl.int32, bitcast=True))
                    if t_end == n_tiles:  # the head's last member names the head for the merge
                        head_first = g - t
                        first_member, _ = _head_members(head_first, n_tiles, total, programs)
                        _write_job(Jobs, b * kv_heads + h, first_member, pid,
                                   _first_odd(first_member, head_first, total, programs).to(tl.int32))
                else:
                    _arrive_and_merge(
                        WsAcc, WsStats, Tickets, ChunkTickets, Out, Lse, Sinks, acc, m_i, l_i, v_scale,
                        b, h, pid, 0, g, start, t, n_tiles, total, programs,
                        stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                        GROUP, Q_LEN, ROWS, MERGE_ROWS, HEAD_DIM, HEAD_DIM_PAD, MERGE_WIDE, ARRIVE_CHUNK,
                        RETURN_LSE, HAS_SINKS, False, Timeline, TIMELINE, True,
                    )

        g += (t_end - t).to(tl.int64)
        t = 0
        h += 1
        if h == kv_heads:
            h = 0
            b += 1
    if TIMELINE:
        _stamp(Timeline, pid, EV_EXIT, pid)


@triton.jit
def _load_members(
    WsAcc, WsStats, j0, first, last, first_odd, col0,
    MEMBERS: tl.constexpr, MERGE_ROWS: tl.constexpr, COLS: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BY_SLOT: tl.constexpr,
):
    """Members j0 .. j0 + MEMBERS - 1 of a head whose members are first .. last: their partials'
    m and l (MEMBERS, MERGE_ROWS) and columns [col0, col0 + COLS) of acc (MEMBERS, MERGE_ROWS,
    COLS), empty past ``last``. Slots by ``_partial_slot``, or with BY_SLOT the member itself."""
    rows = tl.arange(0, MERGE_ROWS)
    cols = tl.arange(0, COLS)
    j = j0 + tl.arange(0, MEMBERS)
    live = j <= last
    if BY_SLOT:
        slot = j.to(tl.int64)
    else:
        slot = _partial_slot(j, first, first_odd).to(tl.int64)
    stats = WsStats + slot[:, None] * (2 * MERGE_ROWS) + rows[None, :]
    m = tl.load(stats, mask=live[:, None], other=float("-inf"), cache_modifier=".cg")
    l = tl.load(stats + MERGE_ROWS, mask=live[:, None], other=0.0, cache_modifier=".cg")
    a = tl.load(WsAcc + slot[:, None, None] * (MERGE_ROWS * HEAD_DIM_PAD)
                + rows[None, :, None] * HEAD_DIM_PAD + col0 + cols[None, None, :],
                mask=live[:, None, None], other=0.0, cache_modifier=".cg")
    return m, l, a


@triton.jit
def _merge_members(acc, m_i, l_i, m, l, a):
    """Online-softmax merge of a load step's partials (m, l (MEMBERS, rows); a (MEMBERS, rows,
    cols)) into the running (acc, m_i, l_i)."""
    m_new = tl.maximum(m_i, tl.max(m, axis=0))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    w = tl.exp2(m - m_shift[None, :])
    l_i = l_i * alpha + tl.sum(l * w, axis=0)
    acc = acc * alpha[:, None] + tl.sum(a * w[:, :, None], axis=0)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["kv_heads"])
def lean_merge_kernel(
    Jobs, WsAcc, WsStats, Out, Lse, Sinks, VScale,
    stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
    kv_heads,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, MERGE_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, COLS: tl.constexpr, MEMBERS: tl.constexpr, V_SCALE_KIND: tl.constexpr,
    RETURN_LSE: tl.constexpr, HAS_SINKS: tl.constexpr, USE_PDL: tl.constexpr, BY_SLOT: tl.constexpr,
):
    """The merge of the heads that ``lean_decode_kernel``'s shares cut (its MERGE_KERNEL mode), one
    launch after it: every partial is in its slot before this starts, and no program waits.

    Grid (batch * kv_heads, HEAD_DIM / COLS). Program (i, c) merges columns [c COLS, (c + 1) COLS)
    of head i = b * kv_heads + h when Jobs[i] names its members (nothing when the head was whole):
    the partials of decode programs Jobs[i, 0] .. Jobs[i, 1] in member order, MEMBERS at a
    time (one load each, all in flight together; MEMBERS is sized so that the call's average head
    is one step, where a chain of last arrivers costs two atomic round trips and several
    dependent loads), then
    writes those columns of the head's rows, column 0's program also their LSE. Out, Lse, Sinks,
    VScale and the workspace (WsAcc, WsStats: partial slots by ``_partial_slot``) as in
    ``lean_decode_kernel``. BY_SLOT (its batch-invariant mode): the members are the slots Jobs[i, 0]
    .. Jobs[i, 1], the head's splits in order; with MEMBERS, COLS and the warps fixed by the head
    dim and rows alone, what is summed, and in which order, depends only on the head's splits."""
    if USE_PDL:
        gdc_wait()  # the partials and Jobs come from the kernel before
    bh = tl.program_id(0)
    col0 = tl.program_id(1) * COLS
    first = tl.load(Jobs + 4 * bh, cache_modifier=".cg")
    if first >= 0:
        last = tl.load(Jobs + 4 * bh + 1, cache_modifier=".cg")
        first_odd = tl.load(Jobs + 4 * bh + 2, cache_modifier=".cg") != 0
        b = bh // kv_heads
        h = bh % kv_heads
        m_i = tl.full((MERGE_ROWS,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((MERGE_ROWS,), dtype=tl.float32)
        acc = tl.zeros((MERGE_ROWS, COLS), dtype=tl.float32)
        # Each step's math waits on its own loads only: the next step's are issued before it (a
        # head of several steps pays about one load latency, not one a step).
        m, l, a = _load_members(WsAcc, WsStats, first, first, last, first_odd, col0,
                                MEMBERS, MERGE_ROWS, COLS, HEAD_DIM_PAD, BY_SLOT)
        for j0 in range(first + MEMBERS, last + 1, MEMBERS):
            m_next, l_next, a_next = _load_members(WsAcc, WsStats, j0, first, last, first_odd, col0,
                                                   MEMBERS, MERGE_ROWS, COLS, HEAD_DIM_PAD, BY_SLOT)
            acc, m_i, l_i = _merge_members(acc, m_i, l_i, m, l, a)
            m, l, a = m_next, l_next, a_next
        acc, m_i, l_i = _merge_members(acc, m_i, l_i, m, l, a)
        if USE_PDL:
            gdc_launch_dependents()
        v_scale = _head_scale(VScale, b, h, kv_heads, V_SCALE_KIND)  # 1 for per-token scales: in the weights
        _write_cols(Out, Lse, Sinks, b, h, acc, m_i, l_i, v_scale, col0,  # COLS divides HEAD_DIM
                    stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                    GROUP, Q_LEN, MERGE_ROWS, COLS, RETURN_LSE, HAS_SINKS)
