"""The stream-K partition of LeanAttention and the merge tree of its split heads, in plain Python.

This module is the specification of two parts of the kernel: the partition (:func:`plan`, which
``kernels/plan.py``'s ``_locate_share`` computes on the device; tests/test_partition.py compares
the two) and the shape of the merge of a split head (:func:`merge_tree`, the ``first_prog`` /
``last_prog`` / ``chunk_first`` / ``chunk_last`` / ``_partial_slot`` arithmetic of
``kernels/lean_decode.py``; tests/test_schedule_tree.py compares the two). It leaves out:

- how a sequence's tile-covered length is found. ``plan`` takes that length directly; the kernel
  derives it from ``cache_seqlens``, ``cache_leftpad``, ``q_len`` and the window
  (``kernels/plan.py``'s ``_live_range``: with a window, keys before every query's window are
  neither read nor counted);
- everything inside a tile (paging, masks, the softmax) and the merge's arithmetic: a partial is
  only named here, by its program and slot;
- timing: which member of a chunk merges it is whichever arrives last on its ticket.

Work items ("LeanTiles") are blocks of ``tile_size`` cache tokens of one (sequence, kv head).
A head of live length ``L`` has ``max(1, ceil(L / tile_size))`` tiles: an empty sequence still owns
one (empty) tile, so some program writes its all-zero output and ``-inf`` LSE, and a short head
carries a small fixed cost in the balance. All tiles are laid end to end in (batch, kv_head, tile)
order, ``W`` in total, and program ``p`` of ``P`` programs takes the contiguous share
``[p * W // P, (p + 1) * W // P)``. Shares differ by at most one tile and every program that runs
has at least one. ``P`` (see :func:`effective_programs`) starts from ``min(num_programs, ceil(W /
target_share))``: when the grid is not full, the fewest programs whose shares stay within
``target_share`` tiles (small problems use fewer programs, so fewer partials meet in a merge).
When every head has the same number of tiles, ``P`` then becomes a multiple or a divisor of the
number of heads if that keeps at least 7/8 of it, so that head boundaries fall on share
boundaries. The kernel computes ``P`` on the device from the live lengths; the rest of the grid
exits at once. A share may start inside a head and cross head and sequence boundaries.

A head whose tiles lie in one share is finished by that program. A head cut by share boundaries is
*split*: every program that touches it (its *contributors*, programs ``first_prog ..
last_prog``) leaves an fp32 partial (unnormalised O, running max m and sum l) in a workspace slot,
and the partials are merged in program order by a two-level tree of last arrivers
(:func:`merge_tree`): the contributors form chunks of ``ARRIVE_CHUNK`` (16) consecutive programs
from ``first_prog``; the last member of a chunk to arrive on the chunk's ticket merges the
chunk's partials; if the head has one chunk that merge writes the head, else the chunk's sum goes
into the slot of the chunk's first member and its merger arrives on the head's ticket, and the
last of the chunks' mergers to arrive there merges the chunks' sums in program order and writes
the head. A chunk ticket has at most ``ARRIVE_CHUNK`` contenders and a chunk merge reads at most
``ARRIVE_CHUNK`` partials; the head ticket has one contender per chunk, ``ceil(contributors /
ARRIVE_CHUNK)`` (17 for a head over 264 programs, 64 over 1024), and the final merge reads that
many chunk sums.

Workspace bounds (independent of batch and context length):
- program ``p`` writes at most two partials: slot ``2p`` for the head its share starts in and slot
  ``2p + 1`` for the head its share ends in, when the two differ; so ``2P`` slots;
- ``P`` head tickets: a split head's head ticket is its first program ``first_prog`` (the program
  holding its tile 0), whose share ends inside the head; a share ends inside at most one head, so
  no two split heads share one;
- ``2P`` chunk tickets: a chunk's ticket is the slot of its first member's partial for the head,
  and no two partials share a slot.
The kernel indexes the tickets with the effective ``P``; the workspace holds them for the whole
grid (``num_programs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "Segment",
    "Schedule",
    "tiles_per_head",
    "share_bounds",
    "program_of_tile",
    "plan",
    "effective_programs",
    "ARRIVE_CHUNK",
    "MergeChunk",
    "MergeTree",
    "merge_tree",
]

# Most contributors that count their arrival on one chunk ticket: the kernel's ARRIVE_CHUNK (the
# launcher passes 16). Contention on one address grows fast (docs/decisions.md, Merge tree).
ARRIVE_CHUNK = 16


def tiles_per_head(seqlen: int, tile_size: int) -> int:
    """Number of LeanTiles of one head of live length ``seqlen`` (at least one)."""
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    return max(1, -(-max(seqlen, 0) // tile_size))


def effective_programs(total_tiles: int, heads: int, uniform: bool, grid: int, target_share: int = 1) -> int:
    """Programs that run for ``total_tiles`` tiles of ``heads`` heads on a grid of ``grid``.

    ``uniform``: every head has ``total_tiles / heads`` tiles. Then a grid of ``k * heads``
    programs (each head cut into ``k`` equal shares) or ``heads / m`` (``m`` whole heads a share)
    lines shares up with heads, and neighbouring heads' matching token ranges, which share cache
    rows, are streamed at the same time: measured 2.3-2.8% less time on 512 MiB-1 GiB shapes than
    the grid 3% larger whose shares cut heads anywhere (docs/decisions.md, Aligned grid).
    """
    programs = min(grid, -(-total_tiles // target_share))
    if not uniform:
        return programs
    if heads <= programs:
        aligned = programs // heads * heads
    else:
        per_program = -(-heads // programs)
        aligned = heads // per_program if heads % per_program == 0 else 0
    return aligned if 8 * aligned >= 7 * programs else programs


def share_bounds(program: int, total_tiles: int, num_programs: int) -> tuple[int, int]:
    """Tile range ``[start, end)`` of ``program`` among ``num_programs`` effective programs."""
    return program * total_tiles // num_programs, (program + 1) * total_tiles // num_programs


def program_of_tile(tile: int, total_tiles: int, num_programs: int) -> int:
    """The program whose share holds global tile ``tile``.

    Inverse of :func:`share_bounds` for ``num_programs <= total_tiles``: the largest ``p`` with
    ``p * W // P <= tile`` is ``((tile + 1) * P - 1) // W``.
    """
    return ((tile + 1) * num_programs - 1) // total_tiles


@dataclass(frozen=True)
class Segment:
    """The part of one head that one program computes.

    ``tile_start``/``tile_end`` are tile indices inside the head. ``slot`` is the workspace slot
    of the partial (``None`` when the segment covers the whole head and is written directly),
    ``ticket`` the split head's first program (the index of its head ticket, which the kernel
    uses only when the head has more than one chunk; see :func:`merge_tree`), ``contributors``
    how many programs share the head.
    """

    program: int
    batch: int
    kv_head: int
    tile_start: int
    tile_end: int
    slot: int | None
    ticket: int | None
    contributors: int

    @property
    def whole(self) -> bool:
        return self.slot is None


@dataclass(frozen=True)
class Schedule:
    """The full partition of one call: ``segments`` in program order."""

    tile_size: int
    kv_heads: int
    tiles: tuple[int, ...]  # tiles per head, per sequence
    total_tiles: int
    num_programs: int  # programs that run (see effective_programs)
    segments: tuple[Segment, ...]

    def shares(self) -> list[int]:
        """Tiles per effective program."""
        bounds = (share_bounds(p, self.total_tiles, self.num_programs) for p in range(self.num_programs))
        return [end - start for start, end in bounds]

    def split_heads(self) -> dict[tuple[int, int], list[Segment]]:
        """Heads computed by more than one program, with their segments in program order."""
        heads: dict[tuple[int, int], list[Segment]] = {}
        for seg in self.segments:
            if not seg.whole:
                heads.setdefault((seg.batch, seg.kv_head), []).append(seg)
        return heads

    def merge_trees(self, chunk: int = ARRIVE_CHUNK) -> dict[tuple[int, int], MergeTree]:
        """The merge tree of every split head, by (batch, kv_head)."""
        trees = {}
        for (b, h) in self.split_heads():
            head_first = self.kv_heads * sum(self.tiles[:b]) + h * self.tiles[b]
            tree = merge_tree(head_first, self.tiles[b], self.total_tiles, self.num_programs, chunk)
            assert tree is not None
            trees[(b, h)] = tree
        return trees


@dataclass(frozen=True)
class MergeChunk:
    """Consecutive contributors of a split head that count their arrival on one chunk ticket.

    ``programs``: at most ``ARRIVE_CHUNK`` consecutive programs. ``ticket``: the chunk ticket's
    index among the ``2P`` chunk tickets, which is also the workspace slot of the chunk's first
    member's partial for this head. The member that arrives last (any of them) merges the
    members' partials in program order; when the head has more than one chunk it stores the sum
    in slot ``ticket`` (a partial it has already read) and arrives on the head ticket, otherwise
    it writes the head.
    """

    programs: range
    ticket: int


@dataclass(frozen=True)
class MergeTree:
    """How the partials of one split head are merged.

    ``programs``: the contributors, ``first_prog .. last_prog``. ``chunks``: them in chunks from
    ``first_prog``, in program order. ``head_ticket``: the head ticket's index among the ``P``
    head tickets (``first_prog``) when there is more than one chunk, else ``None``: the one
    chunk's merge writes the head.
    """

    programs: range
    chunks: tuple[MergeChunk, ...]
    head_ticket: int | None

    @property
    def head_contenders(self) -> int:
        """Arrivals on the head ticket (one per chunk, the chunks' mergers); 0 with one chunk.
        The program that draws the last one merges this many chunk sums."""
        return len(self.chunks) if self.head_ticket is not None else 0


def _partial_slot(program: int, first_prog: int, head_first: int, total_tiles: int, num_programs: int) -> int:
    """The workspace slot of ``program``'s partial for the head whose tile 0 is global tile
    ``head_first`` (the kernel's ``_partial_slot``): ``2p``, or ``2p + 1`` for the head's first
    program when its share started before the head."""
    start = program * total_tiles // num_programs
    return 2 * program + int(program == first_prog and start < head_first)


def merge_tree(
    head_first: int, n_tiles: int, total_tiles: int, num_programs: int, chunk: int = ARRIVE_CHUNK
) -> MergeTree | None:
    """The merge tree of the head whose ``n_tiles`` tiles start at global tile ``head_first``,
    among ``total_tiles`` tiles on ``num_programs`` effective programs (``Schedule.num_programs``);
    ``None`` when one program holds the whole head (it writes the head itself)."""
    first_prog = program_of_tile(head_first, total_tiles, num_programs)
    last_prog = program_of_tile(head_first + n_tiles - 1, total_tiles, num_programs)
    if first_prog == last_prog:
        return None
    chunks = tuple(
        MergeChunk(range(c, min(c + chunk, last_prog + 1)),
                   _partial_slot(c, first_prog, head_first, total_tiles, num_programs))
        for c in range(first_prog, last_prog + 1, chunk)
    )
    return MergeTree(range(first_prog, last_prog + 1), chunks, first_prog if len(chunks) > 1 else None)


def plan(
    seqlens: Sequence[int], kv_heads: int, tile_size: int, num_programs: int, target_share: int = 1
) -> Schedule:
    """Partition the tiles of a (ragged) batch over ``num_programs`` programs.

    Args:
        seqlens: the length the tiles of each sequence cover (batch,): its live length, or with a
            window the live keys from the first one some query's window reaches (the kernel
            derives it with ``kernels/plan.py``'s ``_live_range``). Negative lengths count as 0.
        kv_heads: number of KV heads per sequence.
        tile_size: cache tokens per LeanTile.
        num_programs: programs in the persistent grid.
        target_share: the partition uses at most ``min(num_programs, ceil(W / target_share))``
            programs (see :func:`effective_programs`).
    """
    if kv_heads <= 0:
        raise ValueError(f"kv_heads must be positive, got {kv_heads}")
    if num_programs <= 0:
        raise ValueError(f"num_programs must be positive, got {num_programs}")
    if target_share <= 0:
        raise ValueError(f"target_share must be positive, got {target_share}")
    tiles = tuple(tiles_per_head(int(n), tile_size) for n in seqlens)
    total = kv_heads * sum(tiles)
    if total == 0:
        return Schedule(tile_size, kv_heads, tiles, 0, 0, ())
    programs = effective_programs(total, len(tiles) * kv_heads, len(set(tiles)) == 1, num_programs, target_share)

    # Global index of each head's first tile, in (batch, kv_head) order.
    head_first: list[tuple[int, int, int, int]] = []  # (first tile, batch, kv_head, n_tiles)
    first = 0
    for b, n in enumerate(tiles):
        for h in range(kv_heads):
            head_first.append((first, b, h, n))
            first += n

    segments: list[Segment] = []
    head = 0
    for p in range(programs):
        start, end = share_bounds(p, total, programs)
        while head_first[head][0] + head_first[head][3] <= start:
            head += 1
        g = start
        h = head
        while g < end:
            first, b, kvh, n = head_first[h]
            t0 = g - first
            t1 = min(n, t0 + (end - g))
            whole = t0 == 0 and t1 == n
            if whole:
                slot = ticket = None
                contributors = 1
            else:
                slot = 2 * p + (0 if g == start else 1)
                ticket = program_of_tile(first, total, programs)
                contributors = program_of_tile(first + n - 1, total, programs) - ticket + 1
            segments.append(Segment(p, b, kvh, t0, t1, slot, ticket, contributors))
            g += t1 - t0
            h += 1
    return Schedule(tile_size, kv_heads, tiles, total, programs, tuple(segments))
