"""Properties of the stream-K partition (pure Python, no kernel)."""

import random

import pytest

from leanattn.schedule import partition, plan, tiles_per_head


def random_case(rng: random.Random):
    lens = [rng.choice([0, 1, rng.randint(0, 40), rng.randint(0, 400)]) for _ in range(rng.randint(1, 9))]
    dynamic = dict(dynamic_split=rng.choice([0, 2, 4]), dynamic_min_share=rng.choice([2, 8]), dynamic_units=rng.choice([1, 4]))
    return lens, rng.randint(1, 5), rng.choice([1, 4, 16]), rng.randint(1, 60), rng.choice([1, 1, 2, 5]), dynamic


@pytest.mark.parametrize("seed", range(300))
def test_every_tile_exactly_once_and_balanced(seed):
    lens, kv_heads, tile, programs, target_share, dynamic = random_case(random.Random(seed))
    s = plan(lens, kv_heads, tile, programs, target_share, **dynamic)
    covered = {}
    for seg in s.segments:
        for t in range(seg.tile_start, seg.tile_end):
            key = (seg.batch, seg.kv_head, t)
            assert key not in covered, f"tile {key} given twice"
            covered[key] = seg.share
    expected = {(b, h, t) for b, n in enumerate(lens) for h in range(kv_heads) for t in range(tiles_per_head(n, tile))}
    assert set(covered) == expected
    part = s.partition
    shares = s.shares()
    static, dyn = shares[: part.num_programs], shares[part.num_programs :]
    assert s.num_programs == min(programs, -(-len(expected) // target_share))
    assert max(static) - min(static) <= 1 and min(static) >= 1
    if s.num_programs < programs:  # grid not full: the fewest programs with shares <= target_share
        assert max(shares) <= target_share
        assert s.num_programs == 1 or len(expected) > (s.num_programs - 1) * target_share
    assert sum(shares) == s.total_tiles == len(expected)
    if dynamic["dynamic_split"] and s.total_tiles >= dynamic["dynamic_min_share"] * s.num_programs:
        assert sum(dyn) == s.total_tiles // dynamic["dynamic_split"] and dyn
        assert all(n == part.chunk for n in dyn[:-1]) and 1 <= dyn[-1] <= part.chunk
    else:
        assert not dyn
    assert part.num_shares <= s.num_programs * (1 + dynamic["dynamic_units"])


@pytest.mark.parametrize("seed", range(300))
def test_split_heads_slots_and_tickets(seed):
    lens, kv_heads, tile, programs, target_share, dynamic = random_case(random.Random(seed))
    s = plan(lens, kv_heads, tile, programs, target_share, **dynamic)
    part = s.partition
    split = s.split_heads()
    # At most (shares - 1) split heads, each named by a distinct ticket (its first share).
    assert len(split) <= max(part.num_shares - 1, 0)
    tickets = [segs[0].ticket for segs in split.values()]
    assert len(set(tickets)) == len(tickets)
    slots = [seg.slot for seg in s.segments if not seg.whole]
    assert len(set(slots)) == len(slots) and all(0 <= x < 2 * part.num_shares for x in slots)
    for (b, h), segs in split.items():
        shares_of_head = [seg.share for seg in segs]
        assert shares_of_head == list(range(segs[0].ticket, segs[0].ticket + segs[0].contributors))
        assert segs[0].tile_start == 0 and segs[-1].tile_end == tiles_per_head(lens[b], tile)
        assert all(x.tile_end == y.tile_start for x, y in zip(segs, segs[1:]))
        # The merging program finds each partial by the kernel's formula: slot 2s, or 2s + 1 for
        # the first share when it started before the head.
        head_first = sum(s.tiles[:b]) * kv_heads + h * s.tiles[b]
        for seg in segs:
            assert seg.slot == 2 * seg.share + int(seg.share == seg.ticket and part.start(seg.share) < head_first)


def test_share_of_tile_inverts_bounds():
    for total in range(1, 80):
        for programs in range(1, total + 1, 3):
            for split in (0, 2, 3):
                part = partition(total, programs, dynamic_split=split, dynamic_min_share=2, dynamic_units=2)
                for share in range(part.num_shares):
                    start, end = part.bounds(share)
                    assert start < end
                    for t in range(start, end):
                        assert part.share_of_tile(t) == share


def test_dynamic_tail_sizes():
    # 1 GiB of bf16 K+V in 64-token tiles, d=128: 32768 tiles over 264 programs.
    part = partition(32768, 264, target_share=4, dynamic_split=4, dynamic_min_share=8, dynamic_units=4)
    assert part.static_tiles == 3 * 32768 // 4 and part.chunk == 8 and part.num_dynamic == 1024
    # Short problems (under 8 tiles per program) keep static shares only.
    assert partition(2000, 264, 4, 4, 8, 4).num_dynamic == 0


def test_share_spans_heads_and_sequences():
    # One program over everything: one share crossing every head and sequence, nothing split.
    s = plan([5, 0, 70, 33], kv_heads=3, tile_size=16, num_programs=1)
    assert {seg.share for seg in s.segments} == {0}
    assert len(s.segments) == 12 and all(seg.whole for seg in s.segments)


def test_long_head_shared_by_many_programs():
    s = plan([1000], kv_heads=1, tile_size=10, num_programs=7)
    (segs,) = s.split_heads().values()
    assert [seg.share for seg in segs] == list(range(7))
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
    for bad in (dict(dynamic_split=1), dict(dynamic_split=-2), dict(dynamic_min_share=1), dict(dynamic_units=0)):
        with pytest.raises(ValueError):
            partition(100, 4, **bad)
