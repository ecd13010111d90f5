"""Variants of the serving path side by side (GPU only): launch paths, registers, PDL on and off.

    python benchmarks/serving_probe.py --shapes 1x32k@8/1 8x8k@32/8

Prints, for each shape, the µs per call of leanattn's wrapper in CUDA-graph replay (the same
method as ``leanattn bench --mode graph``) with programmatic dependent launch on and off and a
few target shares, the compiled kernel's registers and spills, and the host µs of one ``run`` and
of its parts.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import replace
from typing import Callable, Iterator

import torch

import leanattn
from leanattn import api, wrapper
from leanattn.bench.peers import capture_cuda_graph
from leanattn.bench.run import _bench
from leanattn.bench.serving import _leanattn, host_us, layer_count, make_layers
from leanattn.bench.shapes import parse_shape
from leanattn.kernels.config import KernelConfig


def _direct_launch_error(w, ls) -> str:
    """Why the wrapper's and decode's direct launches fail, if they do."""
    x = ls.first
    out = torch.empty_like(x.q)
    for _ in range(2):
        w.run(x.q, x.k, x.v, block_table=x.block_table, out=out)
        leanattn.decode(x.q, x.k, x.v, x.seqlens, block_table=x.block_table, out=out)
    return f"direct launches: {len(w._direct)}, errors: {api.DIRECT_LAUNCH_ERROR or 'none'}"


@contextlib.contextmanager
def launch_override(
    config: Callable[[KernelConfig], KernelConfig] | None = None, dot=None, extra: dict | None = None,
) -> Iterator[None]:
    """Inside: the launch heuristic's choice passed through ``config``, the products in ``dot``
    (a triton.language dtype) and the kernel's other compile-time parameters in ``extra``, for
    the wrappers made, planned and run there."""
    choose, constexprs = api.choose_config, wrapper.kernel_constexprs
    if config is not None:
        api.choose_config = lambda *a, **kw: config(choose(*a, **kw))
    changes = dict(extra or {}, **({"DOT_DTYPE": dot} if dot is not None else {}))
    if changes:
        wrapper.kernel_constexprs = lambda *a, **kw: dict(constexprs(*a, **kw), **changes)
    api._static_config.cache_clear()
    try:
        yield
    finally:
        api.choose_config, wrapper.kernel_constexprs = choose, constexprs
        api._static_config.cache_clear()


def graph_step(shape_text: str, pdl: bool | None = None) -> dict:
    """The bench's leanattn method (plan once, run each layer) on ``shape_text``, captured in a
    CUDA graph: µs per call, the last layer's inputs and output, the wrapper and its compiled
    kernel's registers, spills and shared memory. Call inside ``launch_override`` to vary it."""
    shape = parse_shape(shape_text)
    layers = layer_count(shape)
    ls = make_layers(shape, torch.device("cuda"), layers)
    step, one_call = _leanattn(shape, ls)
    w = step.wrapper
    if pdl is not None:
        w._pdl = pdl
    graph, last = capture_cuda_graph(step)
    us = _bench(graph.replay) / layers * 1e3
    compiled = [c for c, _ in w._direct.values()][-1]
    return dict(us=us, shape=shape, layers=ls, last=last, wrapper=w, one_call=one_call, graph=graph,
                compiled=compiled, regs=getattr(compiled, "n_regs", None), spills=getattr(compiled, "n_spills", None),
                smem=compiled.metadata.shared)


def step_time(shape_text: str, pdl: bool, share: int = 0) -> tuple[float, dict]:
    with launch_override(config=(lambda c: replace(c, target_share=share)) if share else None):
        r = graph_step(shape_text, pdl)
        info = {key: r[key] for key in ("regs", "spills", "smem")}
        info["host_run_us"] = host_us(r["one_call"])
        info["direct"] = _direct_launch_error(r["wrapper"], r["layers"]) if pdl else ""
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
