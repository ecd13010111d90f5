"""Where an eager decode step's host time goes, per attention backend (cProfile of a few steps).

    python3 benchmarks/e2e_host.py --model tp-shard --context 32768 --impls leanattn sdpa e2e_null

Prints, per backend, the step time and the functions with the most own time, and the time per
call of the attention function itself (wall, no sync: the host's cost).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import e2e  # noqa: F401  (registers leanattn and e2e_null)
from transformers import AttentionInterface


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tp-shard", choices=list(e2e.MODELS))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--impls", nargs="+", default=["leanattn", "sdpa", e2e.NULL])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = e2e.build_model(args.model, args.layers, device, torch.bfloat16)
    for impl in args.impls:
        model.set_attn_implementation(impl)
        inner = AttentionInterface._global_mapping[impl]
        spent = []

        def timed(*a, _inner=inner, **kw):
            t = time.perf_counter()
            r = _inner(*a, **kw)
            spent.append(time.perf_counter() - t)
            return r

        AttentionInterface._global_mapping[impl] = timed
        try:
            ms = e2e.time_decode(model, model.forward, args.batch, args.context, 3, args.steps)
            per_call = sorted(spent)[len(spent) // 2] * 1e6
            prof = cProfile.Profile()
            prof.enable()
            e2e.time_decode(model, model.forward, args.batch, args.context, 0, args.steps)
            prof.disable()
        finally:
            AttentionInterface._global_mapping[impl] = inner
        print(f"\n=== {impl}: {ms:.2f} ms/step; attention function median {per_call:.1f} us/call (wall, no sync); "
              f"profile of {args.steps} more steps:")
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(args.top)
        print(f"--- {impl}: leanattn's own functions and the tensor methods they call, by cumulative time")
        stats.sort_stats("cumulative").print_callees("leanattn.*(attention_forward|_planned|run)")


if __name__ == "__main__":
    main()
