"""Timing that host drift cannot decide: methods take turns over rounds, each reports its median
round; and the host's wall time per eager call.

A small call's time swings 2-3x between runs minutes apart (the host, clocks, other work), for
every method alike. Measured one method after another, such a swing lands on whichever method
runs then; measured in rounds where every method runs once, it lands on all of them, and each
method's median round leaves out the rounds it hit.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Hashable, Sequence, TypeVar

import torch

__all__ = ["bench_round", "host_calls", "host_us", "median_round", "take_turns", "turn_order"]

K = TypeVar("K", bound=Hashable)


def turn_order(n: int, r: int) -> list[int]:
    """The order of ``n`` names in round ``r``: row r of a Williams design. Row r is the sequence
    0, 1, n-1, 2, n-2, ... shifted by r (mod n), reversed in every other block of n rounds when n
    is odd. Over n rounds (2n when n is odd) each name runs first equally often and runs right
    after each other name equally often (a plain rotation would keep each name's predecessor)."""
    seq, lo, hi = [0], 1, n - 1
    while len(seq) < n:
        seq.append(lo)
        lo += 1
        if len(seq) < n:
            seq.append(hi)
            hi -= 1
    row = [(r + x) % n for x in seq]
    return row[::-1] if n % 2 and (r // n) % 2 else row


def take_turns(names: Sequence[K], rounds: int, measure: Callable[[K], float | None]) -> dict[K, list[float]]:
    """``rounds`` rounds in which each of ``names`` is measured once, in turn, in the orders of
    :func:`turn_order`, so no name always runs first or right after another one. Returns each
    name's samples in round order (a ``measure`` returning None adds no sample)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    samples: dict[K, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for i in turn_order(len(names), r):
            name = names[i]
            value = measure(name)
            if value is not None:
                samples[name].append(value)
    return samples


def median_round(samples: Sequence[float]) -> float:
    """The median of ``samples`` (the upper middle one of an even count, so always a measured
    value)."""
    if not samples:
        raise ValueError("median_round needs at least one sample")
    ordered = sorted(samples)
    return ordered[len(ordered) // 2]


def bench_round(fn: Callable[[], object]) -> float:
    """Milliseconds: one round's time of ``fn``, the median of ``triton.testing.do_bench``, which
    flushes L2 before every timed call (every method is timed this way)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=25, return_mode="median"))


def host_calls(ms: float, most: int = 200, gpu_ms: float = 20.0) -> int:
    """Calls for :func:`host_us` of a call of ``ms`` GPU milliseconds: ``most``, fewer for long
    calls (the queued GPU work stays about ``gpu_ms``), at least 10."""
    return max(10, min(most, int(gpu_ms / max(ms, 1e-6))))


def host_us(one_call: Callable[[], object], calls: int = 200, context: Callable[[], object] | None = None) -> float:
    """Wall microseconds per call of ``calls`` back-to-back eager calls, no sync between them
    (inside ``context()``, e.g. an SDPA backend choice, entered once as an engine would)."""
    with context() if context is not None else contextlib.nullcontext():
        for _ in range(10):
            one_call()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            one_call()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6
