"""What the benchmark's timing allows: an empty kernel and plain streaming reads (GPU only).

Times, like ``leanattn bench`` (L2 flushed before each call, lowest of three ``do_bench``
medians), an empty kernel and the best of 24 launch configurations of a Triton kernel that only
reads a bf16 buffer and sums it, for several sizes, plus ``torch.sum`` on the same buffer:

    python benchmarks/read_floor.py --mib 16 64 128 1024

No attention kernel can beat the plain read of the same bytes timed this way.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

from leanattn.bench.run import bench_median


@triton.jit
def _empty(X):
    tl.store(X + tl.program_id(0), 1.0)


@triton.jit
def _stream(X, Y, n_per, BLOCK: tl.constexpr):
    """Program p sums elements [p * n_per, (p + 1) * n_per) of X, BLOCK at a time."""
    pid = tl.program_id(0)
    base = X + pid.to(tl.int64) * n_per
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, n_per, BLOCK):
        acc += tl.load(base + i + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(Y + pid, tl.sum(acc, 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, nargs="+", default=[16, 64, 128, 1024])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("read_floor.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {sms} SMs; microseconds")
    y = torch.zeros(32 * sms, device=dev)
    print(f"empty kernel, {sms} programs: {1e3 * bench_median(lambda: _empty[(sms,)](y)):.1f}")
    for mib in args.mib:
        n = mib * 2**20 // 2
        x = torch.randn(n, device=dev, dtype=torch.bfloat16)
        best = None
        for per_sm in (1, 2, 4, 8, 16, 32):
            for block, warps in ((1024, 4), (2048, 4), (4096, 8), (8192, 8)):
                programs = per_sm * sms
                per = n // programs // block * block
                if per == 0:
                    continue
                us = 1e3 * bench_median(lambda: _stream[(programs,)](x, y, per, BLOCK=block, num_warps=warps))
                gbs = programs * per * 2 / us / 1e3
                if best is None or gbs > best[0]:
                    best = (gbs, us, programs, block, warps)
        gbs, us, programs, block, warps = best
        total = 1e3 * bench_median(lambda: x.sum())
        print(f"read {mib} MiB: {us:.1f} ({gbs:.0f} GB/s; {programs} programs, {block} a step, {warps} warps); torch.sum {total:.1f}")
        del x
    return 0


if __name__ == "__main__":
    sys.exit(main())
