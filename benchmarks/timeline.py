"""Where a serving call's time goes, per program: the decode kernel's own timestamps (GPU only).

The kernel built with ``TIMELINE`` (``KernelConfig(constexprs=(("TIMELINE", True),))``) writes
``%globaltimer`` at seven events per program (kernels/lean_decode.py, ``EV_*``). Here it runs in
serving mode: ``DecodeWrapper`` planned once per step and run per layer, every layer after the
append kernel that writes its newest token and q, the step replayed from a CUDA graph. The
stamps read after a replay are the last layer's call. In the same run: the same step without
stamps, SDPA on cuDNN and the plain read of the same bytes (``leanattn.bench.serving``).

    python benchmarks/timeline.py --shapes 1x32k@8/1 1x4k@32/8 4x8k@8/1 --out DIR

Columns, microseconds from the call's first program start (median over replays; "max": over
programs, then the median over replays): ``start`` (the last program's start: launch skew),
``waited`` (gdc_wait's end, median and max: the append kernel's finish), ``share`` (plan row read),
``1st tile`` (the first tile's scores: the first bytes' latency), ``streamed`` (the last tile's
scores, median and max), ``ticket`` (a cut head's member drew its chunk ticket, median), ``end``
(exit, median), ``span`` (the last exit); for the last program to exit, ``last ticket`` (its last
tile to its ticket: the partial's stores and the atomic) and ``last merge`` (its ticket to its
exit: the merge and the output's stores). With the merge kernel (``KernelConfig.merge_kernel``,
the default for heads of many programs) ``ticket`` is a member's partial stored, ``last merge``
its exit, and the merge itself runs in the second kernel, outside ``span``. ``call`` is the
per-call replay time, which also holds the append kernel, the merge kernel and the gaps between
kernels. ``--variants`` stamps other configs (tile,
stages, warps, grid) in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

import leanattn
from leanattn._testing import wrapper_calls
from leanattn.bench.append import launch_append, make_appends
from leanattn.bench.peers import capture_cuda_graph
from leanattn.bench.rounds import bench_round
from leanattn.bench.serving import layer_count, leanattn_step, make_layers, make_step, run_serving_shape
from leanattn.bench.shapes import Shape, parse_shape
from leanattn.kernels import lean_decode

# The kernel's event slots (kernels/lean_decode.py, EV_*), as column indices.
EV_START, EV_WAITED, EV_SHARE, EV_FIRST_TILE, EV_LAST_TILE, EV_TICKET, EV_EXIT = (e.value for e in (
    lean_decode.EV_START, lean_decode.EV_WAITED, lean_decode.EV_SHARE, lean_decode.EV_FIRST_TILE,
    lean_decode.EV_LAST_TILE, lean_decode.EV_TICKET, lean_decode.EV_EXIT))


def phases(stamps: torch.Tensor) -> dict[str, float]:
    """Per-call statistics in µs from one call's stamps (programs, EVENTS) int64 ns; programs
    without a share (no exit stamp) are left out. ``last ticket`` and ``last merge``: the last
    program to exit, from its last tile to its ticket and from its ticket to its exit (0 when it
    drew no ticket)."""
    ran = stamps[stamps[:, EV_EXIT] != 0]
    rel = (ran - ran[:, EV_START].min()).double() / 1e3
    cut = ran[:, EV_TICKET] != 0
    last = rel[rel[:, EV_EXIT].argmax()]
    drew = bool(ran[rel[:, EV_EXIT].argmax(), EV_TICKET] != 0)
    return {
        "programs": float(len(ran)),
        "start": rel[:, EV_START].max().item(),
        "waited": rel[:, EV_WAITED].median().item(), "waited max": rel[:, EV_WAITED].max().item(),
        "share": rel[:, EV_SHARE].median().item(),
        "1st tile": rel[:, EV_FIRST_TILE].median().item(),
        "streamed": rel[:, EV_LAST_TILE].median().item(), "streamed max": rel[:, EV_LAST_TILE].max().item(),
        "ticket": rel[cut, EV_TICKET].median().item() if cut.any() else 0.0,
        "end": rel[:, EV_EXIT].median().item(), "span": rel[:, EV_EXIT].max().item(),
        "last ticket": (last[EV_TICKET] - last[EV_LAST_TILE]).item() if drew else 0.0,
        "last merge": (last[EV_EXIT] - last[EV_TICKET]).item() if drew else 0.0,
    }


def variant(text: str) -> tuple[dict[str, object], int | None]:
    """``"tile=128,num_stages=2,programs=66"``: KernelConfig fields to replace
    (upper-case names: the kernel's compile-time parameters, into ``constexprs``) and the grid
    (``programs``; None: the default)."""
    fields = dict(kv.split("=") for kv in text.split(",") if kv)
    programs = fields.pop("programs", None)
    changes: dict[str, object] = {k: int(v) for k, v in fields.items() if not k.isupper()}
    constexprs = tuple((k, int(v)) for k, v in fields.items() if k.isupper())
    if constexprs:
        changes["constexprs"] = constexprs
    return changes, None if programs is None else int(programs)


def timeline(shape: Shape, replays: int, changes: dict[str, object], programs: int | None) -> dict[str, float]:
    """Median over ``replays`` graph replays of each statistic of :func:`phases`, and ``call``:
    the stamped step's per-call µs; the heuristic's config with ``changes``, on ``programs``
    programs (None: the config's grid)."""
    device = torch.device("cuda")
    layers = layer_count(shape)
    ls = make_layers(shape, device, layers)
    appends = make_appends(shape, ls.xs)
    base = leanattn.choose_config(shape.head_dim, ls.first.k.dtype, shape.q_len * shape.q_heads // shape.kv_heads,
                                  ls.first.block_table is not None, shape.split > 0,
                                  leanattn._call.large(device, len(shape.lens) * shape.kv_heads, max(shape.lens)))
    changes = dict(changes)
    constexprs = (("TIMELINE", True),) + tuple(changes.pop("constexprs", ()))
    config = replace(base, constexprs=constexprs, **changes)
    prepared = leanattn_step(shape, ls, config=config, num_programs=programs)
    graph, _ = capture_cuda_graph(make_step(prepared, layers, lambda i: launch_append(shape, ls.xs[i],
                                                                                       appends.fresh[i])))
    (call,) = wrapper_calls(prepared.wrapper)  # every layer has the same call key
    stats: dict[str, list[float]] = {}
    for _ in range(replays + 2):
        call.timeline.zero_()
        graph.replay()
        torch.cuda.synchronize()
        for k, v in phases(call.timeline.cpu()).items():
            stats.setdefault(k, []).append(v)
    row = {k: statistics.median(v[2:]) for k, v in stats.items()}  # the first replays warm up
    row["call"] = bench_round(graph.replay) / layers * 1e3
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1x32k@8/1", "1x4k@32/8", "4x8k@8/1"])
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=[""],
                        help="configs to stamp, each a row: the heuristic's with KernelConfig fields replaced "
                             "(\"num_stages=6,tile=128\"), and programs=N for the grid; \"\": the heuristic's")
    parser.add_argument("--out", type=Path, help="also write timeline.json here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("timeline.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    rows = []
    for text in args.shapes:
        shape = parse_shape(text)
        peers = run_serving_shape(shape, ["leanattn", "sdpa_cudnn", "read_floor"], device)
        same_run = {f"{p['method']} µs": p.get("ms", float("nan")) * 1e3 for p in peers}
        same_run["append µs"] = peers[0].get("append_us", float("nan"))
        for v in args.variants:
            rows.append({"shape": f"{text} {v}".strip(), **timeline(shape, args.replays, *variant(v)), **same_run})
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "timeline.json").write_text(json.dumps(rows, indent=1))
    print(f"{torch.cuda.get_device_name()}; serving mode (append pattern, graph replay); µs from the call's first "
          f"program start, median of {args.replays} replays")
    keys = [k for k in rows[0] if k != "shape"]
    width = max(len(r["shape"]) for r in rows) + 2
    print(f"{'shape':<{width}}" + "".join(f"{k:>14}" for k in keys))
    for r in rows:
        print(f"{r['shape']:<{width}}" + "".join(f"{r[k]:>14.0f}" if k == "programs" else f"{r[k]:>14.2f}"
                                                 for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
