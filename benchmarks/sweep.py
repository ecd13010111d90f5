"""Sweep launch configurations (tile, warps, stages, programs per SM) on a GPU.

Prints, per shape, the time of each configuration and the best; writes all rows as JSON lines to
the path given by --out. Used to set the heuristic in leanattn/kernels/config.py.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton.testing

import leanattn
from leanattn.bench.peers import make_inputs
from leanattn.bench.shapes import parse_shape
from leanattn.kernels.config import next_pow2

SHAPES = "1x32k@8/1 1x4k@32/8 1x128k@32/8 1x512k@32/8 8x32k@32/8 32x4k@32/8 1x16k@32/32 1x256k@32/32 4x16k@16/16:d=64 4x16k@32/8:d=256 4x8k@32/8:d=512 1k+2k+4k+8k+16k+32k+64k+128k@32/8 8x32k@32/8:page=16"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=SHAPES.split())
    ap.add_argument("--tiles", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--pps", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shares", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--out", default="sweep.jsonl")
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    with open(args.out, "w") as f:
        for text in args.shapes:
            shape = parse_shape(text)
            x = make_inputs(shape, torch.device("cuda"))
            ref = leanattn.reference.decode(x.q.float(), x.k, x.v, x.seqlens, block_table=x.block_table, compute_dtype=torch.float32)
            out = torch.empty_like(x.q)
            best = None
            for tile, warps, stages, pps, share in itertools.product(args.tiles, args.warps, args.stages, args.pps, args.shares):
                # Wide heads: no more than 256 KiB of 16-bit K+V tiles over all stages (64 x 256 tiles
                # take 64 KiB a stage): beyond, the config cannot fit shared memory.
                if shape.head_dim > 128 and tile * stages * next_pow2(shape.head_dim) > 256 * 256:
                    continue
                cfg = leanattn.KernelConfig(tile, warps, stages, pps, share)

                def fn():
                    leanattn.decode(x.q, x.k, x.v, x.seqlens, block_table=x.block_table, softmax_scale=x.scale,
                                    out=out, num_programs=sms * pps, config=cfg)

                try:
                    fn()
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    ms = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
                except Exception as e:  # out of resources etc.
                    print(f"{text} {cfg}: {type(e).__name__}")
                    continue
                gbs = shape.kv_bytes / ms / 1e6
                row = dict(shape=text, tile=tile, warps=warps, stages=stages, pps=pps, share=share, us=ms * 1e3, gbs=gbs, err=err)
                f.write(json.dumps(row) + "\n")
                if best is None or gbs > best["gbs"]:
                    best = row
            print(f"BEST {text:<40} tile {best['tile']:>3} warps {best['warps']} stages {best['stages']} pps {best['pps']} share {best['share']}: {best['us']:8.1f} us {best['gbs']:6.0f} GB/s err {best['err']:.1e}", flush=True)


if __name__ == "__main__":
    main()
