"""Multi-head latent attention (MLA) decode: DeepSeek-style, one latent KV head for every query head.

Each cache row holds D values: the latent part (the first DV, which is also V) and the rope part
(the remaining DR = D - DV). A tile of keys is loaded once as its latent and rope columns; the
scores are q_latent . k_latent + q_rope . k_rope, and the values are the latent columns already
in registers (or shared memory): no byte of the cache is read twice.

Two tile loops compute the same values (not the same bits: their sums run in different orders).
Where the launch config asks for it (64-row blocks on a GPU, every block under the interpreter),
16-bit caches whose tiles are whole rows of a 2-D view (contiguous, or pages of a multiple of the
tile; ``_mla_call.tma_view`` has every condition) take ``_mla_attend_tma`` outside
batch-invariant mode: bulk tensor-descriptor copies and both products transposed, so neither
addresses nor q sit in registers. Every other call takes ``_mla_attend``: a pointer per element.

The query rows of a request are packed like decode packs a GQA group: a block holds the Q_LEN
tokens of GROUP consecutive query heads (row r: token r // GROUP, head h * GROUP + r % GROUP), and
the q_heads / GROUP blocks of a request are the "kv heads" of the stream-K partition
(``kernels/plan.py``): tiles of (request, block, keys) are dealt over a persistent grid, so
several blocks stream the same cache (as FlashMLA's 64-row blocks do at 128 heads). A block cut
by a share boundary is merged exactly by decode's last-arriver tree (``lean_decode``'s
``_arrive_and_merge``), with no waiting.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .lean_decode import (
    SCALE_NONE, SCALE_TOKEN, _arrive_and_merge, _combine4, _first_odd, _floor_div, _head_members, _head_scale,
    _partial_slot, _pow2_factors, _score_mod, _token_weights, _write_cols, _write_output,
)
from .plan import _live_range, _num_tiles, _read_plan_row, _share_of

# A causal row sees every key before it: the window's left side, unbounded.
_UNBOUNDED = tl.constexpr(2**30)


@triton.jit
def _mla_load_q(
    Q, KScale, b, h, q_rows, real, stride_qb, stride_qh, scale,
    GROUP: tl.constexpr, ROWS: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, DR: tl.constexpr,
    DR_PAD: tl.constexpr, SCALE_KIND: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Block h's packed query rows of request b as (latent (ROWS, DV_PAD), rope (ROWS, DR_PAD)) in
    DOT_DTYPE, the scale of their scores and the output's dequantisation scale.

    fp8 caches: the products run in fp16; q takes it by one power of two for both parts (their
    products are summed), which keeps any bf16 q in fp16's range (as decode's ``_exact_fp16``),
    undone on the fp32 scores."""
    offs_v = tl.arange(0, DV_PAD)
    offs_r = tl.arange(0, DR_PAD)
    base = Q + b.to(tl.int64) * stride_qb + h * GROUP * stride_qh + q_rows
    q_l = tl.load(base[:, None] + offs_v[None, :], mask=real[:, None] & (offs_v < DV)[None, :], other=0.0)
    q_r = tl.load(base[:, None] + DV + offs_r[None, :], mask=real[:, None] & (offs_r < DR)[None, :], other=0.0)
    if SCALE_KIND != SCALE_NONE:
        q_l = q_l.to(tl.float32)
        q_r = q_r.to(tl.float32)
        mag_l = tl.abs(q_l)
        mag_r = tl.abs(q_r)
        # Only finite values set the power: an inf or NaN row stays non-finite on its own.
        amax = tl.maximum(tl.max(tl.max(tl.where(mag_l < float("inf"), mag_l, 0.0), axis=1), axis=0),
                          tl.max(tl.max(tl.where(mag_r < float("inf"), mag_r, 0.0), axis=1), axis=0))
        up, down = _pow2_factors(amax, 13.0)
        q_l = q_l * up
        q_r = q_r * up
        kv_scale = _head_scale(KScale, b, 0, 1, SCALE_KIND)
        head_scale = scale * kv_scale * down
    else:
        head_scale = scale
        kv_scale = 1.0
    return q_l.to(DOT_DTYPE), q_r.to(DOT_DTYPE), head_scale, kv_scale


@triton.jit
def _mla_attend(
    q_l, q_r, KV, KR, BlockTable, KScale, b, first, length, live, tile_start, tile_end, scale, num_pages, capacity,
    stride_kb, stride_kn, stride_rb, stride_rn, stride_btb,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, ROWS: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    DR: tl.constexpr, DR_PAD: tl.constexpr, TILE: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HAS_MASK: tl.constexpr, SCALE_KIND: tl.constexpr, DOT_DTYPE: tl.constexpr, ROPE_APART: tl.constexpr,
):
    """Online softmax of the packed rows (q_l, q_r) over key tiles ``[tile_start, tile_end)`` of
    request b, whose ``length`` live keys are cache positions [first, first + length) (``live`` =
    length; keys are numbered from ``first``).
    Returns unnormalised (acc (ROWS, DV_PAD), m, l), m in log2 units.

    Per tile: the latent columns (TILE, DV_PAD) and rope columns (TILE, DR_PAD) of the keys are
    loaded once (ROPE_APART: the rope columns from KR, rows by stride_rb / stride_rn); both
    products run on tensor cores (``tl.dot``); V is the latent load. Paged caches find each key's
    page in BlockTable (read one tile ahead); a live key on a page outside [0, num_pages) is never
    read and NaNs the rows that see it. Per-token scales (SCALE_TOKEN) multiply the score columns
    and the weights of the PV product, as in decode."""
    offs_n = tl.arange(0, TILE)
    offs_v = tl.arange(0, DV_PAD)
    offs_r = tl.arange(0, DR_PAD)
    rows = tl.arange(0, ROWS)
    query = live - Q_LEN + rows // GROUP  # each row's position, in keys
    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, DV_PAD), dtype=tl.float32)
    b64 = b.to(tl.int64)
    table = BlockTable + b64 * stride_btb
    bad = offs_n < 0
    if PAGE_SIZE > 0:
        tok = tile_start * TILE + offs_n
        page = tl.load(table + (first + tok) // PAGE_SIZE, mask=tok < length, other=0)
    for tile in range(tile_start, tile_end):
        tok = tile * TILE + offs_n
        pos = first + tok  # cache positions
        in_range = tok < length
        read = in_range
        if PAGE_SIZE == 0:
            k_rows = b64 * stride_kb + pos.to(tl.int64) * stride_kn
            if SCALE_KIND == SCALE_TOKEN:
                s_rows = b64 * capacity + pos
        else:
            bad = in_range & ((page < 0) | (page >= num_pages))
            read = in_range & ~bad
            slot = pos % PAGE_SIZE
            page_now = page
            k_rows = page.to(tl.int64) * stride_kb + slot * stride_kn
            if SCALE_KIND == SCALE_TOKEN:
                s_rows = page.to(tl.int64) * PAGE_SIZE + slot
            next_tok = tok + TILE
            page = tl.load(table + (first + next_tok) // PAGE_SIZE,
                           mask=(next_tok < length) & (next_tok < tile_end * TILE), other=0)
        kv = tl.load(KV + k_rows[:, None] + offs_v[None, :], mask=read[:, None] & (offs_v < DV)[None, :],
                     other=0.0).to(DOT_DTYPE)
        qk = tl.dot(q_l, tl.trans(kv))
        if DR > 0:
            if ROPE_APART:
                if PAGE_SIZE == 0:
                    r_rows = b64 * stride_rb + pos.to(tl.int64) * stride_rn
                else:
                    r_rows = page_now.to(tl.int64) * stride_rb + slot * stride_rn
                k_r = tl.load(KR + r_rows[:, None] + offs_r[None, :], mask=read[:, None] & (offs_r < DR)[None, :],
                              other=0.0).to(DOT_DTYPE)
            else:
                k_r = tl.load(KV + k_rows[:, None] + DV + offs_r[None, :],
                              mask=read[:, None] & (offs_r < DR)[None, :], other=0.0).to(DOT_DTYPE)
            qk = tl.dot(q_r, tl.trans(k_r), acc=qk)
        if SCALE_KIND == SCALE_TOKEN:
            token_scale = tl.load(KScale + s_rows, mask=read, other=0.0)
            qk = qk * token_scale[None, :]
        s = _score_mod(qk, scale, 0.0, tok, in_range, bad, query, _UNBOUNDED, 0, query, query,
                       False, HAS_MASK, False, PAGE_SIZE > 0)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: no inf - inf
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if SCALE_KIND == SCALE_TOKEN:
            w, down = _token_weights(p, token_scale)
            acc = acc * alpha[:, None] + tl.dot(w.to(DOT_DTYPE), kv) * down
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), kv)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _mla_attend_tma(
    q_l, q_r, KVDesc, KRDesc, BlockTable, b, first, length, live, tile_start, tile_end, scale, num_pages, capacity,
    stride_btb,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, ROWS: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr,
    TILE: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_MASK: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ROPE_APART: tl.constexpr,
):
    """``_mla_attend`` for 16-bit caches whose tiles are whole rows of a 2-D view: the cache's
    rows (batch x capacity, or num_pages x PAGE_SIZE with PAGE_SIZE a multiple of TILE, so a tile
    lies in one page), DV latent then DR rope columns. KVDesc and KRDesc are tensor descriptors of
    that view with blocks (TILE, DV) and (TILE, DR) (ROPE_APART: KRDesc is the rope tensor's
    view, same rows, its columns from 0): each tile is two bulk copies (TMA on
    Hopper), so no thread holds an address per element, the registers go to the accumulator.
    Paged caches need ``first`` a multiple of TILE (no cache_leftpad; the host checks).

    Both products are computed transposed (swap-AB), keys and value columns as their M: scores
    (TILE, ROWS) = k . q^T, output (DV, ROWS) += v^T . p^T. A Hopper warpgroup product has M =
    64, so a tile of 64 keys fills it whatever the rows (the N), the warps split keys and value
    columns instead of repeating the rows' work, and q is a shared-memory operand. Returns
    (acc (ROWS, DV), m, l) as ``_mla_attend``."""
    query = live - Q_LEN + tl.arange(0, ROWS) // GROUP  # each row's position, in keys
    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((DV, ROWS), dtype=tl.float32)
    q_lt = tl.trans(q_l)
    q_rt = tl.trans(q_r)
    table = BlockTable + b.to(tl.int64) * stride_btb
    page = 0
    if PAGE_SIZE > 0:
        page = tl.load(table + (tile_start * TILE) // PAGE_SIZE, mask=tile_start * TILE < length, other=0)
    # Whole tiles, then the one a sequence's last keys leave part-filled: a bulk copy reads the
    # rows past the length too (dead slots, the next sequence's rows), which may hold NaN, and
    # 0 x NaN is NaN in the PV product, so that tile's dead rows are zeroed first.
    # (int32 like the tile indices: an int64 ``capacity`` makes ``length`` int64)
    full_end = tl.maximum(tl.minimum(tile_end, (length // TILE).to(tl.int32)), tile_start)
    for tile in range(tile_start, full_end):
        acc, m_i, l_i, page = _mla_tma_tile(
            acc, m_i, l_i, page, q_lt, q_rt, KVDesc, KRDesc, table, b, first, length, query, tile, tile_end, scale,
            num_pages, capacity, DV, DR, TILE, PAGE_SIZE, HAS_MASK, DOT_DTYPE, ROPE_APART, False,
        )
    if full_end < tile_end:
        acc, m_i, l_i, page = _mla_tma_tile(
            acc, m_i, l_i, page, q_lt, q_rt, KVDesc, KRDesc, table, b, first, length, query, full_end, tile_end, scale,
            num_pages, capacity, DV, DR, TILE, PAGE_SIZE, HAS_MASK, DOT_DTYPE, ROPE_APART, True,
        )
    return tl.trans(acc), m_i, l_i


@triton.jit
def _mla_tma_tile(
    acc, m_i, l_i, page, q_lt, q_rt, KVDesc, KRDesc, table, b, first, length, query, tile, tile_end, scale,
    num_pages, capacity,
    DV: tl.constexpr, DR: tl.constexpr, TILE: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ROPE_APART: tl.constexpr, ZERO_DEAD: tl.constexpr,
):
    """One key tile of ``_mla_attend_tma``: the online-softmax update of (acc (DV, ROWS), m, l)
    and the page of the next tile (paged caches read one tile ahead). ZERO_DEAD: zero the
    latent rows past ``length`` before the products."""
    tok = tile * TILE + tl.arange(0, TILE)
    in_range = tok < length
    if PAGE_SIZE == 0:
        row = b * capacity + first + tile * TILE
        bad_page = False
    else:
        bad_page = (page < 0) | (page >= num_pages)
        # A bad page is never read (its keys NaN the rows below); row 0 stands in.
        row = tl.where(bad_page, 0, page * PAGE_SIZE + (tile * TILE) % PAGE_SIZE)
        next_tok = (tile + 1) * TILE
        page = tl.load(table + next_tok // PAGE_SIZE, mask=(next_tok < length) & (tile + 1 < tile_end), other=0)
    kv = KVDesc.load([row, 0]).to(DOT_DTYPE)
    if ZERO_DEAD:
        kv = tl.where(in_range[:, None], kv, 0.0)
    qk = tl.dot(kv, q_lt)
    if DR > 0:
        qk = tl.dot(KRDesc.load([row, 0 if ROPE_APART else DV]).to(DOT_DTYPE), q_rt, acc=qk)
    # Keys past the live range or after a row's query give -inf (a dead row's rope scores,
    # whatever they are, are replaced); live keys on a bad page NaN.
    keep = in_range[:, None]
    if HAS_MASK:
        keep = keep & (tok[:, None] <= query[None, :])
    s = tl.where(keep, qk * scale, float("-inf"))
    if PAGE_SIZE > 0:
        s = tl.where(keep & bad_page, float("nan"), s)
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: no inf - inf
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[None, :])
    l_i = l_i * alpha + tl.sum(p, axis=0)
    acc = acc * alpha[None, :] + tl.dot(tl.trans(kv), p.to(DOT_DTYPE))
    return acc, m_new, l_i, page


@triton.jit
def _mla_tiles(
    q_l, q_r, KV, KR, KVDesc, KRDesc, BlockTable, KScale, b, first, length, live, tile_start, tile_end, scale,
    num_pages, capacity, stride_kb, stride_kn, stride_rb, stride_rn, stride_btb,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, ROWS: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    DR: tl.constexpr, DR_PAD: tl.constexpr, TILE: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HAS_MASK: tl.constexpr, SCALE_KIND: tl.constexpr, DOT_DTYPE: tl.constexpr, USE_TMA: tl.constexpr,
    ROPE_APART: tl.constexpr,
):
    """Key tiles ``[tile_start, tile_end)`` of request b: by tensor descriptors (USE_TMA) or by
    pointers."""
    if USE_TMA:
        return _mla_attend_tma(
            q_l, q_r, KVDesc, KRDesc, BlockTable, b, first, length, live, tile_start, tile_end, scale, num_pages,
            capacity, stride_btb, GROUP, Q_LEN, ROWS, DV, DR, TILE, PAGE_SIZE, HAS_MASK, DOT_DTYPE, ROPE_APART,
        )
    else:
        return _mla_attend(
            q_l, q_r, KV, KR, BlockTable, KScale, b, first, length, live, tile_start, tile_end, scale, num_pages,
            capacity, stride_kb, stride_kn, stride_rb, stride_rn, stride_btb,
            GROUP, Q_LEN, ROWS, DV, DV_PAD, DR, DR_PAD, TILE, PAGE_SIZE, HAS_MASK, SCALE_KIND, DOT_DTYPE, ROPE_APART,
        )


@triton.jit(do_not_specialize=["batch", "blocks", "capacity", "num_pages"])
def mla_decode_kernel(
    Q, KV, KR, KVDesc, KRDesc, Out, Lse, SeqLens, LeftPad, BlockTable, KScale, Plan, WsAcc, WsStats, Tickets,
    ChunkTickets,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kn, stride_rb, stride_rn,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh, stride_lt,
    stride_btb,
    batch, blocks, capacity, num_pages, scale,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, ROWS: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr, DR: tl.constexpr, DR_PAD: tl.constexpr,
    TILE: tl.constexpr, PAGE_SIZE: tl.constexpr, TARGET_SHARE: tl.constexpr, SPLIT: tl.constexpr, UNIT: tl.constexpr,
    MERGE_ROWS: tl.constexpr, MERGE_WIDE: tl.constexpr, ARRIVE_CHUNK: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, HAS_LEFTPAD: tl.constexpr, HAS_MASK: tl.constexpr, SCALE_KIND: tl.constexpr,
    PLANNED: tl.constexpr,
    RETURN_LSE: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, USE_PDL: tl.constexpr,
    USE_TMA: tl.constexpr, ROPE_APART: tl.constexpr,
):
    """MLA decode over a persistent grid.

    Q (batch, Q_LEN, q_heads, DV + DR) by strides; KV (batch, capacity, 1, DV + DR) by strides (row
    stride stride_kn), or pages (num_pages, PAGE_SIZE, 1, DV + DR) with BlockTable (batch,
    max_pages) when PAGE_SIZE > 0. ROPE_APART: the rope columns are KR's (same rows, by
    stride_rb / stride_rn; KV then holds DV columns), else KV's columns DV on. USE_TMA: KVDesc and
    KRDesc describe KV's rows as a 2-D tensor (``_mla_attend_tma``), else they are unused. Out
    (batch, Q_LEN, q_heads, DV); Lse (batch, q_heads, Q_LEN) float32; SeqLens and LeftPad (batch,)
    int32 (HAS_SEQLENS, HAS_LEFTPAD: each request's live keys are cache positions [leftpad,
    seqlen), clamped as in decode); KScale an fp8 cache's float32 scale of SCALE_KIND: (1,),
    (batch, 1) or per token (packed like the cache's rows). ``blocks`` = q_heads / GROUP blocks
    of Q_LEN x GROUP rows per request are the partition's heads. ``scale`` is the softmax scale
    times log2(e). HAS_MASK: bottom-right causal rows (Q_LEN > 1). Units of UNIT tokens are
    dealt: TILE, or SPLIT (batch-invariant mode, as in ``lean_decode_kernel``). Workspace as
    ``lean_decode_kernel``'s, with DV_PAD columns.
    """
    if USE_PDL:
        gdc_wait()  # q, the cache and the plan may come from the kernel before
    pid = tl.program_id(0)
    if PLANNED:
        total, programs, start, end, b, h, t = _read_plan_row(Plan, pid)
    else:
        total, programs, start, end, b, h, t = _share_of(
            SeqLens, LeftPad, batch, blocks, capacity, 0, pid, tl.num_programs(0),
            HAS_SEQLENS, HAS_LEFTPAD, Q_LEN, False, UNIT, TARGET_SHARE, BLOCK_B,
        )
    if pid >= programs:
        return

    rows = tl.arange(0, ROWS)
    real = rows < Q_LEN * GROUP
    q_rows = (rows // GROUP) * stride_qt + (rows % GROUP) * stride_qh

    g = start
    while g < end:
        first, length, _, live = _live_range(SeqLens, LeftPad, b, b >= 0, capacity, 0, HAS_SEQLENS, HAS_LEFTPAD,
                                             Q_LEN, False)
        n_units = _num_tiles(length, UNIT)
        t_end = tl.minimum(n_units.to(tl.int64), t + (end - g)).to(tl.int32)
        q_l, q_r, head_scale, v_scale = _mla_load_q(Q, KScale, b, h, q_rows, real, stride_qb, stride_qh, scale,
                                                    GROUP, ROWS, DV, DV_PAD, DR, DR_PAD, SCALE_KIND, DOT_DTYPE)
        if SPLIT > 0:
            # Each split alone, merged in split order: its bits do not depend on the program.
            # int32 like the tile indices (int64 ``capacity`` makes ``length`` int64; the host
            # bounds every tile count below 2**31)
            n_tiles = _num_tiles(length, TILE).to(tl.int32)
            for u in range(t, t_end):
                acc, m_i, l_i = _mla_tiles(
                    q_l, q_r, KV, KR, KVDesc, KRDesc, BlockTable, KScale, b, first, length, live,
                    u * (SPLIT // TILE), tl.minimum((u + 1) * (SPLIT // TILE), n_tiles), head_scale, num_pages,
                    capacity, stride_kb, stride_kn, stride_rb, stride_rn, stride_btb,
                    GROUP, Q_LEN, ROWS, DV, DV_PAD, DR, DR_PAD, TILE, PAGE_SIZE, HAS_MASK, SCALE_KIND, DOT_DTYPE,
                    USE_TMA, ROPE_APART,
                )
                if n_units == 1:
                    _write_output(Out, Lse, Lse, b, h, acc, m_i, l_i, v_scale,
                                  stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                                  GROUP, Q_LEN, ROWS, DV, DV_PAD, RETURN_LSE, False)
                else:
                    _arrive_and_merge(
                        WsAcc, WsStats, Tickets, ChunkTickets, Out, Lse, Lse, acc, m_i, l_i, v_scale,
                        b, h, pid, u, g, start, t, n_units, total, programs,
                        stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                        GROUP, Q_LEN, ROWS, MERGE_ROWS, DV, DV_PAD, MERGE_WIDE, ARRIVE_CHUNK, RETURN_LSE,
                        False, True, Tickets, False,
                    )
        else:
            acc, m_i, l_i = _mla_tiles(
                q_l, q_r, KV, KR, KVDesc, KRDesc, BlockTable, KScale, b, first, length, live, t, t_end, head_scale,
                num_pages, capacity, stride_kb, stride_kn, stride_rb, stride_rn, stride_btb,
                GROUP, Q_LEN, ROWS, DV, DV_PAD, DR, DR_PAD, TILE, PAGE_SIZE, HAS_MASK, SCALE_KIND, DOT_DTYPE, USE_TMA,
                ROPE_APART,
            )
            if USE_PDL:
                # As in decode: small calls let the next kernel launch once every program has
                # streamed its last tile.
                if (g + (t_end - t) >= end) & (total <= 8 * tl.num_programs(0)):
                    gdc_launch_dependents()
            if (t == 0) & (t_end == n_units):
                _write_output(Out, Lse, Lse, b, h, acc, m_i, l_i, v_scale,
                              stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                              GROUP, Q_LEN, ROWS, DV, DV_PAD, RETURN_LSE, False)
            else:
                _arrive_and_merge(
                    WsAcc, WsStats, Tickets, ChunkTickets, Out, Lse, Lse, acc, m_i, l_i, v_scale,
                    b, h, pid, 0, g, start, t, n_units, total, programs,
                    stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
                    GROUP, Q_LEN, ROWS, MERGE_ROWS, DV, DV_PAD, MERGE_WIDE, ARRIVE_CHUNK, RETURN_LSE,
                    False, False, Tickets, False,
                )

        g += (t_end - t).to(tl.int64)
        t = 0
        h += 1
        if h == blocks:
            h = 0
            b += 1


@triton.jit
def _partial_cols(
    WsAcc, WsStats, slot, valid, col0,
    ROWS: tl.constexpr, DV_PAD: tl.constexpr, COLS: tl.constexpr,
):
    """Columns [col0, col0 + COLS) of the partial (acc, m, l) in workspace slot ``slot``; an
    empty partial where ``valid`` is false. Loaded past L1 (``.cg``): a chunk's sum comes from
    another program of the same launch, and L1 is not coherent between SMs."""
    rows = tl.arange(0, ROWS)
    live = (tl.zeros((ROWS,), dtype=tl.int32) + valid.to(tl.int32)) != 0  # a block mask, not a scalar
    slot = slot.to(tl.int64)
    m = tl.load(WsStats + slot * (2 * ROWS) + rows, mask=live, other=float("-inf"), cache_modifier=".cg")
    l = tl.load(WsStats + slot * (2 * ROWS) + ROWS + rows, mask=live, other=0.0, cache_modifier=".cg")
    ptrs = WsAcc + slot * (ROWS * DV_PAD) + rows[:, None] * DV_PAD + col0 + tl.arange(0, COLS)[None, :]
    return tl.load(ptrs, mask=live[:, None], other=0.0, cache_modifier=".cg"), m, l


@triton.jit
def _merge_cols(
    WsAcc, WsStats, k_first, k_last, first, last, head_first, total, programs, col0,
    CHUNK_SUMS: tl.constexpr, ROWS: tl.constexpr, DV_PAD: tl.constexpr, COLS: tl.constexpr,
    ARRIVE_CHUNK: tl.constexpr,
):
    """Merge, in order, columns [col0, col0 + COLS) of the partials of a block's members
    k_first..k_last (programs; their slots by ``_partial_slot``), or with CHUNK_SUMS of its
    chunks k_first..k_last (chunk k's sum in slot 2 G + L, L its last member, G the grid), four
    at a time."""
    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, COLS), dtype=tl.float32)
    first_odd = _first_odd(first, head_first, total, programs)
    for k in range(k_first, k_last + 1, 4):
        if CHUNK_SUMS:
            s0 = 2 * tl.num_programs(0) + tl.minimum(first + k * ARRIVE_CHUNK + ARRIVE_CHUNK - 1, last)
            s1 = 2 * tl.num_programs(0) + tl.minimum(first + (k + 1) * ARRIVE_CHUNK + ARRIVE_CHUNK - 1, last)
            s2 = 2 * tl.num_programs(0) + tl.minimum(first + (k + 2) * ARRIVE_CHUNK + ARRIVE_CHUNK - 1, last)
            s3 = 2 * tl.num_programs(0) + tl.minimum(first + (k + 3) * ARRIVE_CHUNK + ARRIVE_CHUNK - 1, last)
        else:
            s0 = _partial_slot(k, first, first_odd)
            s1 = _partial_slot(k + 1, first, first_odd)
            s2 = _partial_slot(k + 2, first, first_odd)
            s3 = _partial_slot(k + 3, first, first_odd)
        a0, m0, l0 = _partial_cols(WsAcc, WsStats, s0, k <= k_last, col0, ROWS, DV_PAD, COLS)
        a1, m1, l1 = _partial_cols(WsAcc, WsStats, s1, k + 1 <= k_last, col0, ROWS, DV_PAD, COLS)
        a2, m2, l2 = _partial_cols(WsAcc, WsStats, s2, k + 2 <= k_last, col0, ROWS, DV_PAD, COLS)
        a3, m3, l3 = _partial_cols(WsAcc, WsStats, s3, k + 3 <= k_last, col0, ROWS, DV_PAD, COLS)
        acc, m_i, l_i = _combine4(acc, m_i, l_i, a0, m0, l0, a1, m1, l1, a2, m2, l2, a3, m3, l3)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["capacity"])
def mla_merge_kernel(
    Out, Lse, SeqLens, LeftPad, Plan, WsAcc, WsStats, Tickets,
    stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
    capacity,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, MERGE_ROWS: tl.constexpr, DV_PAD: tl.constexpr, TILE: tl.constexpr,
    COLS: tl.constexpr, ARRIVE_CHUNK: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    RETURN_LSE: tl.constexpr, USE_PDL: tl.constexpr,
):
    """The merge of the blocks that ``kernels/mla_gluon.py``'s shares cut, one launch after it:
    every partial is in its slot before it starts, and no program waits for another.

    Grid (plan rows G, DV_PAD / COLS); program (p, c) merges columns [c COLS, (c + 1) COLS), so a
    wide block (64 rows x 512 values a partial) is merged by DV_PAD / COLS programs at once, each
    on its own. A cut block's members (the programs whose shares cover its tiles, in order) are
    cut into chunks of ARRIVE_CHUNK, merged by a two-level tree, as decode's
    ``_arrive_and_merge`` but with the first level known in advance. When p's share starts inside
    a block and p is the last member of a chunk, it merges the chunk's partials in member order:
    into Out (and the LSE) when the chunk is the whole block, else into slot 2 G + p (the
    workspace's third slot per program; a program ends at most one chunk), then counts the chunk
    on the block's ticket for column chunk c (Tickets[F x DV_PAD / COLS + c], F the block's first
    member: (G x DV_PAD / COLS,) int32, zero before and after the launch). The chunk that draws
    the last ticket puts it back to zero and merges the chunks' sums in order into Out. Out, Lse,
    SeqLens, LeftPad, Plan and the workspace as in ``mla_decode_kernel``."""
    if USE_PDL:
        gdc_wait()  # the partials come from the kernel before
    pid = tl.program_id(0)
    col0 = tl.program_id(1) * COLS
    total, programs, start, end, b, h, t = _read_plan_row(Plan, pid)
    if (pid < programs) & (t > 0):
        _, length, _, _ = _live_range(SeqLens, LeftPad, b, b >= 0, capacity, 0, HAS_SEQLENS, HAS_LEFTPAD, Q_LEN,
                                      False)
        head_first = start - t
        n = _num_tiles(length, TILE)
        first, last = _head_members(head_first, n, total, programs)
        chunk_first = first + (pid - first) // ARRIVE_CHUNK * ARRIVE_CHUNK
        if pid == tl.minimum(chunk_first + ARRIVE_CHUNK - 1, last):
            acc, m_i, l_i = _merge_cols(WsAcc, WsStats, chunk_first, pid, first, last, head_first, total, programs,
                                        col0, False, MERGE_ROWS, DV_PAD, COLS, ARRIVE_CHUNK)
            if last - first < ARRIVE_CHUNK:
                _write_cols(Out, Lse, Lse, b, h, acc, m_i, l_i, 1.0, col0, stride_ob, stride_ot, stride_oh, stride_lb,
                            stride_lh, stride_lt, GROUP, Q_LEN, MERGE_ROWS, COLS, RETURN_LSE, False)
            else:
                # Every column chunk's program stores the same m and l: the one that reads them
                # below sees its own column's store (ordered by its ticket) or an equal one.
                _store_cols(WsAcc, WsStats, 2 * tl.num_programs(0) + pid, acc, m_i, l_i, col0, MERGE_ROWS, DV_PAD,
                            COLS)
                ticket = Tickets + first * tl.num_programs(1) + tl.program_id(1)
                # Every thread's stores of the chunk's sum are ordered before the ticket (release);
                # the last chunk's loads after it (acquire).
                tl.debug_barrier()
                arrived = tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu")
                if arrived == (last - first) // ARRIVE_CHUNK:
                    tl.atomic_xchg(ticket, 0, sem="relaxed", scope="gpu")  # zero for the next launch
                    acc, m_i, l_i = _merge_cols(WsAcc, WsStats, 0, (last - first) // ARRIVE_CHUNK, first, last,
                                                head_first, total, programs, col0, True, MERGE_ROWS, DV_PAD, COLS,
                                                ARRIVE_CHUNK)
                    _write_cols(Out, Lse, Lse, b, h, acc, m_i, l_i, 1.0, col0, stride_ob, stride_ot, stride_oh, stride_lb,
                                stride_lh, stride_lt, GROUP, Q_LEN, MERGE_ROWS, COLS, RETURN_LSE, False)


@triton.jit
def _store_cols(WsAcc, WsStats, slot, acc, m_i, l_i, col0, ROWS: tl.constexpr, DV_PAD: tl.constexpr,
                COLS: tl.constexpr):
    """Columns [col0, col0 + COLS) of (acc, m, l) into workspace slot ``slot`` (every column's
    program writes the same m and l)."""
    rows = tl.arange(0, ROWS)
    slot = slot.to(tl.int64)
    tl.store(WsAcc + slot * (ROWS * DV_PAD) + rows[:, None] * DV_PAD + col0 + tl.arange(0, COLS)[None, :], acc)
    tl.store(WsStats + slot * (2 * ROWS) + rows, m_i)
    tl.store(WsStats + slot * (2 * ROWS) + ROWS + rows, l_i)
