"""MLA decode on the GPU: leanattn.mla_decode / MLAWrapper against FlashInfer's MLA decode and a
split-KV Triton MLA decode of the kind engines' Triton backends carry (``mla_split_peer.py``).

    python benchmarks/mla.py --shapes 1x32k@16 4x8k@128 16x4k@16:fp8 128x1152@128:page=1 6x4k~@64
    python benchmarks/mla.py --probe        # compile report (registers, spills, shared memory)

A shape is ``BATCHxCONTEXT@Q_HEADS`` with options ``:q=N`` (query tokens, default 1),
``:page=P`` (default 64), ``:fp8`` (e4m3 cache, scale 1), ``:apart`` (leanattn reads the latent
and the rope part from two tensors, ``rope_cache``, as FlashInfer does) and ``~`` after the context for a ragged
batch (lengths drawn uniformly in [1, 2 x context], same total). The cache is DeepSeek-V3's:
576 values a token (512 latent, 64 rope), softmax scale 1/sqrt(192).

Every method's output is first checked against the float64 reference (layer 0). Two modes:
eager (one layer's call, timed with triton's do_bench, L2 flushed) and serving (a CUDA graph of
``layers`` calls, each layer with its own cache, >= 256 MiB touched per replay; leanattn plans
inside the graph, FlashInfer plans on the host before capture as engines do). The table gives
µs per call, the KV bytes' GB/s and leanattn's speed-up (FlashInfer time / leanattn time).
Imports without a GPU or FlashInfer (the methods that cannot run say why).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import random
import re
import sys
from dataclasses import dataclass

import torch

import leanattn

D, DV = 576, 512
SCALE = 192**-0.5
MIN_STEP_BYTES = 256 * 2**20
DEFAULT_SHAPES = ("1x32k@16 1x128k@16 4x8k@128 16x4k@16 128x1152@128 64x4k@128 32x16k@64 "
                  "8x8k~@16 32x4k~@128 4x32k@16:fp8 64x4k@128:fp8 16x4k@16:page=1")


@dataclass(frozen=True)
class Shape:
    batch: int
    context: int
    q_heads: int
    q_len: int = 1
    page: int = 64
    fp8: bool = False
    ragged: bool = False
    apart: bool = False

    def lengths(self, seed: int = 0) -> list[int]:
        if not self.ragged:
            return [self.context] * self.batch
        rng = random.Random(seed)
        return [rng.randint(1, 2 * self.context) for _ in range(self.batch)]


def parse_shape(text: str) -> Shape:
    m = re.fullmatch(r"(\d+)x(\d+)(k?)(~?)@(\d+)((?::[a-z0-9=]+)*)", text)
    if not m:
        raise ValueError(f"shape {text!r} is not BATCHxCONTEXT[k][~]@Q_HEADS[:q=N][:page=P][:fp8][:apart]")
    opts = dict(o.split("=") if "=" in o else (o, "1") for o in m.group(6).split(":") if o)
    unknown = set(opts) - {"q", "page", "fp8", "apart"}
    if unknown:
        raise ValueError(f"shape {text!r}: unknown options {sorted(unknown)}")
    return Shape(int(m.group(1)), int(m.group(2)) * (1024 if m.group(3) else 1), int(m.group(5)),
                 int(opts.get("q", 1)), int(opts.get("page", 64)), "fp8" in opts, bool(m.group(4)), "apart" in opts)


@dataclass
class Layer:
    q: torch.Tensor  # (batch, q_len, q_heads, 576)
    kv: torch.Tensor  # pages (num_pages, page, 1, 576)


def make_step(shape: Shape, device: torch.device):
    """(layers, lengths, block table, KV bytes a call reads): each layer has its own pages."""
    lens = shape.lengths()
    page = shape.page
    pages_of = [-(-n // page) for n in lens]
    width = max(pages_of)
    kv_bytes = sum(lens) * D * (1 if shape.fp8 else 2)
    layers = max(2, min(64, math.ceil(MIN_STEP_BYTES / max(kv_bytes, 1))))
    table = torch.zeros(shape.batch, width, dtype=torch.int32)
    perm = torch.randperm(sum(pages_of))
    at = 0
    for b, n in enumerate(pages_of):
        table[b, :n] = perm[at:at + n]
        at += n
    xs = []
    for _ in range(layers):
        kv = torch.randn(sum(pages_of), page, 1, D, device=device, dtype=torch.bfloat16)
        xs.append(Layer(torch.randn(shape.batch, shape.q_len, shape.q_heads, D, device=device, dtype=torch.bfloat16),
                        kv.to(torch.float8_e4m3fn) if shape.fp8 else kv))
    return xs, torch.tensor(lens, dtype=torch.int32, device=device), table.to(device), kv_bytes


class Unsupported(Exception):
    pass


def leanattn_method(shape: Shape, xs, lens, table, gluon: bool = True):
    """(eager call of layer 0, serving step of every layer): mla_decode, and MLAWrapper plan + runs.
    ``gluon=False`` (method ``leanattn_triton``): the Triton kernel alone, where the heuristic's
    config would take ``kernels/mla_gluon.py``'s kernel on Hopper; its eager call is a plan and a run."""
    kw = {"kv_scale": 1.0} if shape.fp8 else {}
    capacity = table.shape[1] * shape.page
    # :apart: the latent and the rope part as two tensors (made once, outside the timed calls).
    caches = [(x.kv[..., :DV].contiguous(), x.kv[..., DV:].contiguous()) if shape.apart else (x.kv, None) for x in xs]
    config = None
    if not gluon:
        from leanattn._testing import mla_heuristic

        config = dataclasses.replace(mla_heuristic(D, DV, xs[0].kv.dtype, shape.q_len * shape.q_heads, lens.device),
                                     gluon=False)
    w = leanattn.MLAWrapper(shape.q_heads, D, DV, torch.bfloat16, lens.device, max_q_len=shape.q_len,
                            kv_dtype=xs[0].kv.dtype, softmax_scale=SCALE, config=config)

    def eager():
        latent, rope = caches[0]
        if not gluon:
            w.plan(lens, capacity, q_len=shape.q_len)
            return w.run(xs[0].q, latent, rope_cache=rope, block_table=table, **kw)
        return leanattn.mla_decode(xs[0].q, latent, lens, rope_cache=rope, block_table=table, softmax_scale=SCALE,
                                   **kw)

    outs = [torch.empty(*x.q.shape[:3], DV, dtype=torch.bfloat16, device=lens.device) for x in xs]

    def step():
        w.plan(lens, capacity, q_len=shape.q_len)
        for x, o, (latent, rope) in zip(xs, outs, caches):
            w.run(x.q, latent, rope_cache=rope, block_table=table, out=o, **kw)
        return outs[0]

    return eager, step


def flashinfer_method(shape: Shape, xs, lens, table):
    """FlashInfer 0.5's BatchMLAPagedAttentionWrapper on the same pages and block table (q_len
    tokens a request as its qo_indptr rows, causal)."""
    try:
        import flashinfer
    except ImportError as e:
        raise Unsupported(f"flashinfer not installed ({e})")
    device = lens.device
    batch, q_len = shape.batch, shape.q_len
    pages_of = (lens + shape.page - 1) // shape.page
    kv_indptr = torch.cat([torch.zeros(1, dtype=torch.int32, device=device), pages_of.cumsum(0).int()])
    kv_indices = torch.cat([table[b, :int(pages_of[b])] for b in range(batch)]).int()
    qo_indptr = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=device)
    w = flashinfer.mla.BatchMLAPagedAttentionWrapper(torch.empty(256 * 2**20, dtype=torch.int8, device=device))
    w.plan(qo_indptr, kv_indptr, kv_indices, lens, shape.q_heads, DV, D - DV, shape.page, True, SCALE,
           torch.bfloat16, xs[0].kv.dtype)
    # Its own tensors, as its API takes them: q_nope and q_pe, and the latent and rope caches
    # (the same bytes as the 576-wide pages).
    views = [(x.q.reshape(batch * q_len, shape.q_heads, D)[..., :DV].contiguous(),
              x.q.reshape(batch * q_len, shape.q_heads, D)[..., DV:].contiguous(),
              x.kv[:, :, 0, :DV].contiguous(), x.kv[:, :, 0, DV:].contiguous()) for x in xs]
    outs = [torch.empty(batch * q_len, shape.q_heads, DV, dtype=torch.bfloat16, device=device) for _ in xs]

    def call(i):
        q_nope, q_pe, ckv, kpe = views[i]
        w.run(q_nope, q_pe, ckv, kpe, out=outs[i])
        return outs[i].view(batch, q_len, shape.q_heads, DV)

    def step():
        for i in range(len(xs)):
            call(i)
        return outs[0].view(batch, q_len, shape.q_heads, DV)

    return (lambda: call(0)), step


def triton_split_method(shape: Shape, xs, lens, table):
    """``mla_split_peer.split_mla_decode``: the split-KV Triton MLA decode of serving engines'
    Triton backends (16 heads a program, 8 uniform splits, a reduce launch); one query token,
    16-bit caches."""
    if shape.q_len != 1 or shape.fp8:
        raise Unsupported("one query token and a 16-bit cache only")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from mla_split_peer import split_mla_decode

    batch, heads = shape.batch, shape.q_heads
    splits = 8
    workspace = torch.empty(batch * heads * splits * (DV + 1), dtype=torch.float32, device=lens.device)
    outs = [torch.empty(batch, 1, heads, DV, dtype=torch.bfloat16, device=lens.device) for _ in xs]

    def call(i):
        out = split_mla_decode(xs[i].q[:, 0], xs[i].kv, lens, table, head_dim_v=DV, softmax_scale=SCALE, splits=splits,
                               workspace=workspace)
        return out[:, None]

    def step():
        for i, o in enumerate(outs):
            o.copy_(call(i))
        return outs[0]

    return (lambda: call(0)), step


METHODS = {"leanattn": leanattn_method, "leanattn_triton": functools.partial(leanattn_method, gluon=False),
           "flashinfer": flashinfer_method, "triton_split": triton_split_method}


def check(shape: Shape, out: torch.Tensor, x: Layer, lens, table) -> float:
    """Relative error of layer 0's output against the float64 reference (fp8: its scale 1)."""
    kv = x.kv if shape.fp8 else x.kv.double()
    ref = leanattn.reference.mla_decode(x.q.double(), kv, lens, block_table=table, head_dim_v=DV,
                                        softmax_scale=SCALE, kv_scale=1.0 if shape.fp8 else None)
    return ((out.double() - ref).norm() / ref.norm()).item()


def run_shape(shape: Shape, methods: list[str], device: torch.device) -> list[dict]:
    from leanattn.bench.peers import capture_cuda_graph
    from leanattn.bench.run import bench_median

    xs, lens, table, kv_bytes = make_step(shape, device)
    rows = []
    for name in methods:
        row = {"shape": shape, "method": name, "layers": len(xs), "kv_mib": kv_bytes / 2**20}
        try:
            eager, step = METHODS[name](shape, xs, lens, table)
            row["err"] = check(shape, eager(), xs[0], lens, table)
            row["eager_us"] = bench_median(eager) * 1e3
            graph, _ = capture_cuda_graph(step)
            row["graph_us"] = bench_median(graph.replay) * 1e3 / len(xs)
        except Unsupported as e:
            row["skip"] = str(e)
        except Exception as e:  # a peer that cannot take this shape: say why, keep going
            row["skip"] = f"{type(e).__name__}: {e}"[:120]
        rows.append(row)
    return rows


def table_lines(rows: list[dict]) -> list[str]:
    lines = ["| shape | method | KV MiB | rel err | eager µs | graph µs | GB/s (graph) | vs FlashInfer (graph) |",
             "|---|---|---|---|---|---|---|---|"]
    graph_of = {(str(r["shape"]), r["method"]): r.get("graph_us") for r in rows}
    for r in rows:
        label = str(r["shape"]).replace("Shape", "")
        if "skip" in r:
            lines.append(f"| {label} | {r['method']} | {r['kv_mib']:.0f} | – | – | – | – | {r['skip']} |")
            continue
        peer = graph_of.get((str(r["shape"]), "flashinfer"))
        ratio = f"{peer / r['graph_us']:.2f}x" if peer and r["method"] == "leanattn" else ""
        gbs = r["kv_mib"] * 2**20 / (r["graph_us"] * 1e-6) / 1e9
        lines.append(f"| {label} | {r['method']} | {r['kv_mib']:.0f} | {r['err']:.1e} | {r['eager_us']:.1f} | "
                     f"{r['graph_us']:.1f} | {gbs:.0f} | {ratio} |")
    return lines


def probe(device: torch.device) -> None:
    """Compile report of the heuristic's configs and nearby ones: registers a thread, spilled
    registers and shared memory, per (q_heads, q_len, cache dtype)."""
    import dataclasses

    from leanattn._mla_call import heuristic

    print("| q_heads x q_len | kv | block | tile | warps | stages | regs | spills | smem KiB | µs (1x8k) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for hq, q_len in ((16, 1), (128, 1), (64, 1), (16, 4)):
        for fp8 in (False, True):
            shape = Shape(1, 8192, hq, q_len, fp8=fp8)
            xs, lens, table, _ = make_step(shape, device)
            base = heuristic(D, DV, xs[0].kv.dtype, hq * q_len, device)
            variants = [base] + [dataclasses.replace(base, tile=t, num_warps=w, num_stages=s)
                                 for t in (32, 64) for w in (4, 8) for s in (1, 2, 3)
                                 if (t, w, s) != (base.tile, base.num_warps, base.num_stages)]
            for config in variants:
                w = leanattn.MLAWrapper(hq, D, DV, torch.bfloat16, device, max_q_len=q_len, kv_dtype=xs[0].kv.dtype,
                                        config=config)
                try:
                    w.plan(lens, table.shape[1] * 64, q_len=q_len)
                    run = lambda: w.run(xs[0].q, xs[0].kv, block_table=table, kv_scale=1.0 if fp8 else None)
                    run()
                    kernel = next(c.hit[0] for c in w._calls.values() if c.hit is not None)
                    from leanattn.bench.run import bench_median
                    us = bench_median(run, repeats=1) * 1e3
                    print(f"| {hq} x {q_len} | {'fp8' if fp8 else 'bf16'} | {config.block_rows} | {config.tile} | "
                          f"{config.num_warps} | {config.num_stages} | {kernel.n_regs} | {kernel.n_spills} | "
                          f"{kernel.metadata.shared / 1024:.0f} | {us:.1f} |{' (heuristic)' if config is base else ''}")
                except Exception as e:
                    print(f"| {hq} x {q_len} | {'fp8' if fp8 else 'bf16'} | {config.block_rows} | {config.tile} | "
                          f"{config.num_warps} | {config.num_stages} | – | – | – | {type(e).__name__}: {str(e)[:60]} |")
            sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES.split())
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--probe", action="store_true", help="compile report of the launch configs instead")
    args = parser.parse_args(argv)
    shapes = [parse_shape(s) for s in args.shapes]  # parse errors before anything runs
    if not torch.cuda.is_available():
        sys.exit("benchmarks/mla.py times GPU kernels: no CUDA device here")
    device = torch.device("cuda")
    torch.manual_seed(0)
    if args.probe:
        probe(device)
        return
    rows = []
    for shape in shapes:
        with torch.inference_mode():
            rows += run_shape(shape, args.methods, device)
        torch.cuda.empty_cache()
    print("\n".join(table_lines(rows)))


if __name__ == "__main__":
    main()
