"""Launch configurations and product dtypes for fp8 caches, side by side (GPU only).

    python benchmarks/fp8_probe.py --shapes 8x32k@32/8:fp8 1x512k@32/8:fp8:page=16

For each shape and variant (the dtype the fp8 tiles are converted to for the two products; tile,
warps, stages, programs per SM, target share) it prints the µs per call of the plan/run wrapper
in CUDA-graph replay (the method of ``leanattn bench --mode graph``), the relative error of the
last layer against a float32 reference, and the compiled kernel's registers, spills and shared
memory. The same shape in bf16 runs first, with the shipped configuration, as the yardstick: an
fp8 cache reads half its bytes. ``--variants`` picks entries of VARIANTS by index; ``--asm DIR``
writes each variant's TTGIR, PTX and SASS there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

import leanattn
from serving_probe import graph_step, launch_config

# (product dtype, tile, warps, stages, programs per SM, target share); None: the shipped choice.
# The target share bounds the programs of small calls (the fewest whose shares stay within it).
VARIANTS: list[tuple | None] = [
    None,
    ("bf16", 64, 4, 3, 2, 4),
    ("fp16", 64, 4, 3, 2, 4),
    ("fp16", 128, 4, 3, 2, 4),
    ("fp16", 128, 4, 3, 2, 2),
    ("fp16", 128, 4, 3, 2, 1),
    ("fp16", 128, 8, 3, 2, 4),
    ("fp16", 128, 4, 2, 2, 4),
    ("fp16", 64, 4, 4, 2, 4),
    ("fp16", 128, 2, 3, 2, 4),
    ("fp16", 128, 4, 2, 3, 4),
    ("fp16", 128, 4, 4, 2, 4),
    ("fp16", 128, 4, 3, 1, 4),
]
_DOT = {"bf16": "bfloat16", "fp16": "float16"}


def dump_asm(compiled, folder: str, name: str) -> None:
    """The compiled kernel's Triton GPU IR, PTX and (where cuobjdump runs) SASS, in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    for kind in ("ttgir", "ptx"):
        with open(os.path.join(folder, f"{name}.{kind}"), "w") as f:
            f.write(str(compiled.asm[kind]))
    try:
        from triton.tools.disasm import get_sass
        with open(os.path.join(folder, f"{name}.sass"), "w") as f:
            f.write(get_sass(compiled.asm["cubin"]))
    except Exception as e:  # no cuobjdump on the path
        print(f"no SASS for {name}: {e}", file=sys.stderr)


def measure(text: str, variant: tuple | None, asm: str | None = None) -> dict:
    config = None
    if variant is not None:
        dot, tile, warps, stages, per_sm, share = variant
        config = launch_config(text, tile=tile, num_warps=warps, num_stages=stages, programs_per_sm=per_sm,
                               target_share=share, dot_dtype=_DOT[dot])
    r = graph_step(text, config)
    r["graph"].replay()
    torch.cuda.synchronize()
    x = r["layers"].xs[-1]  # the captured step returns the last layer's output
    ref = leanattn.reference.decode(x.q.float(), x.k.float(), x.v.float(), x.seqlens, block_table=x.block_table)
    if asm:
        tag = "shipped" if variant is None else "-".join(map(str, variant))
        dump_asm(r["compiled"], asm, re.sub(r"[^\w.-]+", "_", f"{text}-{tag}"))
    err = ((r["last"].float() - ref).norm() / ref.norm()).item()
    return dict(shape=text, variant=variant or "shipped", us=round(r["us"], 1), rel_err=float(f"{err:.2e}"),
                config=repr(config or launch_config(text)), regs=r["regs"], spills=r["spills"], smem=r["smem"],
                gbs=round(r["shape"].kv_bytes / r["us"] / 1e3, 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["8x32k@32/8:fp8", "1x512k@32/8:fp8:page=16",
                                                        "32x4k@32/8:fp8:page=16", "1x32k@8/1:fp8"])
    parser.add_argument("--out", help="folder for probe.json")
    parser.add_argument("--asm", help="folder for each variant's compiled kernel: TTGIR, PTX and SASS")
    parser.add_argument("--variants", type=int, nargs="+", help="indices into VARIANTS (default: all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("fp8_probe.py needs a CUDA GPU", file=sys.stderr)
        return 2
    print(torch.cuda.get_device_name())
    rows = []
    for text in args.shapes:
        base = text.replace(":fp8", "")
        chosen = VARIANTS if args.variants is None else [VARIANTS[i] for i in args.variants]
        for t, variants in ((base, [None]), (text, chosen)):
            for variant in variants:
                try:
                    row = measure(t, variant, args.asm)
                except Exception as e:  # a variant that does not compile or fit
                    row = dict(shape=t, variant=variant or "shipped", error=f"{type(e).__name__}: {str(e)[:160]}")
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "probe.json"), "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    print("\n| shape | variant | µs | GB/s | rel err | regs | spills | smem |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| `{r['shape']}` | {r['variant']} | {r['error']} |")
        else:
            print(f"| `{r['shape']}` | {r['variant']} | {r['us']} | {r['gbs']:.0f} | {r['rel_err']:.1e} | {r['regs']} | "
                  f"{r['spills']} | {r['smem']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
