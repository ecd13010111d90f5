"""Where a call's time goes, per program: timestamps from inside the kernel (GPU only).

Builds a copy of the decode kernel that records ``%globaltimer`` when each program starts, when it
has located its share, after its last tile and when it exits, plus the SM it ran on, and prints
per-phase statistics over repeated calls (L2 flushed before each):

    python benchmarks/timeline.py --shapes 1x32k@8/1 8x32k@32/8

Columns, in microseconds from the first program's start: ``locate`` (start -> share located,
median), ``stream`` (located -> last tile done, median and max), ``tail`` (last tile -> exit: partial
stores, arrival counting and any merge; median and max), ``end`` (exit; 10th percentile, median,
max). The kernel's span is the max ``end``; compare it with the event-timed call.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

import leanattn
from leanattn.bench.peers import make_inputs
from leanattn.bench.shapes import parse_shape

_STAMPS = '''
@triton.jit
def _stamp(Lse, batch, stride_lb, pid, k):
    """Low 32 bits of %globaltimer (ns) into the int32 area after the LSE block."""
    t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    tl.store(Lse.to(tl.pointer_type(tl.int32)) + batch * stride_lb + pid * 8 + k, t.to(tl.int32))
    if k == 0:
        sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)
        tl.store(Lse.to(tl.pointer_type(tl.int32)) + batch * stride_lb + pid * 8 + 7, sm)

'''


def instrumented_kernel():
    """The decode kernel with four timestamps per program (see the module docstring)."""
    src = Path(leanattn.__file__).with_name("kernels").joinpath("lean_decode.py").read_text()

    def insert_after(text: str, anchor: str, line: str) -> str:
        i = text.index(anchor) + len(anchor)
        return text[:i] + line + text[i:]

    src = src.replace("@triton.jit\ndef _attend_tiles", _STAMPS.lstrip("\n") + "\n@triton.jit\ndef _attend_tiles", 1)
    stamp = "_stamp(Lse, batch, stride_lb, pid, {})\n"
    src = insert_after(src, "    pid = tl.program_id(0)\n", "    " + stamp.format(0))
    src = src.replace("    if pid >= programs:\n", "    " + stamp.format(1) + "    if pid >= programs:\n", 1)
    call = src.index("acc, m_i, l_i = _attend_tiles(")
    indent = src[src.rindex("\n", 0, call) + 1 : call]
    src = insert_after(src, src[call : src.index(")\n", call) + 2], indent + stamp.format(2))
    src = src.rstrip("\n") + "\n    " + stamp.format(3)
    path = Path(tempfile.mkdtemp()) / "lean_decode_timed.py"
    path.write_text(src)
    # A module of the kernels package, so the copy's relative imports find the real modules.
    spec = importlib.util.spec_from_file_location("leanattn.kernels.lean_decode_timed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.lean_decode_kernel


def timeline(text: str, reps: int, kernel) -> dict[str, float]:
    """Median over ``reps`` calls of each per-call statistic, in microseconds, with ``kernel``."""
    shape = parse_shape(text)
    x = make_inputs(shape, torch.device("cuda"))
    out = torch.empty_like(x.q)
    heuristic = leanattn.choose_config(shape.head_dim, x.k.dtype, shape.q_heads // shape.kv_heads)
    config = replace(heuristic, kernel=kernel)
    grid = leanattn.default_num_programs(x.q.device, config)
    lse_area = shape.batch * shape.q_heads
    buf = torch.zeros(lse_area + 8 * grid, dtype=torch.float32, device=x.q.device)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=x.q.device)
    calls = []
    for i in range(reps + 2):
        flush.zero_()
        buf.zero_()
        # The LSE block, then the timestamps the instrumented kernel writes after it.
        lse = buf[:lse_area].view(shape.batch, shape.q_heads, 1)
        leanattn.decode(x.q, x.k, x.v, x.seqlens, block_table=x.block_table, softmax_scale=x.scale, out=out,
                        lse=lse, return_lse=True, num_programs=grid, config=config)
        torch.cuda.synchronize()
        if i >= 2:  # the first calls compile and warm up
            calls.append(buf[lse_area:].view(torch.int32).view(grid, 8).long().cpu())
    stats: dict[str, list[float]] = {}
    for t in calls:
        ran = t[t[:, 3] != 0]
        rel = ((ran[:, :4] - ran[:, 0].min()) % 2**32).double() / 1e3  # wraps of the low 32 bits
        start, located, streamed, end = rel.unbind(1)
        phases = {
            "programs": float(len(ran)), "locate": (located - start).median(),
            "stream": (streamed - located).median(), "stream max": (streamed - located).max(),
            "tail": (end - streamed).median(), "tail max": (end - streamed).max(),
            "end p10": end.quantile(0.1), "end": end.median(), "end max": end.max(),
        }
        for k, v in phases.items():
            stats.setdefault(k, []).append(float(v))
    return {k: statistics.median(v) for k, v in stats.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1x32k@8/1", "1x4k@32/8", "8x32k@32/8"])
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("timeline.py needs a CUDA GPU", file=sys.stderr)
        return 2
    kernel = instrumented_kernel()
    print(f"{torch.cuda.get_device_name()}; microseconds from the first program's start, median of {args.reps} calls")
    rows = [(text, timeline(text, args.reps, kernel)) for text in args.shapes]
    keys = list(rows[0][1])
    width = max(len(text) for text, _ in rows) + 2
    print(f"{'shape':<{width}}" + "".join(f"{k:>11}" for k in keys))
    for text, r in rows:
        print(f"{text:<{width}}" + "".join(f"{r[k]:>11.0f}" if k == "programs" else f"{r[k]:>11.2f}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
