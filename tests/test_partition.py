"""The device partition (kernels/plan.py) against its plain-Python specification (leanattn.schedule).

``leanattn.plan_decode`` returns the plan kernel's rows, int32 (total, programs, start, end, b, h,
t, 0) per program of the grid. Every row of a program that runs must equal the share
``schedule.plan`` gives it for the batch's live lengths: its tile range, and the (sequence, kv head,
tile) its first segment starts at. ``schedule.plan`` knows nothing of cache_leftpad, q_len or
windows: it takes each sequence's tile-covered length, which ``covered_keys`` below derives
independently (the live keys from the first one any query's window reaches).

Cost under the interpreter: the plan kernel runs one program at a time, ~5-20 ms each, so grids
past a few dozen programs (264, 1024) are checked on sampled programs by ``_sampled_shares``, a
test kernel that calls the same ``_share_of`` with the grid size given as an argument.
"""

from __future__ import annotations

import random

import pytest
import torch
import triton
import triton.language as tl

import leanattn
from leanattn import choose_config
from leanattn._testing import BLOCK_B, PLAN_FIELDS, launch_plan, live_range as _live_range, plan_row
from leanattn._testing import share_of as _share_of
from leanattn._testing import window_bounds
from leanattn.schedule import effective_programs, share_bounds
from leanattn.schedule import plan as spec_plan

from _util import DEVICE

HEAD_DIM = 64
KV_DTYPE = torch.bfloat16


# ---------------------------------------------------------------------------------------------
# The specification side.


def covered_keys(seqlens, leftpad, batch, capacity, q_len, window_left):
    """Per sequence, (first cache position, length) of the keys the tiles must cover.

    The live keys are cache positions [start, end), start = clamp(leftpad, 0, capacity), end =
    clamp(seqlen, start, capacity) (flash-attn's cache_leftpad; no seqlens: end = capacity). The
    queries are the last q_len live keys; query key p sees back to key p - window_left. The tiles
    start at the earliest live key some query's window reaches (window_left None: key 0)."""
    out = []
    for i in range(batch):
        start = min(max(leftpad[i], 0), capacity) if leftpad is not None else 0
        end = min(max(seqlens[i], start), capacity) if seqlens is not None else capacity
        live = end - start
        first_key = 0
        if window_left is not None and live > 0:
            reached = [p - window_left for p in range(live - q_len, live)]  # each query's earliest key
            first_key = max(0, min(reached))
            assert first_key < live  # the last query always sees itself
        out.append((start + first_key, live - first_key))
    return out


def expected_rows(lengths, kv_heads, tile, grid, target_share):
    """The plan rows ``schedule.plan`` implies, and how many programs run. Rows of programs past
    those are left zero here (see ``check_rows``)."""
    s = spec_plan(lengths, kv_heads, tile, grid, target_share)
    rows = torch.zeros(grid, PLAN_FIELDS.value, dtype=torch.int32)
    first_segment = {}
    for seg in s.segments:
        first_segment.setdefault(seg.program, seg)
    for p in range(s.num_programs):
        start, end = share_bounds(p, s.total_tiles, s.num_programs)
        seg = first_segment[p]  # every program that runs has at least one tile
        rows[p] = torch.tensor([s.total_tiles, s.num_programs, start, end, seg.batch, seg.kv_head, seg.tile_start, 0])
    return rows, s


def check_rows(got, lengths, kv_heads, tile, grid, target_share, pids=None, what=""):
    """``got``: the kernel's rows for programs ``pids`` (default: all of the grid)."""
    want, s = expected_rows(lengths, kv_heads, tile, grid, target_share)
    pids = list(range(grid)) if pids is None else pids
    got = got.cpu()
    assert got.shape == (len(pids), PLAN_FIELDS.value), what
    ctx = f"{what} lengths={list(lengths)} kv_heads={kv_heads} tile={tile} grid={grid} target_share={target_share}"
    for i, p in enumerate(pids):
        row = got[i].tolist()
        if p < s.num_programs:
            assert row == want[p].tolist(), f"program {p}: kernel {row}, schedule {want[p].tolist()}; {ctx}"
        else:
            # A program past the work exits at once (it reads only total and programs); its share
            # lies past the last tile.
            start, end = share_bounds(p, s.total_tiles, s.num_programs) if s.num_programs else (0, 0)
            assert row[:4] == [s.total_tiles, s.num_programs, start, end] and row[7] == 0, \
                f"idle program {p}: kernel {row}; {ctx}"
            assert start >= s.total_tiles, ctx
    return s


def int_tensor(values):
    return None if values is None else torch.tensor(values, dtype=torch.int32, device=DEVICE)


def plan_via_api(seqlens, leftpad, batch, capacity, kv_heads, q_len, window_left, grid, group=2):
    """``leanattn.plan_decode``'s rows and the launch config it used."""
    plan = leanattn.plan_decode(
        int_tensor(seqlens), capacity, q_heads=kv_heads * group, kv_heads=kv_heads, head_dim=HEAD_DIM,
        kv_dtype=KV_DTYPE, batch=batch, cache_leftpad=int_tensor(leftpad), q_len=q_len,
        window_size=(window_left if window_left is not None else -1, -1), num_programs=grid, device=DEVICE,
    )
    return plan, choose_config(HEAD_DIM, KV_DTYPE, q_len * group)


# ---------------------------------------------------------------------------------------------
# Test kernels: the product's device functions, on chosen programs.


@triton.jit(do_not_specialize=["batch", "kv_heads", "capacity", "window_left", "num_programs"])  # as the plan kernel
def _sampled_shares(
    SeqLens, LeftPad, Pids, Out, batch, kv_heads, capacity, window_left, num_programs,
    HAS_SEQLENS: tl.constexpr, HAS_LEFTPAD: tl.constexpr, Q_LEN: tl.constexpr, HAS_WINDOW: tl.constexpr,
    TILE: tl.constexpr, TARGET_SHARE: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Out[i] = the plan row of program Pids[i] of a grid of num_programs (as lean_plan_kernel)."""
    i = tl.program_id(0)
    pid = tl.load(Pids + i)
    total, programs, start, end, b, h, t = _share_of(
        SeqLens, LeftPad, batch, kv_heads, capacity, window_left, pid, num_programs,
        HAS_SEQLENS, HAS_LEFTPAD, Q_LEN, HAS_WINDOW, TILE, TARGET_SHARE, BLOCK_B,
    )
    tl.store(Out + i * PLAN_FIELDS + tl.arange(0, PLAN_FIELDS), plan_row(total, programs, start, end, b, h, t))


def sampled_rows(seqlens, leftpad, batch, capacity, kv_heads, q_len, window_left, grid, tile, target_share, pids):
    out = torch.full((len(pids), PLAN_FIELDS.value), -7, dtype=torch.int32, device=DEVICE)
    sl, lp = int_tensor(seqlens), int_tensor(leftpad)
    pid_t = int_tensor(pids)
    _sampled_shares[(len(pids),)](
        sl if sl is not None else out, lp if lp is not None else out, pid_t, out,
        batch, kv_heads, capacity, window_left if window_left is not None else 2**30, grid,
        HAS_SEQLENS=sl is not None, HAS_LEFTPAD=lp is not None, Q_LEN=q_len, HAS_WINDOW=window_left is not None,
        TILE=tile, TARGET_SHARE=target_share, BLOCK_B=BLOCK_B,
    )
    return out


@triton.jit(do_not_specialize=["batch", "capacity", "window_left"])
def _live_ranges(
    SeqLens, LeftPad, Out, batch, capacity, window_left,
    HAS_SEQLENS: tl.constexpr, HAS_LEFTPAD: tl.constexpr, Q_LEN: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Out[i] = _live_range of sequence i: (first, length, lo, live)."""
    idx = tl.arange(0, BLOCK)
    mask = idx < batch
    first, length, lo, live = _live_range(SeqLens, LeftPad, idx, mask, capacity, window_left,
                                          HAS_SEQLENS, HAS_LEFTPAD, Q_LEN, HAS_WINDOW)
    tl.store(Out + idx * 4, first, mask=mask)
    tl.store(Out + idx * 4 + 1, length, mask=mask)
    tl.store(Out + idx * 4 + 2, lo, mask=mask)
    tl.store(Out + idx * 4 + 3, live, mask=mask)


# ---------------------------------------------------------------------------------------------
# Random ragged batches.

SMALL_GRIDS = (1, 7, 9, 16, 17, 40)


def random_batch(rng: random.Random, tile: int):
    """(seqlens, leftpad, batch, capacity, kv_heads, q_len, window_left): lengths 0, capacity,
    tile multiples +-1 and anything between; windows that end on tile boundaries (where one key
    more or less changes the tile count)."""
    capacity = rng.choice([1, tile - 1, tile, 3 * tile + 1, 5 * tile, 257])
    batch = rng.randint(1, 6)
    kv_heads = rng.choice([1, 2, 4])
    q_len = rng.choice([1, 1, 2, 5])

    def length():
        k = rng.randint(0, capacity // tile)
        return min(max(rng.choice([0, capacity, rng.randint(0, capacity), k * tile - 1, k * tile, k * tile + 1]), 0),
                   capacity)

    seqlens = [length() for _ in range(batch)] if rng.random() < 0.8 else None
    leftpad = None
    if rng.random() < 0.4:
        ends = seqlens if seqlens is not None else [capacity] * batch
        leftpad = [rng.choice([0, e, rng.randint(0, e)]) for e in ends]
    window_left = None
    if rng.random() < 0.5:
        window_left = rng.choice([0, 1, tile - q_len, 2 * tile - q_len, rng.randint(0, 3 * tile)])
        window_left = max(window_left, 0)
    return seqlens, leftpad, batch, capacity, kv_heads, q_len, window_left


@pytest.mark.parametrize("seed", range(16))
def test_plan_decode_matches_schedule(seed):
    """plan_decode's rows equal schedule.plan's shares for random ragged batches and small grids."""
    rng = random.Random(seed)
    tile = choose_config(HEAD_DIM, KV_DTYPE, 2).tile
    seqlens, leftpad, batch, capacity, kv_heads, q_len, window_left = random_batch(rng, tile)
    grid = SMALL_GRIDS[seed % len(SMALL_GRIDS)]
    plan, config = plan_via_api(seqlens, leftpad, batch, capacity, kv_heads, q_len, window_left, grid)
    lengths = [n for _, n in covered_keys(seqlens, leftpad, batch, capacity, q_len, window_left)]
    check_rows(plan, lengths, kv_heads, config.tile, grid, config.target_share, what="plan_decode")


@pytest.mark.parametrize("target_share,tile", [(2, 16), (3, 64), (4, 32), (7, 16), (50, 64)])
def test_target_shares_match_schedule(target_share, tile):
    """Target shares other than the interpreter's config (1), through the product's plan launcher:
    small problems take the fewest programs whose shares stay within target_share tiles."""
    rng = random.Random(target_share * 1000 + tile)
    for grid in (7, 16):
        seqlens, leftpad, batch, capacity, kv_heads, q_len, window_left = random_batch(rng, tile)
        left, _, has_window, _ = window_bounds(True, (window_left if window_left is not None else -1, -1), q_len)
        plan = torch.zeros(grid, PLAN_FIELDS.value, dtype=torch.int32, device=DEVICE)
        launch_plan(plan, grid, int_tensor(seqlens), int_tensor(leftpad), batch, kv_heads, capacity, q_len, left,
                    has_window, tile, target_share, False, tickets=None)
        lengths = [n for _, n in covered_keys(seqlens, leftpad, batch, capacity, q_len, window_left)]
        check_rows(plan, lengths, kv_heads, tile, grid, target_share, what="launch_plan")
    # The grid is chosen by the target share here, not capped by the grid or the tile count.
    lens = [3 * tile, 9 * tile - 1, 1]
    plan = torch.zeros(16, PLAN_FIELDS.value, dtype=torch.int32, device=DEVICE)
    launch_plan(plan, 16, int_tensor(lens), None, 3, 2, 9 * tile, 1, 2**30, False, tile, target_share, False, tickets=None)
    s = check_rows(plan, lens, 2, tile, 16, target_share, what="launch_plan")
    assert s.num_programs == -(-s.total_tiles // target_share) < min(16, s.total_tiles)


@pytest.mark.parametrize("kv_heads,batch,grid,aligned", [
    (4, 2, 9, True),  # 8 of 9 programs: one head each
    (4, 4, 17, True),  # 16 of 17
    (4, 4, 9, True),  # 16 heads over 9 programs: 8 programs of two heads each
    (8, 4, 17, True),  # 32 heads over 17: 16 of two heads each
    (1, 5, 16, True),  # 15 of 16: three programs a head
    (8, 1, 7, False),  # 4 of 7 is under 7/8
    (2, 3, 40, False),  # 30 tiles: 30 programs, already a multiple of 6 heads
])
@pytest.mark.parametrize("with_seqlens", [True, False])
def test_equal_heads_take_the_aligned_grid(kv_heads, batch, grid, aligned, with_seqlens):
    """Heads of equal tile counts: the grid becomes a multiple or divisor of the head count when
    that keeps >= 7/8 of it (both the ragged-lengths and the no-seqlens paths of the kernel)."""
    tile = choose_config(HEAD_DIM, KV_DTYPE, 2).tile
    capacity = 4 * tile + 3
    # Different lengths, equal tile counts: still uniform.
    seqlens = [capacity - i % 3 for i in range(batch)] if with_seqlens else None
    plan, config = plan_via_api(seqlens, None, batch, capacity, kv_heads, 1, None, grid)
    lengths = [n for _, n in covered_keys(seqlens, None, batch, capacity, 1, None)]
    s = check_rows(plan, lengths, kv_heads, config.tile, grid, config.target_share, what="aligned")
    if config.target_share == 1:  # the interpreter's config: the case is what it says
        unaligned = effective_programs(s.total_tiles, batch * kv_heads, False, grid, 1)
        assert (s.num_programs != unaligned) == aligned


@pytest.mark.parametrize("kv_heads,tiles,grid", [(4, [5, 3], 9), (4, [5, 4, 5, 3], 17), (4, [2, 1, 1, 3], 9)])
def test_ragged_heads_keep_the_grid(kv_heads, tiles, grid):
    """Heads of different tile counts never take the aligned grid, on grids where equal heads
    would (the head count divides 7/8 or more of the grid)."""
    tile = choose_config(HEAD_DIM, KV_DTYPE, 2).tile
    seqlens = [n * tile - 1 for n in tiles]
    batch = len(seqlens)
    plan, config = plan_via_api(seqlens, None, batch, max(seqlens), kv_heads, 1, None, grid)
    s = check_rows(plan, seqlens, kv_heads, config.tile, grid, config.target_share, what="ragged")
    if config.target_share == 1:  # the interpreter's config: equal heads would have taken 8 of 9, 16 of 17
        assert s.num_programs == grid != effective_programs(s.total_tiles, batch * kv_heads, True, grid, 1)


def test_empty_batch_and_empty_cache():
    plan, _ = plan_via_api([], None, 0, 100, 2, 1, None, 7)
    assert (plan == 0).all()  # nothing launched: no program has work
    plan, config = plan_via_api([0, 0, 0], [0, 0, 0], 3, 0, 2, 3, 4, 5)
    check_rows(plan, [0, 0, 0], 2, config.tile, 5, config.target_share, what="capacity 0")


@pytest.mark.parametrize("batch", [2, 0])
def test_plan_zeroes_the_tickets_it_is_given(batch):
    """launch_plan sets the tickets its runs draw to zero (in the plan kernel, its programs
    striding over them; with no sequences, on the host), and nothing past them: with 2 programs
    and 2 x ZERO_BLOCK + 5 tickets, program 0 goes round its loop twice, the second time over a
    masked last block."""
    from leanattn._testing import ZERO_BLOCK

    block = ZERO_BLOCK.value
    buffer = torch.full((2 * block + 13,), 7, dtype=torch.int32, device=DEVICE)
    tickets = buffer[: 2 * block + 5]
    plan = torch.zeros(2, PLAN_FIELDS.value, dtype=torch.int32, device=DEVICE)
    launch_plan(plan, 2, int_tensor([40, 3][:batch]), None, batch, 1, 64, 1, 2**30, False, 32, 4, False,
                tickets=tickets)
    assert (tickets == 0).all() and (buffer[tickets.numel():] == 7).all()


def test_plan_launches_apart_for_ints_past_32_bits(monkeypatch):
    """Triton types an int argument by its value (i32 or i64) even where it does not specialise
    on it, so a capacity of 2**31 must not reuse the launch compiled for 4096."""
    from leanattn import _plan

    monkeypatch.setattr(_plan, "_PLAN_HITS", {})
    plan = torch.zeros(2, PLAN_FIELDS.value, dtype=torch.int32, device=DEVICE)
    for capacity in (4096, 4097, 2**31):
        launch_plan(plan, 2, int_tensor([40]), None, 1, 1, capacity, 1, 2**30, False, 32, 4, False, tickets=None)
    assert len(_plan._PLAN_HITS) == 2


# ---------------------------------------------------------------------------------------------
# Large grids, and one head shared by more than 256 programs.


def spread_pids(grid, rng, count=24):
    """Programs 0-2, the last 3, around every power of two and 256, and random ones."""
    pids = {0, 1, 2, grid - 3, grid - 2, grid - 1}
    for p in (15, 16, 17, 127, 128, 255, 256, 257, 263, 511, 512):
        if p < grid:
            pids.add(p)
    while len(pids) < min(count, grid):
        pids.add(rng.randrange(grid))
    return sorted(pids)


def test_long_head_over_264_programs_full_plan():
    """One 128k-token sequence, one kv head, over the whole 264-program grid via plan_decode."""
    capacity = 131072
    plan, config = plan_via_api([capacity], None, 1, capacity, 1, 1, None, 264)
    s = check_rows(plan, [capacity], 1, config.tile, 264, config.target_share, what="128k")
    (segs,) = s.split_heads().values()
    assert len(segs) > 256


@pytest.mark.parametrize("grid", [264, 1024])
@pytest.mark.parametrize("seqlens,window_left,q_len", [
    (None, None, 1),  # the full-capacity path: no lengths read
    ([131072], None, 1),
    ([131000], 100_000 - 4, 4),  # a window over most of it
])
def test_long_head_over_256_programs_sampled(grid, seqlens, window_left, q_len):
    """One 128k-token sequence, one kv head, grids 264 and 1024: sampled programs' rows."""
    capacity = 131072
    tile = choose_config(HEAD_DIM, KV_DTYPE, q_len).tile
    for target_share in (1, 4):
        pids = spread_pids(grid, random.Random(grid + target_share))
        rows = sampled_rows(seqlens, None, 1, capacity, 1, q_len, window_left, grid, tile, target_share, pids)
        lengths = [n for _, n in covered_keys(seqlens, None, 1, capacity, q_len, window_left)]
        s = check_rows(rows, lengths, 1, tile, grid, target_share, pids=pids, what="128k sampled")
        if target_share == 1:
            (segs,) = s.split_heads().values()
            assert len(segs) > 256


@pytest.mark.parametrize("grid", [264, 1024])
def test_large_ragged_batch_sampled(grid):
    """Over BLOCK_B sequences (two steps of the kernel's length loop), leftpad and a window, on
    large grids: the programs at share starts inside, and across, sequence boundaries."""
    rng = random.Random(grid)
    tile = choose_config(HEAD_DIM, KV_DTYPE, 4).tile
    batch, capacity, q_len, kv_heads = BLOCK_B + 37, 40 * tile, 2, 2
    seqlens = [rng.choice([0, capacity, rng.randint(0, capacity)]) for _ in range(batch)]
    leftpad = [rng.randint(0, n) if rng.random() < 0.5 else 0 for n in seqlens]
    for window_left, target_share in ((None, 1), (5 * tile - q_len, 1), (3 * tile, 3)):
        pids = spread_pids(grid, rng)
        rows = sampled_rows(seqlens, leftpad, batch, capacity, kv_heads, q_len, window_left, grid, tile,
                            target_share, pids)
        lengths = [n for _, n in covered_keys(seqlens, leftpad, batch, capacity, q_len, window_left)]
        check_rows(rows, lengths, kv_heads, tile, grid, target_share, pids=pids, what="large ragged sampled")


# ---------------------------------------------------------------------------------------------
# The window's first key, checked directly.


@pytest.mark.parametrize("q_len", [1, 3])
def test_live_range_starts_at_earliest_key_any_window_reaches(q_len):
    """_live_range's first cache position is the earliest live key some query's window reaches,
    and the range ends at the last live key, for windows around the live length."""
    rng = random.Random(q_len)
    capacity = 200
    seqlens, leftpad = [], []
    for _ in range(60):
        end = rng.choice([0, 1, q_len, capacity, rng.randint(0, capacity)])
        seqlens.append(end)
        leftpad.append(rng.choice([0, 0, end, rng.randint(0, end)]))
    seqlens += [-5, capacity + 9, 50]  # out of range: clamped as documented
    leftpad += [3, 7, 60]
    batch = len(seqlens)
    for window_left in (None, 0, 1, 2, 31, 64, 150, 10**6):
        out = torch.full((batch, 4), -7, dtype=torch.int32, device=DEVICE)
        _live_ranges[(1,)](
            int_tensor(seqlens), int_tensor(leftpad), out, batch, capacity,
            window_left if window_left is not None else 2**30,
            HAS_SEQLENS=True, HAS_LEFTPAD=True, Q_LEN=q_len, HAS_WINDOW=window_left is not None,
            BLOCK=triton.next_power_of_2(batch),
        )
        want = covered_keys(seqlens, leftpad, batch, capacity, q_len, window_left)
        for i, (first, length) in enumerate(want):
            start = min(max(leftpad[i], 0), capacity)
            live = min(max(seqlens[i], start), capacity) - start
            got = out[i].tolist()
            assert got == [first, length, first - start, live], \
                f"sequence {i} (seqlen {seqlens[i]}, leftpad {leftpad[i]}, window {window_left}): kernel {got}"
