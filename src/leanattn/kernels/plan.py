"""The stream-K partition on the device: which tiles each program takes, from the live lengths.

Both the one-shot kernel (which locates its own share) and the plan kernel (which writes every
program's share once per step, for the per-layer runs to read) use ``_locate_share``, so the two
paths cut the work identically and give bitwise-equal results. ``leanattn.schedule`` is the
plain-Python specification of the same arithmetic.
"""

from __future__ import annotations

import triton
import triton.language as tl

# int32 fields of one program's row in the plan buffer (see lean_plan_kernel).
PLAN_FIELDS = tl.constexpr(8)
# Sequences the share-locating loop reads per step.
BLOCK_B = 128


@triton.jit
def _live_range(
    SeqLens, LeftPad, idx, mask, capacity, window_left,
    HAS_SEQLENS: tl.constexpr, HAS_LEFTPAD: tl.constexpr, Q_LEN: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    """The cache range the sequences ``idx`` attend over (masked lanes give empty ranges).

    Returns (first, length, lo, live): the tiles cover cache positions ``[first, first + length)``;
    the live keys are ``live`` positions from ``first - lo`` (keys are numbered from there), so
    the range skips the ``lo`` keys no query's window reaches. The live keys are cache positions
    ``[start, end)`` with ``start = clamp(leftpad, 0, capacity)`` and ``end = clamp(seqlen, start,
    capacity)`` (flash-attn's ``cache_leftpad``); the queries are the last Q_LEN of them, and the
    earliest one, at key ``live - Q_LEN``, sees back to key ``live - Q_LEN - window_left``."""
    if HAS_LEFTPAD:
        start = tl.minimum(tl.maximum(tl.load(LeftPad + idx, mask=mask, other=0), 0), capacity)
    else:
        start = tl.zeros_like(idx)
    if HAS_SEQLENS:
        end = tl.minimum(tl.maximum(tl.load(SeqLens + idx, mask=mask, other=0), start), capacity)
    else:
        end = tl.zeros_like(idx) + capacity
    live = tl.where(mask, end - start, 0)
    if HAS_WINDOW:
        lo = tl.minimum(tl.maximum(live - Q_LEN - window_left, 0), live)
    else:
        lo = tl.zeros_like(live)
    return start + lo, live - lo, lo, live


@triton.jit
def _num_tiles(length, TILE: tl.constexpr):
    """Tiles of one head of live length ``length`` (at least one, so empty heads are written)."""
    return tl.maximum((length + TILE - 1) // TILE, 1)


@triton.jit
def _locate_share(
    SeqLens, LeftPad, batch, kv_heads, capacity, window_left, pid, num_programs,
    HAS_SEQLENS: tl.constexpr, HAS_LEFTPAD: tl.constexpr, Q_LEN: tl.constexpr, HAS_WINDOW: tl.constexpr,
    TILE: tl.constexpr, TARGET_SHARE: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Total tile count, effective program count, this program's share and where it starts.

    Returns (total, programs, start, end, batch index, tiles of the batches before it).
    """
    offs = tl.arange(0, BLOCK_B)
    if HAS_SEQLENS or HAS_LEFTPAD or HAS_WINDOW:
        total_per_head = tl.zeros((), dtype=tl.int64)
        n_min = tl.full((), 2**31 - 1, dtype=tl.int32)
        n_max = tl.zeros((), dtype=tl.int32)
        for b0 in range(0, batch, BLOCK_B):
            mask = b0 + offs < batch
            _, length, _, _ = _live_range(SeqLens, LeftPad, b0 + offs, mask, capacity, window_left,
                                          HAS_SEQLENS, HAS_LEFTPAD, Q_LEN, HAS_WINDOW)
            # int32 whatever type ``capacity`` came in (the host bounds every tile count below 2**31)
            n = _num_tiles(length, TILE).to(tl.int32)
            total_per_head += tl.sum(tl.where(mask, n, 0).to(tl.int64), axis=0)
            n_min = tl.minimum(n_min, tl.min(tl.where(mask, n, 2**31 - 1), axis=0))
            n_max = tl.maximum(n_max, tl.max(tl.where(mask, n, 0), axis=0))
        uniform = n_min == n_max
    else:
        total_per_head = batch.to(tl.int64) * _num_tiles(capacity, TILE)
        uniform = total_per_head >= 0  # every head has the full capacity
    total = total_per_head * kv_heads
    # Small problems use fewer programs: the fewest whose shares stay within TARGET_SHARE tiles.
    programs = tl.minimum((total + TARGET_SHARE - 1) // TARGET_SHARE, num_programs)
    # Heads of equal length: a grid of k * heads or heads / m programs puts every head boundary
    # on a share boundary, so programs stream matching token ranges of neighbouring heads together
    # (one cache row holds every kv head of a token). Taken when it keeps >= 7/8 of the grid.
    heads = batch.to(tl.int64) * kv_heads
    per_program = (heads + programs - 1) // tl.maximum(programs, 1)
    aligned = tl.where(heads <= programs, programs // heads * heads,
                       tl.where(heads % per_program == 0, heads // per_program, 0))
    programs = tl.where(uniform & (8 * aligned >= 7 * programs), aligned, programs)
    start = pid * total // programs
    end = (pid + 1) * total // programs

    # The sequence holding tile `start`: count the sequences whose tiles all lie before it.
    if HAS_SEQLENS or HAS_LEFTPAD or HAS_WINDOW:
        seq = tl.zeros((), dtype=tl.int32)
        before = tl.zeros((), dtype=tl.int64)
        running = tl.zeros((), dtype=tl.int64)
        for b0 in range(0, batch, BLOCK_B):
            mask = b0 + offs < batch
            _, length, _, _ = _live_range(SeqLens, LeftPad, b0 + offs, mask, capacity, window_left,
                                          HAS_SEQLENS, HAS_LEFTPAD, Q_LEN, HAS_WINDOW)
            n = tl.where(mask, _num_tiles(length, TILE), 0).to(tl.int64)
            done = mask & ((tl.cumsum(n, axis=0) + running) * kv_heads <= start)
            seq += tl.sum(done.to(tl.int32), axis=0)
            before += tl.sum(tl.where(done, n, 0), axis=0)
            running += tl.sum(n, axis=0)
    else:
        per_seq = _num_tiles(capacity, TILE).to(tl.int64) * kv_heads
        seq = (start // per_seq).to(tl.int32)
        before = seq.to(tl.int64) * (per_seq // kv_heads)
    return total, programs, start, end, seq, before


@triton.jit
def _share_of(
    SeqLens, LeftPad, batch, kv_heads, capacity, window_left, pid, num_programs,
    HAS_SEQLENS: tl.constexpr, HAS_LEFTPAD: tl.constexpr, Q_LEN: tl.constexpr, HAS_WINDOW: tl.constexpr,
    TILE: tl.constexpr, TARGET_SHARE: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Program ``pid``'s share as (total, programs, start, end, b, h, t): tiles ``[start, end)``
    of ``total`` among ``programs``, starting at tile ``t`` of kv head ``h`` of sequence ``b``."""
    total, programs, start, end, b, before = _locate_share(
        SeqLens, LeftPad, batch, kv_heads, capacity, window_left, pid, num_programs,
        HAS_SEQLENS, HAS_LEFTPAD, Q_LEN, HAS_WINDOW, TILE, TARGET_SHARE, BLOCK_B,
    )
    b_safe = tl.minimum(b, batch - 1)  # programs past the work (pid >= programs) point past the batch
    _, length, _, _ = _live_range(SeqLens, LeftPad, b_safe, b_safe >= 0, capacity, window_left,
                                  HAS_SEQLENS, HAS_LEFTPAD, Q_LEN, HAS_WINDOW)
    n_tiles = _num_tiles(length, TILE)
    offset = start - before * kv_heads
    h = (offset // n_tiles).to(tl.int32)
    t = (offset % n_tiles).to(tl.int32)
    return total, programs, start, end, b, h, t


@triton.jit
def _plan_row(total, programs, start, end, b, h, t):
    """A share as its int32 plan row (PLAN_FIELDS,): (total, programs, start, end, b, h, t, 0)."""
    fields = tl.arange(0, PLAN_FIELDS)
    row = tl.where(fields == 0, total.to(tl.int32), 0)
    row = tl.where(fields == 1, programs.to(tl.int32), row)
    row = tl.where(fields == 2, start.to(tl.int32), row)
    row = tl.where(fields == 3, end.to(tl.int32), row)
    row = tl.where(fields == 4, b, row)
    row = tl.where(fields == 5, h, row)
    return tl.where(fields == 6, t, row)


@triton.jit
def _read_plan_row(Plan, pid):
    """Program ``pid``'s share from its plan row: (total, programs, start, end, b, h, t)."""
    fields = tl.arange(0, PLAN_FIELDS)
    row = tl.load(Plan + pid * PLAN_FIELDS + fields)
    total = tl.sum(tl.where(fields == 0, row, 0), axis=0).to(tl.int64)
    programs = tl.sum(tl.where(fields == 1, row, 0), axis=0)
    start = tl.sum(tl.where(fields == 2, row, 0), axis=0).to(tl.int64)
    end = tl.sum(tl.where(fields == 3, row, 0), axis=0).to(tl.int64)
    b = tl.sum(tl.where(fields == 4, row, 0), axis=0)
    h = tl.sum(tl.where(fields == 5, row, 0), axis=0)
    t = tl.sum(tl.where(fields == 6, row, 0), axis=0)
    return total, programs, start, end, b, h, t


# Tickets a plan program zeroes per step (see lean_plan_kernel's ZERO_TICKETS).
ZERO_BLOCK = tl.constexpr(1024)


@triton.jit(do_not_specialize=["batch", "kv_heads", "capacity", "window_left", "num_tickets"])
def lean_plan_kernel(
    SeqLens, LeftPad, Plan, Tickets, batch, kv_heads, capacity, window_left, num_tickets,
    HAS_SEQLENS: tl.constexpr, HAS_LEFTPAD: tl.constexpr, Q_LEN: tl.constexpr, HAS_WINDOW: tl.constexpr,
    TILE: tl.constexpr, TARGET_SHARE: tl.constexpr, BLOCK_B: tl.constexpr, USE_PDL: tl.constexpr,
    ZERO_TICKETS: tl.constexpr,
):
    """Write program ``pid``'s share to ``Plan[pid]``: int32 (total, programs, start, end, b, h, t, 0).

    One program per row of the persistent grid the runs use (grid = rows of Plan). ZERO_TICKETS:
    also set the int32 ``Tickets[:num_tickets]`` (those the plan's runs draw) to zero, the grid
    sharing them out: a run on lengths changed since its plan can leave tickets raised, and
    each plan puts them right. After ``gdc_wait`` the kernels before have finished (no run still
    draws them), and the runs read them only after their own wait for this kernel."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # the lengths may come from the kernel before
    pid = tl.program_id(0)
    if ZERO_TICKETS:
        offs = tl.arange(0, ZERO_BLOCK)
        for first in range(pid * ZERO_BLOCK, num_tickets, tl.num_programs(0) * ZERO_BLOCK):
            tl.store(Tickets + first + offs, tl.zeros((ZERO_BLOCK,), dtype=tl.int32), mask=first + offs < num_tickets)
    total, programs, start, end, b, h, t = _share_of(
        SeqLens, LeftPad, batch, kv_heads, capacity, window_left, pid, tl.num_programs(0),
        HAS_SEQLENS, HAS_LEFTPAD, Q_LEN, HAS_WINDOW, TILE, TARGET_SHARE, BLOCK_B,
    )
    fields = tl.arange(0, PLAN_FIELDS)
    tl.store(Plan + pid * PLAN_FIELDS + fields, _plan_row(total, programs, start, end, b, h, t))
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
