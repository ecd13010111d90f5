"""The device workspace of split heads: fp32 partials and arrival tickets, grown on demand and
allocated outside CUDA-graph memory pools."""

from __future__ import annotations

import threading
from typing import Callable

import torch


def outside_graph_pools(device: torch.device, allocate: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """``allocate()``'s tensors, from the caching allocator's ordinary pool.

    torch.compile's ``mode="reduce-overhead"`` warms a graph up with the calling thread's
    allocations routed to the graph's private pool, and refuses the step if a tensor made there
    outlives it. The workspace outlives every step, so on CUDA it is allocated on a thread of its
    own (the routing is per thread), and that thread waits for its fill kernels, which ran on its
    own current stream."""
    if device.type != "cuda":
        return allocate()
    if device.index is None:  # the new thread's current device is device 0, not the caller's
        device = torch.device("cuda", torch.cuda.current_device())
    result: list = []

    def run() -> None:
        try:
            with torch.cuda.device(device):
                result.append(allocate())
                torch.cuda.current_stream().synchronize()
        except BaseException as e:  # re-raised on the caller's thread
            result.append(e)

    thread = threading.Thread(target=run, name="leanattn-workspace")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class Workspace:
    """fp32 partials and tickets for split heads, grown on demand.

    A call needs ``slots`` partial slots (rows x cols fp32, plus m and l) and as many head and
    chunk tickets: 2P for a grid of P programs (which uses P head tickets), or one per split in
    batch-invariant mode. Tickets are zero between calls: the merging program puts its ticket
    back. The merge kernel's jobs: 2 x ``slots`` int32, 4 a head (a call that uses them has at
    least two slots a head: at most one head a program, or in batch-invariant mode two splits or
    more; it writes every head's row, so they are never zeroed).

    Calls that read a plan draw their tickets from the upper half of the ticket buffer, the
    others from the lower half. A planned call on lengths changed since its plan breaks the
    plan's contract and can leave its tickets raised; kept apart, those tickets never reach the
    unplanned calls, and the next plan starts them at zero (:meth:`planned_tickets`).
    """

    def __init__(self) -> None:
        self.acc: torch.Tensor | None = None
        self.stats: torch.Tensor | None = None
        self.tickets: torch.Tensor | None = None
        self.jobs: torch.Tensor | None = None
        # Buffers replaced by larger ones stay alive: a CUDA graph captured earlier still
        # reads and writes them on every replay.
        self.retired: list[tuple[torch.Tensor, ...]] = []
        # The views get() returned, by (slots, rows, cols, planned): a call of a known size takes
        # one dict lookup (decode's host path); emptied when the buffers are replaced.
        self.views: dict[tuple[int, int, int, bool], tuple[torch.Tensor, ...]] = {}

    def get(self, device: torch.device, slots: int, rows: int, cols: int, planned: bool = False,
            ) -> tuple[torch.Tensor, ...]:
        """(acc, stats, head tickets, chunk tickets, jobs) for a call of ``slots`` slots of
        ``rows`` x ``cols``; ``planned``: the call reads a plan (its tickets are the upper half)."""
        views = self.views.get((slots, rows, cols, planned))
        if views is not None:
            return views
        chunk = -(-slots // 4) * 4
        # Tickets: two halves of 2 x chunk (head tickets, then chunk tickets), so a multiple of 16.
        need = (slots * rows * cols, slots * 2 * rows, 4 * chunk, 2 * slots)  # acc, stats, tickets, jobs
        have = (0, 0, 0, 0) if self.acc is None else tuple(x.numel() for x in (self.acc, self.stats, self.tickets, self.jobs))
        if any(n > h for n, h in zip(need, have)):
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "leanattn needs a larger workspace while a CUDA graph is being captured: make the same call "
                    "(leanattn.decode, or DecodeWrapper.plan with the largest batch and capacity) once before "
                    "capturing, or reserve it with leanattn.reserve_workspace"
                )
            if self.acc is not None:
                self.retired.append((self.acc, self.stats, self.tickets, self.jobs))
            self.views.clear()
            sizes = tuple(max(n, h) for n, h in zip(need, have))
            self.acc, self.stats, self.tickets, self.jobs = outside_graph_pools(device, lambda: (
                torch.empty(sizes[0], dtype=torch.float32, device=device),
                torch.empty(sizes[1], dtype=torch.float32, device=device),
                torch.zeros(sizes[2], dtype=torch.int32, device=device),
                torch.empty(sizes[3], dtype=torch.int32, device=device),
            ))
        # Head tickets first, then the chunk tickets (see the kernel's two-level arrival count),
        # from a 16-byte boundary: Triton specialises pointers on it, so any grid size reuses
        # one compiled kernel. (Every size is a multiple of 16, so the half is a multiple of 8.)
        base = self.tickets.numel() // 2 if planned else 0
        views = self.views[(slots, rows, cols, planned)] = (
            self.acc, self.stats, self.tickets[base : base + slots], self.tickets[base + chunk : base + chunk + slots],
            self.jobs)
        return views

    def planned_tickets(self) -> torch.Tensor | None:
        """The tickets that calls reading a plan draw (None before any call): a plan sets them to
        zero (``_plan.launch_plan``)."""
        return None if self.tickets is None else self.tickets[self.tickets.numel() // 2 :]


# One workspace per device for leanattn.decode: calls on different streams of a device must not
# overlap (give each stream its own DecodeWrapper, which owns its buffers). Not one per stream:
# a stream met first inside a CUDA-graph capture, or inside torch.compile's CUDA-graph warm-up,
# would get buffers from the graph's private memory pool.
WORKSPACES: dict[torch.device, Workspace] = {}


def workspace_for(device: torch.device) -> Workspace:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in WORKSPACES:
        WORKSPACES[device] = Workspace()
    return WORKSPACES[device]
