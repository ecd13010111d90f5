"""Context-parallel decode on two GPUs: local attention and merge, eager and in a CUDA graph,
against one GPU holding the whole cache.

    PYTHONPATH=$PWD/src python benchmarks/context_parallel.py --out $OUT/context_parallel

Starts one process per GPU (NCCL, torch.multiprocessing spawn). For each shape (batch x q/kv
heads x tokens per GPU; bf16, head dim 128) every rank builds the same full cache of
world x tokens per GPU from one seed and attends over its contiguous share of it (which tokens a
rank holds doesn't change the time; round-robin pages only change which ones). It reports, as
the slowest rank's mean over many calls:

- local: the rank's ``DecodeWrapper.run`` with the LSE over its share (planned once);
- merge: packing, the exchange and ``merge_states`` (``all_gather``, the default), and the
  alternatives: ``all_to_all`` by heads (``scatter_heads``), and ``exchange="symmetric"``: one
  kernel pushing every rank's partial into the others' torch symmetric memory (no multicast),
  waiting for theirs and merging;
- total: ``ContextParallelDecode.run`` (local + merge), with either exchange;
- one GPU: ``leanattn.DecodeWrapper.run`` over the whole cache on one GPU (each rank runs it on
  its own GPU);
- speedup = one GPU / total, efficiency = speedup / world, both from the CUDA-graph times.

Every number is eager (host launches in the loop) and replayed from a CUDA graph. NVLink
multicast stays off in every process (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1). ``--smoke`` runs tiny shapes on the CPU over gloo (no graphs, no
symmetric memory) to check the script itself.
"""

from __future__ import annotations

import os

# Before torch.distributed is imported, in this process and (inherited) in every worker.
os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

K = 1024
# (batch, q_heads, kv_heads, tokens per GPU)
SHAPES = [
    (1, 32, 8, 128 * K), (1, 32, 8, 512 * K), (1, 32, 8, 1024 * K),
    (8, 32, 8, 128 * K), (8, 32, 8, 512 * K), (8, 32, 8, 1024 * K),
    (1, 8, 1, 1024 * K),
]
SMOKE_SHAPES = [(1, 8, 2, 96), (2, 8, 1, 64)]
HEAD_DIM = 128
SMOKE_HEAD_DIM = 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bench:
    """Times callables on every rank and reports the slowest rank's mean, in microseconds."""

    def __init__(self, device: torch.device, target_s: float) -> None:
        self.device, self.target_s = device, target_s
        self.cuda = device.type == "cuda"

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        dist.barrier()

    def _mean_us(self, fn: Callable[[], object], iters: int) -> float:
        self._sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            us = start.elapsed_time(end) * 1e3 / iters
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            us = (time.perf_counter() - t0) * 1e6 / iters
        worst = torch.tensor([us], dtype=torch.float64, device=self.device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return float(worst.item())

    def time(self, fn: Callable[[], object]) -> float:
        """Mean µs a call: a warm-up, a short run to size the loop, then ~target_s of calls (the
        same count on every rank, so collectives pair up)."""
        fn()
        first = self._mean_us(fn, 3)
        iters = int(min(max(self.target_s * 1e6 / max(first, 1.0), 5), 500))
        return self._mean_us(fn, iters)

    def graph(self, fn: Callable[[], object]) -> Callable[[], None]:
        """``fn`` captured in a CUDA graph (after warm-ups on a side stream), as a replay callable."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        # thread_local: the NCCL watchdog thread's calls can't invalidate this thread's capture.
        with torch.cuda.graph(g, capture_error_mode="thread_local"):
            fn()
        torch.cuda.synchronize()
        return g.replay


def _measure(bench: Bench, shape: tuple, head_dim: int, rank: int, world: int, smoke: bool) -> dict:
    import leanattn
    from leanattn.distributed import ContextParallelDecode

    batch, hq, hkv, n = shape
    dev, dt = bench.device, torch.bfloat16
    row: dict = {"batch": batch, "q_heads": hq, "kv_heads": hkv, "tokens_per_gpu": n, "head_dim": head_dim,
                 "kv_gib_per_gpu": 2 * batch * n * hkv * head_dim * dt.itemsize / 2**30}
    full_bytes = 2 * batch * world * n * hkv * head_dim * dt.itemsize
    free = torch.cuda.mem_get_info(dev)[0] if bench.cuda else 2**40
    whole = full_bytes < 0.85 * free  # one GPU can hold everything: build it and slice it
    row["one_gpu_fits"] = whole
    gen = torch.Generator(device=dev).manual_seed(((batch * 131 + hq) * 17 + hkv) * 1_000_003 + n)
    q = torch.randn(batch, 1, hq, head_dim, generator=gen, device=dev, dtype=dt)
    span = world * n if whole else n
    k = torch.randn(batch, span, hkv, head_dim, generator=gen, device=dev, dtype=dt)
    v = torch.randn(batch, span, hkv, head_dim, generator=gen, device=dev, dtype=dt)
    lo = rank * n if whole else 0
    lk, lv = k[:, lo : lo + n], v[:, lo : lo + n]  # views: the rank's contiguous share
    local = torch.full((batch,), n, dtype=torch.int32, device=dev)

    cp = ContextParallelDecode(None, hq, hkv, head_dim, dt, dev)
    cp.plan(local, n)
    cps = ContextParallelDecode(None, hq, hkv, head_dim, dt, dev, scatter_heads=True)
    cps.plan(local, n)
    cpx = None
    if bench.cuda:
        try:
            cpx = ContextParallelDecode(None, hq, hkv, head_dim, dt, dev, exchange="symmetric")
            cpx.plan(local, n)
        except Exception as e:  # noqa: BLE001  (reported, not fatal)
            row["merge_symm_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            cpx = None
    out, lse_out = torch.empty_like(q), torch.empty(batch, hq, 1, device=dev)
    out_s = torch.empty(batch, 1, hq // world, head_dim, device=dev, dtype=dt)
    lse_s_out = torch.empty(batch, hq // world, 1, device=dev)
    lse = cp.attend(q, lk, lv)
    lse_s = cps.attend(q, lk, lv)

    fns: dict[str, Callable[[], object]] = {
        "local": lambda: cp.attend(q, lk, lv),
        "merge_allgather": lambda: cp.merge(lse, out, lse_out),
        "merge_scatter": lambda: cps.merge(lse_s, out_s, lse_s_out),
        "total": lambda: cp.run(q, lk, lv, out=out),
    }
    if cpx is not None:
        out_m, lse_m = torch.empty_like(out), torch.empty_like(lse_out)
        lse_x = cpx.attend(q, lk, lv)
        fns["merge_symm"] = lambda: cpx.merge(lse_x, out_m, lse_m)
        fns["total_symm"] = lambda: cpx.run(q, lk, lv, out=out_m)

    # Check the merges before timing them: every variant against the all_gather result.
    cp.run(q, lk, lv, out=out)
    fns["merge_scatter"]()
    mine = slice(rank * (hq // world), (rank + 1) * (hq // world))
    row["scatter_same_bits"] = bool(torch.equal(out_s, out[:, :, mine]))
    if "merge_symm" in fns:
        fns["merge_symm"]()
        row["symm_same_bits"] = bool(torch.equal(out_m, out) and torch.equal(lse_m, cp.planned[-1].lse_scratch))
    if whole:
        single = leanattn.decode(q, k, v, torch.full((batch,), world * n, dtype=torch.int32, device=dev))
        err = ((out.float() - single.float()).norm() / single.float().norm()).item()
        row["rel_err_vs_one_gpu"] = err
        # The same plan/run path as each rank's local attention, on the whole cache.
        one = leanattn.DecodeWrapper(hq, hkv, head_dim, dt, dev)
        one.plan(None, world * n, batch=batch)
        fns["one_gpu"] = lambda: one.run(q, k, v, out=single)

    for name, fn in fns.items():
        row[f"{name}_eager_us"] = bench.time(fn)
        if bench.cuda:
            try:
                row[f"{name}_graph_us"] = bench.time(bench.graph(fn))
            except Exception as e:  # noqa: BLE001
                row[f"{name}_graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    mode = "graph" if bench.cuda else "eager"
    if f"one_gpu_{mode}_us" in row and f"total_{mode}_us" in row:
        row["speedup"] = row[f"one_gpu_{mode}_us"] / row[f"total_{mode}_us"]
        row["efficiency"] = row["speedup"] / world
    if f"merge_allgather_{mode}_us" in row:
        row["merge_pct_of_local"] = 100 * row[f"merge_allgather_{mode}_us"] / row[f"local_{mode}_us"]
    if f"merge_symm_{mode}_us" in row:
        row["symm_merge_pct_of_local"] = 100 * row[f"merge_symm_{mode}_us"] / row[f"local_{mode}_us"]
    if f"one_gpu_{mode}_us" in row and f"total_symm_{mode}_us" in row:
        row["symm_speedup"] = row[f"one_gpu_{mode}_us"] / row[f"total_symm_{mode}_us"]
    return row


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    smoke = args.smoke
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group("gloo" if smoke else "nccl", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}", device_id=None if smoke else device,
                            timeout=datetime.timedelta(seconds=180))  # a stuck collective fails, not hangs
    bench = Bench(device, 0.01 if smoke else args.seconds)
    rows = []
    try:
        for shape in SMOKE_SHAPES if smoke else SHAPES:
            t0 = time.time()
            row = _measure(bench, shape, SMOKE_HEAD_DIM if smoke else HEAD_DIM, rank, world, smoke)
            row["wall_s"] = time.time() - t0
            rows.append(row)
            if rank == 0:
                print(f"{_name(row)}: done in {row['wall_s']:.1f} s", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if rank == 0:
            meta = {"world_size": world, "torch": torch.__version__, "backend": dist.get_backend(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"}
            results.put(("ok", meta, rows))
    except BaseException:  # noqa: BLE001
        results.put(("error", rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def _name(row: dict) -> str:
    n = row["tokens_per_gpu"]
    tokens = f"{n // (1024 * K)}M" if n % (1024 * K) == 0 else f"{n // K}k" if n % K == 0 else str(n)
    return f"{row['batch']}x{row['q_heads']}/{row['kv_heads']}@{tokens}"


def _fmt(row: dict, key: str, digits: int = 1) -> str:
    e, g = row.get(f"{key}_eager_us"), row.get(f"{key}_graph_us")
    parts = [f"{x:.{digits}f}" if isinstance(x, float) else "-" for x in (e, g)]
    return " / ".join(parts)


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"Context-parallel decode, {meta['world_size']} x {meta['device']}, torch {meta['torch']}, {meta['backend']}; "
        f"bf16, head dim {rows[0]['head_dim'] if rows else 128}; µs as eager / CUDA graph, the slowest rank's mean.",
        "",
        "| shape (per GPU) | KV GiB/GPU | local | merge all_gather | merge all_to_all by heads | merge symmetric "
        "| total | total symmetric | one GPU (whole cache) | speedup (all_gather, symmetric) | efficiency "
        "| merge % of local (all_gather, symmetric) | rel err vs one GPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        symm = _fmt(r, "merge_symm") if "merge_symm_eager_us" in r else f"n/a ({r.get('merge_symm_error', 'not run')})"
        lines.append(
            f"| {_name(r)} | {r['kv_gib_per_gpu']:.2f} | {_fmt(r, 'local')} | {_fmt(r, 'merge_allgather')} | "
            f"{_fmt(r, 'merge_scatter')} | {symm} | {_fmt(r, 'total')} | {_fmt(r, 'total_symm')} | "
            f"{_fmt(r, 'one_gpu')} | {r.get('speedup', float('nan')):.2f}x, {r.get('symm_speedup', float('nan')):.2f}x | "
            f"{100 * r.get('efficiency', float('nan')):.0f}% | {r.get('merge_pct_of_local', float('nan')):.1f}%, "
            f"{r.get('symm_merge_pct_of_local', float('nan')):.1f}% | {r.get('rel_err_vs_one_gpu', float('nan')):.1e} |"
        )
    by_name = {_name(r): r for r in rows}
    # Targets on two GPUs (graph): the merge <= 5% of the local attention at 1 x 32/8 x 128k and
    # 1 x 8/1 x 1M per GPU, and >= 1.9x one GPU at 1 x 32/8 with 256k tokens in all.
    for name in ("1x32/8@128k", "1x8/1@1M"):
        r = by_name.get(name, {})
        if "merge_pct_of_local" in r:
            lines.append(f"\nTarget merge <= 5% of local ({name} per GPU): all_gather {r['merge_pct_of_local']:.1f}%, "
                         f"symmetric {r.get('symm_merge_pct_of_local', float('nan')):.1f}% "
                         f"(of {r.get('local_graph_us', float('nan')):.1f} µs)")
    r = by_name.get("1x32/8@128k", {})
    if "speedup" in r:
        lines.append(f"\nTarget >= 1.9x one GPU at 256k tokens in all (1x32/8, 128k per GPU): all_gather "
                     f"{r['speedup']:.2f}x, symmetric {r.get('symm_speedup', float('nan')):.2f}x")
    notes = [r for r in rows if not r.get("scatter_same_bits", True) or not r.get("symm_same_bits", True)]
    for r in notes:
        lines.append(f"\n{_name(r)}: a merge variant differs from the all_gather result "
                     f"(scatter same bits: {r.get('scatter_same_bits')}, symm same bits: {r.get('symm_same_bits')})")
    errors = {k: v for r in rows for k, v in r.items() if k.endswith("_error")}
    for k, v in errors.items():
        lines.append(f"\n{k}: {v}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for results.json and results.md")
    parser.add_argument("--world", type=int, default=2, help="processes (GPUs)")
    parser.add_argument("--seconds", type=float, default=0.25, help="timed seconds per measurement")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU over gloo (checks the script)")
    args = parser.parse_args()
    if not args.smoke and torch.cuda.device_count() < args.world:
        print(f"needs {args.world} CUDA GPUs, found {torch.cuda.device_count()} (or pass --smoke)", file=sys.stderr)
        return 2
    t0 = time.time()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, args, results)) for r in range(args.world)]
    for p in procs:
        p.start()
    status = results.get()
    if status[0] != "ok":
        print(f"rank {status[1]} failed:\n{status[2]}", file=sys.stderr)
        for p in procs:  # the others may be waiting in a collective for the failed rank
            p.join(timeout=20)
            if p.is_alive():
                p.terminate()
        return 1
    for p in procs:
        p.join()
    _, meta, rows = status
    meta["wall_s"] = time.time() - t0
    md = markdown(meta, rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(md)
    print(f"\n(total {meta['wall_s']:.0f} s)\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
