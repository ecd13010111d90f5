#!/usr/bin/env python3
"""A few leanattn calls that reach every kernel path, for compute-sanitizer (see sanitize.sh).

    PYTHONPATH=$PWD/src python3 benchmarks/sanitize_cases.py

Cases (14 leanattn kernel launches on a GPU; under a sanitizer every launch is slow):
  1. paged cache, page 16, odd lengths (0, 1, tile +- 1, ...) and a leftpad, head_dim 128;
  2. paged cache, page 1, odd lengths;
  3. one long head split over 40 programs and merged by the two-level tree (3 arrival chunks);
  4. out-of-range page ids in live slots of two sequences: their rows and LSE NaN, the rest right;
  5. DecodeWrapper: one plan, two layers' runs, strided (HF-layout) cache with leftpad;
  6. DecodeWrapper plan + run captured in a CUDA graph, replayed twice with new lengths and block
     tables (GPU only);
  7. fp8 paged cache with per-token K and V scales and out-of-range page ids in a live slot: the
     scales are read at their keys' pages and slots, never outside.

Inputs and float64 references are built on the CPU and copied over, so the GPU runs little but
leanattn's kernels. Nothing is allocated inside the graph capture: with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 (memcheck) every allocation is a cudaMalloc, which a capture
refuses. Every result is checked; exits 1 if any is wrong. Runs on the CPU too (Triton
interpreter, no graph case).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import leanattn  # noqa: E402  (sets TRITON_INTERPRET=1 without a GPU, before Triton loads)
from leanattn import schedule  # noqa: E402
from leanattn import choose_config  # noqa: E402
from leanattn.schedule import ARRIVE_CHUNK  # noqa: E402

from _util import LSE_TOL, TOL, to_paged  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Run:
    """Counts leanattn launches and collects what went wrong."""

    def __init__(self) -> None:
        self.launches = 0
        self.errors: list[str] = []

    def check(
        self, name: str, out: torch.Tensor, lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
        v: torch.Tensor, lens: list[int], pads: list[int] | None = None, nan_seqs: tuple[int, ...] = (),
        **scales: torch.Tensor,
    ) -> None:
        """Compare ``out`` (B,1,Hq,D) and ``lse`` (B,Hq) with the float64 reference over the dense
        CPU cache ``k``, ``v`` (B,N,Hkv,D) (and its CPU fp8 ``scales``); sequences in
        ``nan_seqs`` must be all NaN."""
        ref, ref_lse = leanattn.reference.decode(
            q.double(), k.double(), v.double(), _i32(lens, "cpu"), cache_leftpad=_i32(pads, "cpu"), return_lse=True,
            **scales,
        )
        out = out.cpu().double()
        lse = None if lse is None else lse.cpu()
        for b in range(out.shape[0]):
            where = f"{name}, sequence {b}"
            if b in nan_seqs:
                if not torch.isnan(out[b]).all() or (lse is not None and not torch.isnan(lse[b]).all()):
                    self.errors.append(f"{where}: an out-of-range page, but not all NaN")
                continue
            if not torch.isfinite(out[b]).all():
                self.errors.append(f"{where}: NaN/inf in the output (unwritten or broken)")
                continue
            denom = ref[b].norm().item()
            err = (out[b] - ref[b]).norm().item() / (denom if denom > 0 else 1.0)
            if not err < TOL[q.dtype]:
                self.errors.append(f"{where}: relative error {err:.2e} over {TOL[q.dtype]:.0e}")
            if lse is not None:
                empty = torch.isinf(ref_lse[b])
                diff = (lse[b][~empty] - ref_lse[b][~empty]).abs()
                if not torch.equal(torch.isneginf(lse[b]), empty) or (diff.numel() and not diff.max() < LSE_TOL):
                    self.errors.append(f"{where}: LSE differs from the reference")


def _i32(values: list[int] | None, device: torch.device | str = DEVICE) -> torch.Tensor | None:
    return None if values is None else torch.tensor(values, dtype=torch.int32, device=device)


def _rand(gen: torch.Generator, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def _nan_out(q: torch.Tensor) -> torch.Tensor:
    """A NaN-filled (B,1,Hq,D) output on the device (filled on the CPU: no GPU kernel)."""
    return torch.full(q.shape, math.nan, dtype=q.dtype).to(DEVICE)


def _qkv(gen, lens, hq, hkv, d, dtype, cap):
    """CPU q (B,1,Hq,D), k, v (B,cap,Hkv,D)."""
    b = len(lens)
    return _rand(gen, dtype, b, 1, hq, d), _rand(gen, dtype, b, cap, hkv, d), _rand(gen, dtype, b, cap, hkv, d)


def paged(run: Run, gen: torch.Generator, page: int, d: int, dtype: torch.dtype) -> None:
    """Cases 1 and 2: a paged cache with odd lengths (one launch)."""
    tile = choose_config(d, dtype, 4).tile
    lens = [0, 1, tile - 1, tile + 1, 3 * tile + 5, 17]
    pads = [0, 0, 3, 0, tile + 1, 17] if page == 16 else None
    cap = 4 * tile
    q, k, v = _qkv(gen, lens, 8, 2, d, dtype, cap)
    kp, vp, table = to_paged(k, v, lens, page, seed=page)
    out = _nan_out(q)
    _, lse = leanattn.decode(q.to(DEVICE), kp.to(DEVICE), vp.to(DEVICE), _i32(lens), block_table=table.to(DEVICE),
                             cache_leftpad=_i32(pads), out=out, return_lse=True, num_programs=7)
    run.launches += 1
    run.check(f"paged, page {page}, head_dim {d}", out, lse, q, k, v, lens, pads)


def tree(run: Run, gen: torch.Generator) -> None:
    """Case 3: one head of ~200 tiles over a grid of 40 programs, so its partials meet in 3
    arrival chunks of up to 16 and then in the chunk-level merge; a short second sequence shares
    the last program (a share crossing sequences). One launch."""
    d, dtype, grid = 128, torch.bfloat16, 40
    config = choose_config(d, dtype, 8)
    tile = config.tile
    lens = [200 * tile - 3, 5]
    tiles = [-(-n // tile) for n in lens]
    total = sum(tiles)
    programs = schedule.effective_programs(total, 2, False, grid, config.target_share)
    last = schedule.program_of_tile(tiles[0] - 1, total, programs)
    assert last + 1 > 2 * ARRIVE_CHUNK, f"only {last + 1} programs on the long head: fewer than 3 chunks"
    q, k, v = _qkv(gen, lens, 8, 1, d, dtype, lens[0])
    out = _nan_out(q)
    _, lse = leanattn.decode(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), _i32(lens), out=out, return_lse=True,
                             num_programs=grid)
    run.launches += 1
    run.check(f"tree merge over {last + 1} programs", out, lse, q, k, v, lens)


def bad_pages(run: Run, gen: torch.Generator) -> None:
    """Case 4: out-of-range ids in live slots of sequences 1 and 3 (-2^31, num_pages); heads
    split over 13 programs, so NaN partials go through merges. One launch."""
    d, dtype, page = 64, torch.float16, 16
    tile = choose_config(d, dtype, 4).tile
    lens = [40, 3 * tile + 5, 17, 2 * tile, 1]
    q, k, v = _qkv(gen, lens, 8, 2, d, dtype, 4 * tile)
    kp, vp, table = to_paged(k, v, lens, page, seed=4)
    table[1, 1] = -(2**31)
    table[3, 0] = kp.shape[0]
    out = _nan_out(q)
    _, lse = leanattn.decode(q.to(DEVICE), kp.to(DEVICE), vp.to(DEVICE), _i32(lens), block_table=table.to(DEVICE),
                             out=out, return_lse=True, num_programs=13)
    run.launches += 1
    run.check("out-of-range page ids", out, lse, q, k, v, lens, nan_seqs=(1, 3))


def wrapper(run: Run, gen: torch.Generator) -> None:
    """Case 5: DecodeWrapper, one plan and two layers' runs over an HF-layout (B,Hkv,N,D)
    cache seen as its transpose, with leftpad. Three launches."""
    d, dtype, hq, hkv = 128, torch.bfloat16, 16, 2
    tile = choose_config(d, dtype, hq // hkv).tile
    lens, pads = [0, 1, tile - 1, tile + 1, 4 * tile + 3], [0, 0, 3, tile, 2]
    cap = 5 * tile
    w = leanattn.DecodeWrapper(hq, hkv, d, dtype, DEVICE, num_programs=11)
    w.plan(_i32(lens), cap, cache_leftpad=_i32(pads))
    run.launches += 1
    for layer in range(2):
        q = _rand(gen, dtype, len(lens), 1, hq, d)
        k = _rand(gen, dtype, len(lens), hkv, cap, d).transpose(1, 2)
        v = _rand(gen, dtype, len(lens), hkv, cap, d).transpose(1, 2)
        out = _nan_out(q)
        _, lse = w.run(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), out=out, return_lse=True)
        run.launches += 1
        run.check(f"wrapper, layer {layer}", out, lse, q, k, v, lens, pads)


def graph(run: Run, gen: torch.Generator) -> None:
    """Case 6: a DecodeWrapper's plan and run over a paged cache captured in a CUDA graph (after
    one eager step), replayed with new lengths and block tables. Six launches."""
    d, dtype, hq, hkv, page = 128, torch.float16, 8, 8, 16
    tile = choose_config(d, dtype, 1).tile
    cap = 6 * tile
    steps = [[cap, 0, 7], [1, cap, 0], [tile + 1, tile - 1, cap - 1]]
    q, k, v = _qkv(gen, steps[0], hq, hkv, d, dtype, cap)
    # Every slot owns a page (any new length is valid); a step's dead slots get garbage ids.
    kp, vp, full = to_paged(k, v, [cap] * len(steps[0]), page, seed=6)

    def table_for(lens: list[int]) -> torch.Tensor:
        slots = torch.arange(full.shape[1])[None, :] * page
        live = slots < torch.tensor(lens)[:, None]
        return torch.where(live, full, torch.full_like(full, -7))  # on the CPU: copied over

    seqlens, table = _i32(steps[0]), table_for(steps[0]).to(DEVICE)
    qd, kd, vd, out = q.to(DEVICE), kp.to(DEVICE), vp.to(DEVICE), _nan_out(q)
    w = leanattn.DecodeWrapper(hq, hkv, d, dtype, DEVICE, paged=True)

    def step() -> None:
        w.plan(seqlens, cap)
        w.run(qd, kd, vd, block_table=table, out=out)  # no LSE: it would be allocated in the capture

    step()  # eager: compiles, and gives the run its direct launch
    run.launches += 2
    torch.cuda.synchronize()
    run.check("graph: eager step", out, None, q, k, v, steps[0])
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for i, lens in enumerate(steps[1:], 1):
        seqlens.copy_(_i32(lens, "cpu"))
        table.copy_(table_for(lens))
        out.copy_(torch.full(q.shape, math.nan, dtype=dtype))
        g.replay()
        run.launches += 2
        torch.cuda.synchronize()
        run.check(f"graph: replay {i}", out, None, q, k, v, lens)


def fp8_token_scales(run: Run, gen: torch.Generator) -> None:
    """Case 7: an fp8 e4m3 paged cache with per-token K and V scales (paged like the cache), an
    out-of-range id (10^6) in a live slot of sequence 1; heads split over 9 programs. One launch."""
    d, page, fp8 = 64, 16, torch.float8_e4m3fn
    tile = choose_config(d, fp8, 4).tile
    lens = [40, 3 * tile + 5, 17, 0]
    q, k, v = _qkv(gen, lens, 8, 2, d, torch.bfloat16, 4 * tile)
    k8, v8 = k.to(fp8), v.to(fp8)
    scales = 10 ** (torch.rand(*k.shape[:3], 2, generator=gen) * 4 - 3)  # K's and V's, 1e-3..10
    kp, vp, table = to_paged(k8, v8, lens, page, seed=7)
    sp, _, _ = to_paged(scales, scales, lens, page, seed=7)  # the same pages and table
    table[1, 1] = 10**6
    out = _nan_out(q)
    _, lse = leanattn.decode(q.to(DEVICE), kp.to(DEVICE), vp.to(DEVICE), _i32(lens), block_table=table.to(DEVICE),
                             k_scale=sp[..., 0].contiguous().to(DEVICE), v_scale=sp[..., 1].contiguous().to(DEVICE),
                             out=out, return_lse=True, num_programs=9)
    run.launches += 1
    run.check("fp8 per-token scales, out-of-range page id", out, lse, q, k8, v8, lens, nan_seqs=(1,),
              k_scale=scales[..., 0].contiguous(), v_scale=scales[..., 1].contiguous())


CASES: list[Callable[[Run, torch.Generator], None]] = [
    lambda r, g: paged(r, g, 16, 128, torch.bfloat16),
    lambda r, g: paged(r, g, 1, 64, torch.float16),
    tree,
    bad_pages,
    wrapper,
    graph,
    fp8_token_scales,
]


def main() -> int:
    run = Run()
    gen = torch.Generator().manual_seed(0)
    skipped = 0
    with torch.no_grad():
        for case in CASES:
            if case is graph and DEVICE.type != "cuda":
                skipped += 1  # no CUDA graphs under the interpreter
                continue
            case(run, gen)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    for e in run.errors:
        print(f"WRONG: {e}")
    skip = f", {skipped} skipped (no CUDA)" if skipped else ""
    print(f"sanitize cases: {len(CASES) - skipped} cases{skip}, {run.launches} leanattn launches, "
          f"{len(run.errors)} wrong results")
    return 1 if run.errors else 0


if __name__ == "__main__":
    sys.exit(main())
