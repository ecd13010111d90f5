"""The round-robin page layout of context parallel: which rank holds which token, and the range
of a rank's keys each query sees when positions are global."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_per_sequence, check_tensor, fail
from .._features import window_bounds

__all__ = ["round_robin_lengths", "round_robin_slot", "held_before", "key_bounds", "Positions"]


def round_robin_lengths(seqlens: torch.Tensor, world_size: int, rank: int, page_size: int) -> torch.Tensor:
    """Tokens of each sequence that ``rank`` holds when pages are dealt round-robin.

    Args:
        seqlens: int (batch,) global lengths, on any device (no host sync).
        world_size, rank: the group's size and this rank.
        page_size: tokens per dealt page.

    Returns:
        int32 (batch,) local lengths; they sum over the ranks to ``seqlens``.
    """
    if page_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need page_size >= 1 and 0 <= rank < world_size, got {page_size}, {rank}, {world_size}")
    return held_before(seqlens.to(torch.int64), world_size, rank, page_size).to(torch.int32)


def held_before(x: torch.Tensor, world_size: int, rank: int, page_size: int) -> torch.Tensor:
    """int64, shaped like ``x``: tokens at global positions below ``x`` (int64) that ``rank`` holds."""
    n = x.clamp_min(0)
    full, rem = n // page_size, n % page_size
    # Full pages j < full with j % world_size == rank, then the partial last page if it is ours.
    mine = torch.div(full - rank + world_size - 1, world_size, rounding_mode="floor").clamp_min(0)
    tail = torch.where(full % world_size == rank, rem, torch.zeros_like(rem))
    return mine * page_size + tail


def key_bounds(
    seqlens: torch.Tensor, cache_leftpad: torch.Tensor | None, world_size: int, rank: int, page_size: int,
    q_len: int, window_left: int, window_right: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``rank`` attends over for queries at the last ``q_len`` global positions of each
    sequence, when pages of ``page_size`` are dealt round-robin (device ops, no host sync).

    Args:
        seqlens, cache_leftpad: int (batch,) where each sequence's live tokens end and start in
            the whole sequence (leftpad None: 0); the queries are the last q_len live positions.
        window_left, window_right: query position P sees global positions [P - window_left,
            P + window_right] (``_features.window_bounds``' values: causal is window_right 0,
            unbounded sides are ``UNBOUNDED``).

    Returns:
        int32 (batch,) local end and local start of the live keys the rank attends over (its
        positions, pages back to back; the start skips the rank's keys no query sees), and
        int32 (batch, q_len, 2): each query token's local keys [lo, hi), numbered from that
        start (lo == hi: none).
    """
    held = lambda x: held_before(x, world_size, rank, page_size)  # noqa: E731
    start = seqlens.new_zeros(seqlens.shape, dtype=torch.int64) if cache_leftpad is None else \
        cache_leftpad.to(torch.int64).clamp_min(0)
    end = torch.maximum(seqlens.to(torch.int64), start)
    pos = end[:, None] - q_len + torch.arange(q_len, device=seqlens.device)  # (batch, q_len) query positions
    first = torch.maximum(pos - window_left, start[:, None])
    last = torch.maximum(torch.minimum(pos + window_right + 1, end[:, None]), first)  # exclusive
    local_start = held(start)
    lo, hi = held(first) - local_start[:, None], held(last) - local_start[:, None]
    # The first query's range starts first (ranges move forward with the query): no query sees a
    # key before it, so the live range starts there.
    skip = lo[:, 0]
    bounds = torch.stack((lo - skip[:, None], hi - skip[:, None]), dim=-1)
    return held(end).to(torch.int32), (local_start + skip).to(torch.int32), bounds.to(torch.int32)


def round_robin_slot(positions: torch.Tensor, world_size: int, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Owner rank and local position of global token positions (where to append a new token).

    Returns two int64 tensors shaped like ``positions``: the rank, and the position in that
    rank's local sequence (its pages back to back).
    """
    pos = positions.to(torch.int64)
    page = pos // page_size
    return page % world_size, (page // world_size) * page_size + pos % page_size


@dataclass
class Positions:
    """``plan``'s global-position arguments (see :meth:`ContextParallelDecode.plan`)."""

    seqlens: torch.Tensor | None
    page_size: int | None
    cache_leftpad: torch.Tensor | None
    causal: bool
    window_size: tuple[int, int]

    @property
    def active(self) -> bool:
        """Lengths given globally (seqlens and page_size), not per rank."""
        return self.seqlens is not None or self.page_size is not None

    def given(self) -> list[str]:
        """The arguments that need global positions among those given."""
        return [name for name, on in (("cache_leftpad", self.cache_leftpad is not None),
                                      ("window_size", tuple(self.window_size) != (-1, -1))) if on]

    def check(self, device: torch.device) -> int:
        """Raise ValueError or TypeError naming a bad argument; return the batch size."""
        if self.seqlens is None or self.page_size is None:
            fail(ValueError, "seqlens (global lengths) and page_size (the round-robin page size) go together, "
                             f"got {'seqlens' if self.page_size is None else 'page_size'} alone")
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or self.page_size < 1:
            fail(ValueError, f"page_size must be a positive int, got {self.page_size!r}")
        check_tensor("seqlens", self.seqlens)
        if self.seqlens.dim() != 1:
            fail(ValueError, f"seqlens must be an int32 (batch,) tensor, got shape {tuple(self.seqlens.shape)}")
        n = self.seqlens.shape[0]
        for name, t in (("seqlens", self.seqlens), ("cache_leftpad", self.cache_leftpad)):
            if t is not None:
                check_per_sequence(name, t, n)
                if t.device != device:
                    fail(ValueError, f"{name} is on {t.device}, the plan on {device}")
        if not isinstance(self.causal, bool):
            fail(TypeError, f"causal must be a bool, got {type(self.causal).__name__}")
        window_bounds(self.causal, self.window_size, 1)
        return n

    def fields(self) -> tuple[int, ...]:
        """(page_size, cache_leftpad given, causal, window left, window right), as the ranks compare
        them (-1s when they are not ints: the argument check reports those)."""
        try:
            left, right = (int(w) for w in self.window_size)
            return int(self.page_size or 0), int(self.cache_leftpad is not None), int(bool(self.causal)), left, right
        except (TypeError, ValueError):
            return (-1,) * 5
