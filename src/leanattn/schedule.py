"""The stream-K partition of LeanAttention, in plain Python.

This module is the specification the Triton kernel follows: every formula here appears in
``kernels/lean_decode.py`` with the same meaning, and the tests check its properties on the CPU.

Work items ("LeanTiles") are blocks of ``tile_size`` cache tokens of one (sequence, kv head).
A head of live length ``L`` has ``max(1, ceil(L / tile_size))`` tiles: an empty sequence still owns
one (empty) tile, so some program writes its all-zero output and ``-inf`` LSE, and a short head
carries a small fixed cost in the balance. All tiles are laid end to end in (batch, kv_head, tile)
order, ``W`` in total, and cut into contiguous *shares*:

- ``P = min(num_programs, ceil(W / target_share))`` programs run; when the grid is not full, ``P``
  is the fewest programs whose shares stay within ``target_share`` tiles (small problems use fewer
  programs, so fewer partials meet in a merge). The rest of the grid exits at once.
- The first ``S`` tiles form ``P`` *static* shares, ``[p * S // P, (p + 1) * S // P)``, one per
  program; they differ by at most one tile.
- With a dynamic tail (``dynamic_split = k > 0`` and ``W >= dynamic_min_share * P``), the last
  ``D = W // k`` tiles (``S = W - D``) are cut into ``C`` *dynamic* shares of ``c`` tiles
  (``c = max(2, ceil(D / (dynamic_units * P)))``, the last one shorter). A program that finishes a
  share takes the next dynamic share from a counter, so programs that stream faster take more of
  them: static shares assume every multiprocessor streams at the same rate, and they don't.

Shares are numbered ``0..P-1`` (static) then ``P..P+C-1`` (dynamic), in tile order. A share may
start inside a head and cross head and sequence boundaries. The kernel computes all of this on the
device from the live lengths.

A head whose tiles lie in one share is finished by the program running that share. A head cut by
share boundaries is *split*: every share that touches it leaves an fp32 partial (unnormalised O,
running max m and sum l) in a workspace slot, and the partials are merged in share order by the
last to arrive (a two-level tree: chunks of consecutive shares first, then the chunks). Which
program runs a dynamic share changes from call to call; the shares, slots and merge order don't,
so results are bitwise reproducible.

Workspace bounds (independent of batch and context length):
- share ``s`` writes at most two partials: slot ``2s`` for the head it starts in and slot
  ``2s + 1`` for the head it ends in, when the two differ;
- a split head is named by its first share (the one holding its tile 0): each boundary between
  shares lies in at most one head, so one ticket per share suffices;
- there are at most ``P * (1 + dynamic_units)`` shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["Partition", "Segment", "Schedule", "partition", "plan", "tiles_per_head"]


def tiles_per_head(seqlen: int, tile_size: int) -> int:
    """Number of LeanTiles of one head of live length ``seqlen`` (at least one)."""
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    return max(1, -(-max(seqlen, 0) // tile_size))


@dataclass(frozen=True)
class Partition:
    """How ``total_tiles`` tiles are cut into shares (see the module docstring)."""

    total_tiles: int  # W
    num_programs: int  # P: programs that run, one static share each
    static_tiles: int  # S: tiles in static shares
    chunk: int  # c: tiles per dynamic share
    num_dynamic: int  # C

    @property
    def num_shares(self) -> int:
        return self.num_programs + self.num_dynamic

    def start(self, share: int) -> int:
        """First tile of ``share``; ``start(num_shares)`` is ``total_tiles``."""
        if share < self.num_programs:
            return share * self.static_tiles // self.num_programs
        return min(self.static_tiles + (share - self.num_programs) * self.chunk, self.total_tiles)

    def bounds(self, share: int) -> tuple[int, int]:
        """Tile range ``[start, end)`` of ``share``."""
        return self.start(share), self.start(share + 1)

    def share_of_tile(self, tile: int) -> int:
        """The share holding global tile ``tile``: for a static tile, the largest ``p`` with
        ``p * S // P <= tile``, which is ``((tile + 1) * P - 1) // S``."""
        if tile < self.static_tiles:
            return ((tile + 1) * self.num_programs - 1) // self.static_tiles
        return self.num_programs + (tile - self.static_tiles) // self.chunk


def partition(
    total_tiles: int,
    num_programs: int,
    target_share: int = 1,
    dynamic_split: int = 0,
    dynamic_min_share: int = 8,
    dynamic_units: int = 4,
) -> Partition:
    """Cut ``total_tiles`` tiles into static and dynamic shares for a grid of ``num_programs``.

    ``dynamic_split >= 2`` and ``dynamic_min_share >= 2`` keep every static share at least one
    tile long (``S >= W / 2 >= P``)."""
    for name, value in (("num_programs", num_programs), ("target_share", target_share), ("dynamic_units", dynamic_units)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if dynamic_split < 0 or dynamic_split == 1:
        raise ValueError(f"dynamic_split must be 0 (off) or >= 2, got {dynamic_split}")
    if dynamic_min_share < 2:
        raise ValueError(f"dynamic_min_share must be >= 2, got {dynamic_min_share}")
    if total_tiles == 0:
        return Partition(0, 0, 0, 2, 0)
    programs = min(num_programs, -(-total_tiles // target_share))
    dynamic = total_tiles // dynamic_split if dynamic_split and total_tiles >= dynamic_min_share * programs else 0
    chunk = max(2, -(-dynamic // (dynamic_units * programs)))
    return Partition(total_tiles, programs, total_tiles - dynamic, chunk, -(-dynamic // chunk))


@dataclass(frozen=True)
class Segment:
    """The part of one head that one share computes.

    ``tile_start``/``tile_end`` are tile indices inside the head. ``slot`` is the workspace slot
    of the partial (``None`` when the segment covers the whole head and is written directly),
    ``ticket`` the split head's ticket (its first share), ``contributors`` how many shares
    touch the head.
    """

    share: int
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
    """The full partition of one call: ``segments`` in share order."""

    tile_size: int
    kv_heads: int
    tiles: tuple[int, ...]  # tiles per head, per sequence
    partition: Partition
    segments: tuple[Segment, ...]

    @property
    def total_tiles(self) -> int:
        return self.partition.total_tiles

    @property
    def num_programs(self) -> int:
        """Programs that run: min(requested, ceil(total_tiles / target_share))."""
        return self.partition.num_programs

    def shares(self) -> list[int]:
        """Tiles per share, static shares first."""
        bounds = (self.partition.bounds(s) for s in range(self.partition.num_shares))
        return [end - start for start, end in bounds]

    def split_heads(self) -> dict[tuple[int, int], list[Segment]]:
        """Heads computed by more than one share, with their segments in share order."""
        heads: dict[tuple[int, int], list[Segment]] = {}
        for seg in self.segments:
            if not seg.whole:
                heads.setdefault((seg.batch, seg.kv_head), []).append(seg)
        return heads


def plan(
    seqlens: Sequence[int],
    kv_heads: int,
    tile_size: int,
    num_programs: int,
    target_share: int = 1,
    dynamic_split: int = 0,
    dynamic_min_share: int = 8,
    dynamic_units: int = 4,
) -> Schedule:
    """Partition the tiles of a (ragged) batch into shares for ``num_programs`` programs.

    Args:
        seqlens: live length of each sequence (batch,). Negative lengths count as 0.
        kv_heads: number of KV heads per sequence.
        tile_size: cache tokens per LeanTile.
        num_programs: programs in the persistent grid.
        target_share, dynamic_split, dynamic_min_share, dynamic_units: see :func:`partition`.
    """
    if kv_heads <= 0:
        raise ValueError(f"kv_heads must be positive, got {kv_heads}")
    tiles = tuple(tiles_per_head(int(n), tile_size) for n in seqlens)
    total = kv_heads * sum(tiles)
    part = partition(total, num_programs, target_share, dynamic_split, dynamic_min_share, dynamic_units)

    # Global index of each head's first tile, in (batch, kv_head) order.
    head_first: list[tuple[int, int, int, int]] = []  # (first tile, batch, kv_head, n_tiles)
    first = 0
    for b, n in enumerate(tiles):
        for h in range(kv_heads):
            head_first.append((first, b, h, n))
            first += n

    segments: list[Segment] = []
    head = 0
    for share in range(part.num_shares):
        start, end = part.bounds(share)
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
                slot = 2 * share + (0 if g == start else 1)
                ticket = part.share_of_tile(first)
                contributors = part.share_of_tile(first + n - 1) - ticket + 1
            segments.append(Segment(share, b, kvh, t0, t1, slot, ticket, contributors))
            g += t1 - t0
            h += 1
    return Schedule(tile_size, kv_heads, tiles, part, tuple(segments))
