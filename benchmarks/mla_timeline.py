"""Where an MLA call's time goes inside mla_gluon's kernels, per program phase (Hopper only).

The uniform and fp8 Gluon kernels built with ``MLAConfig(timeline=True)`` count SM clocks
(``%clock64``) by phase into a row of 16 a program (``kernels/mla_gluon.py``,
``TIMELINE_PHASES``): the tile wait, the conversion (fp8) or the zeroing of dead rows, the
scores, the softmax and p, the output product, a segment's start and write, and for the
warp-specialised fp8 kernel its converting warpgroups' loads, their wait for a free buffer and
their stores. The call runs in serving mode as ``benchmarks/mla.py`` runs it (``MLAWrapper``
planned once a step, each layer its own cache, the step replayed from a CUDA graph); the counts
read after the replays are the last layer's call. In the same run the step without counts gives
the call's time, so the counts' own cost shows.

    python benchmarks/mla_timeline.py --shapes 4x32k@16 4x32k@16:fp8 16x4k@16 --out DIR

Columns (median over the programs that had a share): clocks a tile of each phase, and each
phase's share of the program's total; ``call µs`` with and without the counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mla as bench  # noqa: E402  (benchmarks/mla.py: shapes and layers)

import leanattn  # noqa: E402
from leanattn._testing import mla_heuristic  # noqa: E402
from leanattn.kernels.mla_gluon import TIMELINE_PHASES  # noqa: E402


def step_of(shape: bench.Shape, xs, lens, table, timeline: bool):
    """A serving step (plan, then every layer's run) on a wrapper whose config counts or not."""
    rows = shape.q_len * shape.q_heads
    config = dataclasses.replace(mla_heuristic(bench.D, bench.DV, xs[0].kv.dtype, rows, lens.device), gluon=True,
                                 timeline=timeline)
    w = leanattn.MLAWrapper(shape.q_heads, bench.D, bench.DV, torch.bfloat16, lens.device, max_q_len=shape.q_len,
                            kv_dtype=xs[0].kv.dtype, softmax_scale=bench.SCALE, config=config)
    kw = {"kv_scale": 1.0} if shape.fp8 else {}
    capacity = table.shape[1] * shape.page
    outs = [torch.empty(*x.q.shape[:3], bench.DV, dtype=torch.bfloat16, device=lens.device) for x in xs]

    def step():
        w.plan(lens, capacity, q_len=shape.q_len)
        for x, o in zip(xs, outs):
            w.run(x.q, x.kv, block_table=table, out=o, **kw)
        return outs[0]

    return w, step


def measure(shape: bench.Shape, replays: int) -> dict:
    from leanattn.bench.peers import capture_cuda_graph
    from leanattn.bench.run import bench_median

    xs, lens, table, kv_bytes = bench.make_step(shape, torch.device("cuda"))
    row: dict = {"shape": str(shape).replace("Shape", ""), "kv_mib": kv_bytes / 2**20}
    for timeline in (False, True):
        w, step = step_of(shape, xs, lens, table, timeline)
        graph, _ = capture_cuda_graph(step)
        row["call_us" + ("_counted" if timeline else "")] = bench_median(graph.replay) * 1e3 / len(xs)
    (call,) = w._calls.values()
    if call.timeline is None:
        row["skip"] = "no counted Gluon kernel takes this call"
        return row
    row["kernel"] = "fp8 (warp-specialised)" if call.gluon_fp8 else "uniform"
    samples = []
    for _ in range(replays):
        call.timeline.zero_()
        graph.replay()
        torch.cuda.synchronize()
        counts = call.timeline.cpu()
        samples += [r for r in counts.tolist() if r[0] > 0 and r[8] > 0]  # programs with tiles
    for i, name in enumerate(TIMELINE_PHASES):
        if name in ("unused", "tiles") or not any(r[i] for r in samples):
            continue
        row[f"{name}: clocks a tile"] = statistics.median(r[i] / r[8] for r in samples)
        row[f"{name}: share"] = statistics.median(r[i] / r[0] for r in samples)
    row["tiles a program"] = statistics.median(r[8] for r in samples)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="*", default=["4x32k@16", "4x32k@16:fp8", "16x4k@16", "16x4k@16:fp8"])
    parser.add_argument("--replays", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write mla_timeline.json here")
    args = parser.parse_args(argv)
    shapes = [bench.parse_shape(s) for s in args.shapes]
    if not torch.cuda.is_available():
        sys.exit("benchmarks/mla_timeline.py reads GPU kernels' clocks: no CUDA device here")
    torch.manual_seed(0)
    rows = []
    for shape in shapes:
        with torch.inference_mode():
            rows.append(measure(shape, args.replays))
        torch.cuda.empty_cache()
    for row in rows:
        print(f"\n{row['shape']}: {row.get('kernel', row.get('skip'))}, call {row['call_us']:.1f} µs "
              f"({row['call_us_counted']:.1f} counted), {row.get('tiles a program', 0):.0f} tiles a program")
        for key, value in row.items():
            if key.endswith(": clocks a tile"):
                name = key[: -len(": clocks a tile")]
                print(f"  {name:28s} {value:9.0f} clocks a tile  {100 * row[name + ': share']:5.1f}%")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "mla_timeline.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
