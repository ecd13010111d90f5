"""``schedule.merge_tree`` against the kernel's merge arithmetic, in pure Python (no kernel runs).

``kernel_arrival`` transcribes what ``lean_decode_kernel`` computes for a split segment in the
default mode (``_arrive_and_merge``'s store slot, ``first``, ``last``, ``chunk_first``,
``chunk_last``, ``chunk_slot``, and ``_partial_slot``); ``test_kernel_lines_are_transcribed`` checks the kernel source still has those
lines. The model must agree with the transcription on every split segment of many partitions, and
``simulate`` plays the kernel's arrival protocol with that arithmetic, all heads' arrivals
interleaved in random orders: every head is written once from all its partials in program order,
no ticket or slot is used by two heads, and every ticket is back at zero afterwards.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import leanattn
from leanattn.kernels.lean_decode import _floor_div
from leanattn.schedule import ARRIVE_CHUNK, merge_tree, plan

KERNELS = Path(leanattn.__file__).parent / "kernels"

# The kernel's lines the functions below transcribe (compared without whitespace).
KERNEL_LINES = (
    "_store_partial(WsAcc, WsStats, 2 * pid + (g != start).to(tl.int32),",
    "head_first = g - t",
    "first = _floor_div((head_first + 1) * programs - 1, total).to(tl.int32)",
    "last = _floor_div((head_first + n) * programs - 1, total).to(tl.int32)",
    "first_odd = _first_odd(first, head_first, total, programs)",
    "member = pid",
    "chunk_first = first + (member - first) // ARRIVE_CHUNK * ARRIVE_CHUNK",
    "chunk_last = tl.minimum(chunk_first + ARRIVE_CHUNK - 1, last)",
    "chunk_slot = _partial_slot(chunk_first, first, first_odd)",
    "return _floor_div(first_prog.to(tl.int64) * total, programs.to(tl.int64)) < head_first",
    "return 2 * p + ((p == first_prog) & first_odd).to(tl.int32)",
    "arrived = tl.atomic_add(ChunkTickets + chunk_slot, count,",  # count: 1 in the default mode
    "if arrived + count == chunk_last - chunk_first + 1:",
    "if last - first < ARRIVE_CHUNK:",
    "arrived = tl.atomic_add(Tickets + first, 1,",
    "if arrived == (last - first) // ARRIVE_CHUNK:",
)


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_kernel_lines_are_transcribed():
    source = _squash("".join(p.read_text() for p in sorted(KERNELS.glob("*.py"))))
    missing = [line for line in KERNEL_LINES if _squash(line) not in source]
    assert not missing, f"the kernel's merge arithmetic changed; update this file's transcription: {missing}"


@triton.jit
def _divide(X, D, Q, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(Q + i, _floor_div(tl.load(X + i), tl.load(D + i)))


def test_floor_div_is_exact():
    """The kernels' ``_floor_div`` (a truncated fp64 quotient) is x // d on the values next to
    multiples of d, up to x = 2^53 - 1, for divisors from 1 to 2^31 (on the GPU when there is
    one: its division must round correctly)."""
    rng = random.Random(0)
    xs, ds = [], []
    for d in [1, 3, 7, 128, 1000003, 2**31 - 1, 2**31] + [rng.randint(1, 2**31) for _ in range(9)]:
        for k in [0, 1, 2, 2**20 + 1, (2**53 - 1) // d - 1, (2**53 - 1) // d]:
            for dx in (-1, 0, 1):
                x = k * d + dx
                if 0 <= x < 2**53:
                    xs.append(x)
                    ds.append(d)
    n = triton.next_power_of_2(len(xs))
    xs += [0] * (n - len(xs))
    ds += [1] * (n - len(ds))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, d = torch.tensor(xs, dtype=torch.int64, device=device), torch.tensor(ds, dtype=torch.int64, device=device)
    q = torch.empty_like(x)
    _divide[(1,)](x, d, q, N=n)
    assert torch.equal(q, x // d)


def test_chunk_is_the_launchers():
    from leanattn._testing import ARRIVE_CHUNK as launched  # what the launcher passes the kernel

    assert ARRIVE_CHUNK == launched


def k_first_odd(first_prog, head_first, total, programs):
    """The kernel's ``_first_odd`` (``_floor_div`` is exact: test_floor_div_is_exact)."""
    return first_prog * total // programs < head_first


def k_partial_slot(p, first_prog, first_odd):
    """The kernel's ``_partial_slot``."""
    return 2 * p + int((p == first_prog) & first_odd)


def kernel_arrival(pid, g, t, n_tiles, total, programs, chunk):
    """What program ``pid`` computes for its split segment starting at global tile ``g`` (tile
    ``t`` of a head of ``n_tiles``), as ``lean_decode_kernel`` does."""
    start = pid * total // programs
    store_slot = 2 * pid + int(g != start)
    head_first = g - t
    first_prog = ((head_first + 1) * programs - 1) // total
    last_prog = ((head_first + n_tiles) * programs - 1) // total
    chunk_first = first_prog + (pid - first_prog) // chunk * chunk
    chunk_last = min(chunk_first + chunk - 1, last_prog)
    first_odd = k_first_odd(first_prog, head_first, total, programs)
    chunk_slot = k_partial_slot(chunk_first, first_prog, first_odd)
    return dict(store_slot=store_slot, head_first=head_first, first_prog=first_prog, last_prog=last_prog,
                chunk_first=chunk_first, chunk_last=chunk_last, chunk_slot=chunk_slot)


def split_arrivals(s, chunk):
    """(head, program, kernel_arrival) for every split segment of schedule ``s``."""
    head_first = {}
    first = 0
    for b, n in enumerate(s.tiles):
        for h in range(s.kv_heads):
            head_first[(b, h)] = first
            first += n
    out = []
    for seg in s.segments:
        if not seg.whole:
            key = (seg.batch, seg.kv_head)
            g = head_first[key] + seg.tile_start
            out.append((key, seg.program, kernel_arrival(seg.program, g, seg.tile_start, s.tiles[seg.batch],
                                                         s.total_tiles, s.num_programs, chunk)))
    return out, head_first


def simulate(s, chunk, rng):
    """Play every split segment's store and arrivals in a random order, with the kernel's
    arithmetic. Returns the heads written (head -> the programs whose partials it merged, in
    order) and how many arrived on each chunk and head ticket."""
    P = s.num_programs
    arrivals, _ = split_arrivals(s, chunk)
    rng.shuffle(arrivals)
    tickets, chunk_tickets = [0] * P, [0] * (2 * P)
    slots: dict[int, tuple] = {}  # slot -> (head, programs merged into it, in order)
    written: dict = {}
    counts: dict = {}

    def merge(head, p_first, p_last, step, a):
        merged = ()
        for p in range(p_first, p_last + 1, step):
            owner, part = slots[k_partial_slot(p, a["first_prog"], k_first_odd(a["first_prog"], a["head_first"], s.total_tiles, P))]
            assert owner == head, f"head {head} read a partial of head {owner}"
            merged += part
        return merged

    for head, pid, a in arrivals:
        assert 0 <= a["store_slot"] < 2 * P and a["store_slot"] not in slots, "a slot written twice"
        slots[a["store_slot"]] = (head, (pid,))
        cs = a["chunk_slot"]
        assert 0 <= cs < 2 * P
        counts[("chunk", cs)] = counts.get(("chunk", cs), 0) + 1
        arrived = chunk_tickets[cs]
        chunk_tickets[cs] += 1
        if arrived != a["chunk_last"] - a["chunk_first"]:
            continue
        chunk_tickets[cs] = 0
        merged = merge(head, a["chunk_first"], a["chunk_last"], 1, a)
        assert merged == tuple(range(a["chunk_first"], a["chunk_last"] + 1))
        if a["last_prog"] - a["first_prog"] < chunk:
            assert head not in written
            written[head] = merged
            continue
        slots[cs] = (head, merged)  # the chunk's first member's slot, already read
        hp = a["first_prog"]
        assert 0 <= hp < P
        counts[("head", hp)] = counts.get(("head", hp), 0) + 1
        arrived = tickets[hp]
        tickets[hp] += 1
        if arrived == (a["last_prog"] - a["first_prog"]) // chunk:
            tickets[hp] = 0
            assert head not in written
            written[head] = merge(head, a["first_prog"], a["last_prog"], chunk, a)
    assert tickets == [0] * P and chunk_tickets == [0] * (2 * P), "a ticket not put back"
    return written, counts


def random_case(rng: random.Random):
    """Ragged lengths (in tiles of 4 tokens) over grids that put from 1 to ~100 programs on a head."""
    batch = rng.randint(1, 6)
    lens = [rng.choice([0, 1, rng.randint(0, 60), rng.randint(0, 2000)]) for _ in range(batch)]
    return lens, rng.randint(1, 4), rng.choice([4, 4, 16]), rng.randint(1, 300), rng.choice([1, 1, 2, 4])


def check(s, chunk, rng):
    trees = s.merge_trees(chunk)
    arrivals, head_first = split_arrivals(s, chunk)
    assert set(trees) == {head for head, _, _ in arrivals}
    for head, pid, a in arrivals:
        tree = trees[head]
        assert tree.programs == range(a["first_prog"], a["last_prog"] + 1)
        (mine,) = [c for c in tree.chunks if pid in c.programs]
        assert mine.programs == range(a["chunk_first"], a["chunk_last"] + 1)
        assert mine.ticket == a["chunk_slot"]
        many = a["last_prog"] - a["first_prog"] >= chunk
        assert tree.head_ticket == (a["first_prog"] if many else None)
        assert tree.head_contenders == ((a["last_prog"] - a["first_prog"]) // chunk + 1 if many else 0)
    for (b, h), segs in s.split_heads().items():
        tree = trees[(b, h)]
        assert [c.programs for c in tree.chunks] == [range(c, min(c + chunk, tree.programs.stop))
                                                     for c in tree.programs[::chunk]]
        assert all(len(c.programs) <= chunk for c in tree.chunks)
        assert segs[0].ticket == tree.programs.start and segs[0].contributors == len(tree.programs)
    # Heads one program holds have no tree.
    for (b, h), first in head_first.items():
        if (b, h) not in trees:
            assert merge_tree(first, s.tiles[b], s.total_tiles, s.num_programs, chunk) is None
    # The protocol, in random arrival orders: every split head written once, from all its
    # partials in program order; ticket contenders as the model says.
    for _ in range(3):
        written, counts = simulate(s, chunk, rng)
        assert written == {head: tuple(tree.programs) for head, tree in trees.items()}
        for tree in trees.values():
            for c in tree.chunks:
                assert counts[("chunk", c.ticket)] == len(c.programs)
            if tree.head_ticket is not None:
                assert counts[("head", tree.head_ticket)] == tree.head_contenders


@pytest.mark.parametrize("seed", range(200))
def test_merge_tree_matches_the_kernel(seed):
    rng = random.Random(seed)
    lens, kv_heads, tile, programs, target_share = random_case(rng)
    s = plan(lens, kv_heads, tile, programs, target_share)
    check(s, ARRIVE_CHUNK, rng)
    check(s, rng.choice([1, 2, 3, 5]), rng)  # small chunks: many chunks on small grids


@pytest.mark.parametrize("programs", [2, 15, 16, 17, 31, 32, 33, 100, 264])
def test_one_head_over_the_grid(programs):
    s = plan([40 * programs + 3], 1, 4, programs)
    (tree,) = s.merge_trees().values()
    assert tree.programs == range(programs)
    sizes = [len(c.programs) for c in tree.chunks]
    assert sizes == [ARRIVE_CHUNK] * (programs // ARRIVE_CHUNK) + ([programs % ARRIVE_CHUNK] if programs % ARRIVE_CHUNK else [])
    assert tree.head_contenders == (0 if programs <= ARRIVE_CHUNK else -(-programs // ARRIVE_CHUNK))
    check(s, ARRIVE_CHUNK, random.Random(programs))


@pytest.mark.parametrize("context,grid,contenders", [(128 * 1024, 264, 17), (256 * 1024, 1024, 64)])
def test_head_ticket_contenders_at_scale(context, grid, contenders):
    """One sequence, one kv head, with the GPU's fp16/bf16 configuration (64-token tiles, target
    share 4): 1 x 128k on 264 programs (132 SMs x 2) and 1 x 256k on a grid of 1024."""
    s = plan([context], 1, 64, grid, 4)
    assert s.num_programs == grid
    (tree,) = s.merge_trees().values()
    assert tree.head_ticket == 0 and tree.head_contenders == contenders
    assert max(len(c.programs) for c in tree.chunks) == ARRIVE_CHUNK
