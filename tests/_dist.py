"""A small pool of torch.distributed worker processes for the tests.

``Cluster(world, backend)`` starts ``world`` spawned processes that join one process group and
then run named functions of ``_dist_scenarios`` on request, every rank at once, sending back
each rank's result or exception. Collecting results has a deadline, so a test whose ranks hang
fails (and the pool is torn down) instead of hanging the run.

This module imports nothing heavy at the top: a worker sets its environment (the Triton
interpreter, NCCL's switches) before torch and leanattn are imported.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from dataclasses import dataclass
from typing import Any

# Keep NVLink multicast (NVLS) off in every process, whatever the machine offers.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Outcome:
    rank: int
    ok: bool
    value: Any = None
    error_type: str = ""
    message: str = ""
    trace: str = ""


def _serve(rank: int, world: int, port: int, backend: str, commands, results) -> None:
    os.environ.update(NO_MULTICAST)
    if backend == "gloo":
        os.environ["TRITON_INTERPRET"] = "1"  # before leanattn (and Triton) are imported
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import datetime

    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=60))
    import _dist_scenarios

    while True:
        cmd = commands.get()
        if cmd is None:
            break
        name, args = cmd
        try:
            value = getattr(_dist_scenarios, name)(rank, world, *args)
            results.put(Outcome(rank, True, value))
        except BaseException as e:  # noqa: BLE001  (sent back to the test, which reports it)
            results.put(Outcome(rank, False, None, type(e).__name__, str(e), traceback.format_exc()))
    dist.destroy_process_group()


class Cluster:
    """``world`` worker processes in one process group (``backend`` gloo on CPU, nccl on GPUs)."""

    def __init__(self, world: int, backend: str = "gloo") -> None:
        import torch.multiprocessing as mp

        os.environ.update(NO_MULTICAST)  # inherited by the workers from their start
        ctx = mp.get_context("spawn")
        self.world = world
        self.commands = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [
            ctx.Process(target=_serve, args=(r, world, port, backend, self.commands[r], self.results), daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self.broken = False

    def run(self, name: str, *args: Any, timeout: float = 180.0) -> list[Outcome]:
        """Run ``_dist_scenarios.<name>(rank, world, *args)`` on every rank; outcomes by rank."""
        if self.broken:
            raise RuntimeError("an earlier scenario hung or crashed the worker pool")
        for c in self.commands:
            c.put((name, args))
        got: dict[int, Outcome] = {}
        try:
            while len(got) < self.world:
                o = self.results.get(timeout=timeout)
                got[o.rank] = o
        except queue.Empty:
            self.broken = True
            self.close(force=True)
            raise TimeoutError(f"{name}: ranks {sorted(set(range(self.world)) - set(got))} gave no answer in "
                               f"{timeout:.0f} s (a hang)") from None
        return [got[r] for r in range(self.world)]

    def check(self, name: str, *args: Any, timeout: float = 180.0) -> list[Any]:
        """Like ``run``, but every rank must succeed; returns their values."""
        outcomes = self.run(name, *args, timeout=timeout)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise AssertionError("\n".join(f"rank {o.rank}: {o.error_type}: {o.message}\n{o.trace}" for o in failed))
        return [o.value for o in outcomes]

    def close(self, force: bool = False) -> None:
        if not force:
            for c in self.commands:
                c.put(None)
            for p in self.procs:
                p.join(timeout=30)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
