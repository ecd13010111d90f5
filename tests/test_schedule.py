"""Properties of the stream-K partition (pure Python, no kernel)."""

import random

import pytest

from leanattn.schedule import effective_programs, plan, program_of_tile, share_bounds, tiles_per_head


def random_case(rng: random.Random):
    lens = [rng.choice([0, 1, rng.randint(0, 40), rng.randint(0, 400)]) for _ in range(rng.randint(1, 9))]
    return lens, rng.randint(1, 5), rng.choice([1, 4, 16]), rng.randint(1, 60), rng.choice([1, 1, 2, 5])


@pytest.mark.parametrize("seed", range(300))
def test_every_tile_exactly_once_and_balanced(seed):
    lens, kv_heads, tile, programs, target_share = random_case(random.Random(seed))
    s = plan(lens, kv_heads, tile, programs, target_share)
    covered = {}
    for seg in s.segments:
        for t in range(seg.tile_start, seg.tile_end):
            key = (seg.batch, seg.kv_head, t)
            assert key not in covered, f"tile {key} given twice"
            covered[key] = seg.program
    expected = {(b, h, t) for b, n in enumerate(lens) for h in range(kv_heads) for t in range(tiles_per_head(n, tile))}
    assert set(covered) == expected
    shares = s.shares()
    unaligned = min(programs, -(-len(expected) // target_share))
    heads = len(lens) * kv_heads
    assert s.num_programs == effective_programs(len(expected), heads, len(set(s.tiles)) == 1, programs, target_share)
    assert 8 * s.num_programs >= 7 * unaligned
    assert max(shares) - min(shares) <= 1 and min(shares) >= 1
    if s.num_programs < programs and s.num_programs == unaligned:  # grid not full: the fewest programs with shares <= target_share
        assert max(shares) <= target_share
        assert s.num_programs == 1 or len(expected) > (s.num_programs - 1) * target_share
    assert sum(shares) == s.total_tiles == len(expected)


@pytest.mark.parametrize("seed", range(300))
def test_split_heads_slots_and_tickets(seed):
    lens, kv_heads, tile, programs, target_share = random_case(random.Random(seed))
    s = plan(lens, kv_heads, tile, programs, target_share)
    split = s.split_heads()
    # At most P - 1 split heads, each named by a distinct ticket (its first program).
    assert len(split) <= max(s.num_programs - 1, 0)
    tickets = [segs[0].ticket for segs in split.values()]
    assert len(set(tickets)) == len(tickets)
    slots = [seg.slot for seg in s.segments if not seg.whole]
    assert len(set(slots)) == len(slots) and all(0 <= x < 2 * s.num_programs for x in slots)
    for (b, h), segs in split.items():
        programs_of_head = [seg.program for seg in segs]
        assert programs_of_head == list(range(segs[0].ticket, segs[0].ticket + segs[0].contributors))
        assert segs[0].tile_start == 0 and segs[-1].tile_end == tiles_per_head(lens[b], tile)
        assert all(x.tile_end == y.tile_start for x, y in zip(segs, segs[1:]))
        # The merging program finds each partial by the kernel's formula: slot 2p, or 2p + 1 for
        # the first program when its share started before the head.
        head_first = sum(s.tiles[:b]) * kv_heads + h * s.tiles[b]
        for seg in segs:
            p_start = share_bounds(seg.program, s.total_tiles, s.num_programs)[0]
            assert seg.slot == 2 * seg.program + int(seg.program == seg.ticket and p_start < head_first)


@pytest.mark.parametrize("heads,grid", [(64, 264), (32, 264), (8, 264), (128, 264), (256, 264), (512, 264), (120, 264), (32, 132), (133, 264), (7, 100)])
def test_equal_heads_put_head_boundaries_on_share_boundaries(heads, grid):
    n = 37  # tiles per head
    programs = effective_programs(heads * n, heads, True, grid)
    assert programs <= grid and 8 * programs >= 7 * grid
    starts = {share_bounds(p, heads * n, programs)[0] for p in range(programs)}
    head_starts = {h * n for h in range(heads)}
    if programs % heads == 0:  # each head cut into equal shares
        assert head_starts <= starts
    elif heads % programs == 0:  # whole heads per share
        assert starts <= head_starts
    else:  # no aligned grid keeps 7/8 of it (133 heads on 264 would leave 133 programs)
        assert programs == grid
    # Unequal heads keep the whole grid.
    assert effective_programs(heads * n, heads, False, grid) == grid


def test_program_of_tile_inverts_share_bounds():
    for total in range(1, 80):
        for programs in range(1, total + 1):
            for p in range(programs):
                start, end = share_bounds(p, total, programs)
                for t in range(start, end):
                    assert program_of_tile(t, total, programs) == p


def test_share_spans_heads_and_sequences():
    # One program over everything: one share crossing every head and sequence, nothing split.
    s = plan([5, 0, 70, 33], kv_heads=3, tile_size=16, num_programs=1)
    assert {seg.program for seg in s.segments} == {0}
    assert len(s.segments) == 12 and all(seg.whole for seg in s.segments)


def test_long_head_shared_by_many_programs():
    s = plan([1000], kv_heads=1, tile_size=10, num_programs=7)
    (segs,) = s.split_heads().values()
    assert [seg.program for seg in segs] == list(range(7))
    assert [seg.slot for seg in segs] == [0] + [2 * p for p in range(1, 7)]


def test_more_programs_than_tiles():
    s = plan([3, 0], kv_heads=2, tile_size=16, num_programs=100)
    assert s.total_tiles == 4 and s.num_programs == 4 and s.shares() == [1, 1, 1, 1]


def test_empty_sequence_owns_one_tile():
    assert tiles_per_head(0, 64) == 1 and tiles_per_head(-5, 64) == 1
    assert [tiles_per_head(n, 64) for n in (1, 63, 64, 65, 128, 129)] == [1, 1, 1, 2, 2, 3]


def test_bad_arguments():
    with pytest.raises(ValueError):
        plan([1], kv_heads=0, tile_size=16, num_programs=1)
    with pytest.raises(ValueError):
        plan([1], kv_heads=1, tile_size=16, num_programs=0)
    with pytest.raises(ValueError):
        tiles_per_head(3, 0)
    with pytest.raises(ValueError):
        plan([1], kv_heads=1, tile_size=16, num_programs=4, target_share=0)
