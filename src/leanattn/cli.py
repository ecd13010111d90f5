"""leanattn demo and leanattn bench (also python -m leanattn ...)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import leanattn
from leanattn.bench.serving import PATTERNS
from leanattn.bench.shapes import SUITES, Shape, parse_shape

DEMO_SHAPES = "1x32k@8/1 1x128k@32/8 8x8k@32/8 1k+2k+4k+8k+16k+32k+64k+128k@32/8"
DEMO_METHODS = ["leanattn", "sdpa_flash", "sdpa_cudnn", "flashinfer", "flashinfer_tc", "fa2_varlen"]
DEFAULT_SUITES = {"eager": "eager", "graph": "serving"}


def _demo_cpu() -> int:
    """Under the Triton interpreter: one small ragged case against the float64 reference."""
    torch.manual_seed(0)
    lens = [0, 1, 31, 32, 33, 100]
    q = torch.randn(len(lens), 1, 8, 64, dtype=torch.bfloat16)
    k = torch.randn(len(lens), 128, 2, 64, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    programs = 7
    out, lse = leanattn.decode(q, k, v, seqlens, return_lse=True, num_programs=programs)
    ref, ref_lse = leanattn.reference.decode(q.double(), k.double(), v.double(), seqlens, return_lse=True)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    config = leanattn.choose_config(64, q.dtype, 4)
    tile = config.tile
    sched = leanattn.schedule.plan(lens, 2, tile, programs, config.target_share)
    print("no GPU: running the Triton kernel under the interpreter")
    print(f"ragged batch {lens}, 8 q heads / 2 kv heads, head_dim 64, bf16, {programs} programs, tile {tile}")
    for seg in sched.segments:
        kind = "whole" if seg.whole else f"partial -> slot {seg.slot}, merged via ticket {seg.ticket}"
        print(f"  program {seg.program}: seq {seg.batch} kv head {seg.kv_head} tiles [{seg.tile_start},{seg.tile_end}) {kind}")
    ok = err < 1.5e-2 and torch.isfinite(out).all().item()
    print(f"relative error vs float64 reference: {err:.2e} ({'ok' if ok else 'FAILED'})")
    return 0 if ok else 1


def _bench(shapes: list[Shape] | None, methods: list[str] | None, out_dir: Path | None, mode: str = "eager",
           suite: str | None = None, pattern: str = "append", rounds: int = 5) -> int:
    """Run ``shapes`` (or the suite named ``suite``, by default the mode's) on the GPU; the
    arguments are already validated. Exit status 1 when a method's output failed its check."""
    from leanattn.bench.run import failures, run_suite, serving_markdown, terminal_table, write
    from leanattn.bench.shapes import suite as suite_shapes

    if not shapes:
        suite = suite or DEFAULT_SUITES[mode]
    record = run_suite(shapes or suite_shapes(suite), methods or _methods(mode), torch.device("cuda"),
                       checkpoint=out_dir / "results.json" if out_dir else None, mode=mode, pattern=pattern,
                       rounds=rounds, suite=None if shapes else suite)
    print(f"{record['gpu']}: copy {record['copy_gbs']:.0f} GB/s, datasheet {record['datasheet_gbs'] or 'unknown'} GB/s")
    print(serving_markdown(record) if mode == "graph" else terminal_table(record))
    if out_dir:
        write(record, out_dir)
        print(f"wrote {out_dir}/results.json, results.md" + ("" if mode == "graph" else ", results.png"))
    failed = failures(record)
    for row in failed:
        print(f"{row['shape']} {row['method']}: {row['status']}", file=sys.stderr)
    return 1 if failed else 0


def _shape(text: str) -> Shape:
    """argparse type of ``--shapes``: a bad shape, or one leanattn.decode would refuse, is an
    argument error (exit 2) naming it and what is expected."""
    try:
        return parse_shape(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    """argparse type of ``--rounds``: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _methods(mode: str) -> list[str]:
    """Method names of a benchmark mode (importing the bench modules needs no GPU)."""
    from leanattn.bench.peers import METHODS
    from leanattn.bench.serving import SERVING_METHODS

    return list(SERVING_METHODS if mode == "graph" else METHODS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="leanattn", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {leanattn.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="{demo,bench}")
    sub.add_parser(
        "demo", help="a quick comparison on a GPU; a checked interpreter run without one",
        description="With a CUDA GPU: time leanattn against SDPA, FlashInfer and FA2 varlen on four shapes "
                    "(a short leanattn bench). Without one: run the Triton kernel under the interpreter on a "
                    "small ragged batch, print the stream-K schedule, and check the result against the "
                    "float64 reference (exit 1 if it disagrees).",
    )
    b = sub.add_parser(
        "bench", help="time leanattn and the peers on the benchmark suite (needs a CUDA GPU)",
        # The raw formatter keeps the epilog's lines, so the description carries its own breaks.
        description="Time leanattn and its peers in one process on the same inputs (needs a CUDA GPU).\n"
                    "Every argument is checked first: a shape leanattn.decode would refuse is an error.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(f"methods, --mode eager: {', '.join(_methods('eager'))}\n"
                f"methods, --mode graph: {', '.join(_methods('graph'))}\n"
                "suites:\n" + "\n".join(f"  {name}: {about}" for name, (about, _) in SUITES.items())),
    )
    b.add_argument("--mode", choices=("eager", "graph"), default="eager",
                   help="eager: single calls, L2 flushed (default); graph: serving mode, a CUDA graph replaying "
                        "a decode step's layers, each on its own KV, plus host time per call")
    b.add_argument("--shapes", nargs="+", type=_shape, metavar="SHAPE",
                   help="shapes like 1x32k@32/8:d=128:bf16:page=16 instead of a suite; graph mode also takes fp8, "
                        "q=N, win=N, softcap=X, sinks")
    b.add_argument("--suite", choices=tuple(SUITES), metavar="SUITE",
                   help="a named suite (listed below; default: eager in eager mode, serving in graph mode)")
    b.add_argument("--pattern", choices=PATTERNS,
                   help="graph mode: append (default): before each layer's attention a kernel writes its newest "
                        "K/V token and a fresh q, and every output is checked to include them; plain: the "
                        "layers' attention back to back")
    b.add_argument("--rounds", type=_positive, default=5,
                   help="rounds in which a shape's methods take turns; each reports its median round (default 5)")
    b.add_argument("--methods", nargs="+", metavar="METHOD", help="subset of the methods listed below (default: all)")
    b.add_argument("--out", type=Path, help="folder for results.json, results.md and (eager) results.png")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if not torch.cuda.is_available():
            return _demo_cpu()
        return _bench([parse_shape(s) for s in DEMO_SHAPES.split()], DEMO_METHODS, None)
    # Every argument error is reported (exit 2) before the GPU check: a typo should not read as a
    # missing GPU, and on a GPU it should stop the run before the suite starts, not midway.
    known = _methods(args.mode)
    unknown = sorted(set(args.methods or ()) - set(known))
    if unknown:
        b.error(f"unknown methods {unknown} for --mode {args.mode}; choose from {', '.join(known)}")
    if args.shapes and args.suite:
        b.error("give --shapes or --suite, not both")
    if args.mode == "eager" and args.pattern:
        b.error("--pattern is for --mode graph")
    featured = [s.name for s in args.shapes or () if s.has_features]
    if args.mode == "eager" and featured:
        b.error(f"shapes {featured}: model-feature options (fp8, q=, win=, softcap=, sinks) need --mode graph")
    if not torch.cuda.is_available():
        print("leanattn bench needs a CUDA GPU", file=sys.stderr)
        return 2
    return _bench(args.shapes, args.methods, args.out, args.mode, args.suite, args.pattern or "append", args.rounds)


if __name__ == "__main__":
    sys.exit(main())
