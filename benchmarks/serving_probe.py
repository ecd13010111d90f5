"""Variants of the serving path side by side (GPU only): launch paths, registers, PDL on and off.

    python benchmarks/serving_probe.py --shapes 1x32k@8/1 8x8k@32/8

Prints, for each shape, the µs per call of leanattn's wrapper in CUDA-graph replay (the same
method as ``leanattn bench --mode graph``) with programmatic dependent launch on and off and a
few target shares, the compiled kernel's registers and spills, and the host µs of one ``run`` and
of its parts.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

import leanattn
from leanattn import api
from leanattn.bench.peers import capture_cuda_graph
from leanattn.bench.run import _bench
from leanattn.bench.serving import host_us, layer_count, make_layers
from leanattn.bench.shapes import parse_shape


def _direct_launch_error(w, ls) -> str:
    """Why the wrapper's and decode's direct launches fail, if they do."""
    x = ls.first
    out = torch.empty_like(x.q)
    for _ in range(2):
        w.run(x.q, x.k, x.v, block_table=x.block_table, out=out)
        leanattn.decode(x.q, x.k, x.v, x.seqlens, block_table=x.block_table, out=out)
    return f"direct launches: {len(w._direct)}, errors: {api.DIRECT_LAUNCH_ERROR or 'none'}"


def step_time(shape_text: str, pdl: bool, share: int = 0) -> tuple[float, dict]:
    shape = parse_shape(shape_text)
    layers = layer_count(shape)
    ls = make_layers(shape, torch.device("cuda"), layers)
    x0 = ls.first
    w = leanattn.DecodeWrapper(shape.q_heads, shape.kv_heads, shape.head_dim, shape.dtype, x0.q.device)
    w._pdl = pdl
    if share:
        w._config = replace(w._config, target_share=share)
    capacity = x0.k.shape[1] * (x0.block_table.shape[1] if x0.block_table is not None else 1)
    outs = [torch.empty_like(x.q) for x in ls.xs]

    def step():
        w.plan(x0.seqlens, capacity)
        for x, out in zip(ls.xs, outs):
            w.run(x.q, x.k, x.v, block_table=x.block_table, out=out)
        return outs

    graph, _ = capture_cuda_graph(step)
    us = _bench(graph.replay) / layers * 1e3
    info = {}
    compiled = [c for c, _ in w._direct.values()][-1]
    info["regs"] = getattr(compiled, "n_regs", None)
    info["spills"] = getattr(compiled, "n_spills", None)
    info["smem"] = compiled.metadata.shared
    info["host_run_us"] = host_us(lambda: w.run(x0.q, x0.k, x0.v, block_table=x0.block_table, out=outs[0]))
    info["direct"] = _direct_launch_error(w, ls) if pdl else ""
    del graph
    return us, info


def host_parts(shape_text: str) -> dict[str, float]:
    """Host µs of the pieces of a run call."""
    shape = parse_shape(shape_text)
    ls = make_layers(shape, torch.device("cuda"), 1)
    x = ls.first
    out = torch.empty_like(x.q)

    def t(fn) -> float:
        return host_us(fn, calls=2000)

    dev = x.q.device
    return {
        "stride x3": t(lambda: (x.q.stride(), x.k.stride(), x.v.stride())),
        "data_ptr x4": t(lambda: (x.q.data_ptr(), x.k.data_ptr(), x.v.data_ptr(), out.data_ptr())),
        "device x4": t(lambda: (x.q.device, x.k.device, x.v.device, out.device)),
        "stream handle": t(lambda: api.current_stream_handle(dev)),
        "empty_like": t(lambda: torch.empty_like(x.q)),
    }


# (programmatic dependent launch, target share; 0 = the configured one), the first repeated last
# to show the spread between runs of one variant
VARIANTS = [(True, 0), (False, 0), (True, 2), (True, 8), (True, 0)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1x32k@8/1", "1x4k@32/8", "8x8k@32/8"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("serving_probe.py needs a CUDA GPU", file=sys.stderr)
        return 2
    print(torch.cuda.get_device_name())
    print("Triton 3.6 C launch form:", api._C_LAUNCH)

    print("host parts (µs):", {k: round(v, 2) for k, v in host_parts(args.shapes[0]).items()})
    for text in args.shapes:
        for pdl, share in VARIANTS:
            us, info = step_time(text, pdl, share)
            direct = info.pop("direct")
            print(f"{text:<20} pdl={pdl!s:<5} share={share} {us:7.1f} µs/call  {info}")
            if direct:
                print("   direct launch:", direct)
    return 0


if __name__ == "__main__":
    sys.exit(main())
