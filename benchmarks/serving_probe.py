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
from leanattn.bench.peers import capture_cuda_graph
from leanattn.bench.rounds import host_us
from leanattn.bench.run import bench_median
from leanattn.bench.serving import layer_count, leanattn_step, make_layers, make_step
from leanattn.bench.shapes import parse_shape


def launch_config(shape_text: str, **changes) -> leanattn.KernelConfig:
    """The heuristic's launch config for the shape, with ``changes`` (KernelConfig fields)."""
    shape = parse_shape(shape_text)
    kv_dtype = torch.float8_e4m3fn if shape.fp8 else shape.dtype
    rows = shape.q_len * (shape.q_heads // shape.kv_heads)
    big = leanattn._call.large(torch.device("cuda"), len(shape.lens) * shape.kv_heads, max(shape.lens))
    return replace(leanattn.choose_config(shape.head_dim, kv_dtype, rows, shape.page_size > 0, shape.split > 0, big),
                   **changes)


def graph_step(shape_text: str, config: leanattn.KernelConfig | None = None) -> dict:
    """The bench's leanattn method (plan once, run each layer; the plain pattern) on ``shape_text``
    with ``config``, captured in a CUDA graph: µs per call, the last layer's inputs and output, the
    wrapper and its compiled kernel's registers, spills and shared memory."""
    shape = parse_shape(shape_text)
    layers = layer_count(shape)
    ls = make_layers(shape, torch.device("cuda"), layers)
    prepared = leanattn_step(shape, ls, config)
    w = prepared.wrapper
    graph, last = capture_cuda_graph(make_step(prepared, layers))
    us = bench_median(graph.replay) / layers * 1e3
    # The decode kernel the graph runs (not the merge kernel, nor an eager form's decode kernel).
    from leanattn._testing import wrapper_calls

    hits = [call.hit for call in wrapper_calls(w) if call.hit is not None]
    compiled = hits[-1][0] if hits else None
    return dict(us=us, shape=shape, layers=ls, last=last, wrapper=w, one_call=prepared.one_call, graph=graph,
                compiled=compiled, regs=getattr(compiled, "n_regs", None), spills=getattr(compiled, "n_spills", None),
                smem=compiled.metadata.shared if compiled is not None else None)


def step_time(shape_text: str, pdl: bool, share: int = 0) -> tuple[float, dict]:
    changes = dict(pdl=pdl, **({"target_share": share} if share else {}))
    r = graph_step(shape_text, launch_config(shape_text, **changes))
    info = {key: r[key] for key in ("regs", "spills", "smem")}
    info["host_run_us"] = host_us(r["one_call"])
    info["direct"] = "yes" if r["wrapper"].compiled_kernels else "no (Triton's bound launch)"
    return r["us"], info


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
        "stream handle": t(lambda: torch.cuda.current_stream(dev).cuda_stream),
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

    print("host parts (µs):", {k: round(v, 2) for k, v in host_parts(args.shapes[0]).items()})
    for text in args.shapes:
        for pdl, share in VARIANTS:
            us, info = step_time(text, pdl, share)
            direct = info.pop("direct")
            print(f"{text:<20} pdl={pdl!s:<5} share={share} {us:7.1f} µs/call  {info}")
            print("   direct launch:", direct)
    return 0


if __name__ == "__main__":
    sys.exit(main())
