"""End-to-end decode speed of a transformers model with each attention backend.

Random-weight models of real shapes decode one token per sequence per step from a static cache
filled with random keys and values (no prefill: only the decode step is timed). For each model,
batch, context, backend (leanattn, sdpa, flex_attention, flash_attention_2 when importable) and
mode (eager; compiled = the transformers static-cache recipe, ``torch.compile(model.forward,
mode="reduce-overhead", fullgraph=True)``), it reports ms per step and tokens/s. Attention's share
of a step is 1 - (step time with an attention that returns its query unread) / (step time).

    python3 benchmarks/e2e.py --out OUT_DIR            # one GPU; a time budget decides how far it gets
    python3 benchmarks/e2e.py --out OUT_DIR --quick    # tiny smoke run, also on the CPU

Writes results.json, results.md and results.png to --out and prints the table last. Jobs run in
order of interest (eager first, being cheap; then compiled, batch 1 and the longest context
first; then flex_attention and flash_attention_2); what the budget leaves out is listed. A
shape's eager backends take turns over several rounds (host-bound steps drift), each reporting
its median round.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch

try:
    import leanattn  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import leanattn.integrations.transformers as lt  # noqa: E402  (registers "leanattn")
from leanattn.bench.rounds import median_round, take_turns  # noqa: E402
import transformers  # noqa: E402
from transformers import AttentionInterface, StaticCache  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

# name: (what it is, LlamaConfig fields). Layers come from --layers.
MODELS = {
    "llama8b": (
        "Llama-3-8B shape: 32/8 heads, hidden 4096, MLP 14336",
        dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             vocab_size=128256),
    ),
    "tp-shard": (
        "one GPU's share of Llama-3-70B under 8-way tensor parallelism: 8/1 heads, hidden 8192, MLP 3584",
        dict(hidden_size=8192, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=1, head_dim=128,
             vocab_size=16032),
    ),
    "tiny": (
        "tiny smoke-test model: 4/2 heads, hidden 128",
        dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=256, head_dim=64),
    ),
}
NULL = "e2e_null"  # attention that returns its query: the step without attention


def null_attention(module, query, key, value, attention_mask, **kwargs):
    """(batch, heads, q_len, head_dim) -> (batch, q_len, heads, head_dim) without reading K/V."""
    return query.transpose(1, 2), None


AttentionInterface.register(NULL, null_attention)
AttentionMaskInterface.register(NULL, sdpa_mask)  # the same mask work as sdpa and leanattn


@dataclass
class Row:
    model: str
    batch: int
    context: int
    impl: str
    mode: str
    ms: float | None = None  # per decode step
    tokens_per_s: float | None = None
    status: str = "ok"
    seconds: float = 0.0  # the job's wall time, compilation included (to plan budgets)


def build_model(name: str, layers: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    fields = dict(MODELS[name][1], num_hidden_layers=layers, max_position_embeddings=1 << 20)
    config = transformers.LlamaConfig(**fields)
    torch.manual_seed(0)
    with device:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def filled_cache(model, batch: int, context: int, room: int) -> StaticCache:
    """A static cache of ``context + room`` slots whose first ``context`` hold random K/V."""
    cfg, p = model.config, next(model.parameters())
    cache = StaticCache(config=cfg, max_cache_len=context + room)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache.early_initialization(batch, cfg.num_key_value_heads, head_dim, p.dtype, p.device)
    for layer in cache.layers:
        layer.keys.normal_()
        layer.values.normal_()
        layer.cumulative_length.fill_(context)  # the next token goes to slot `context`
    return cache


def kv_bytes(model, batch: int, slots: int) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * batch * slots * cfg.num_key_value_heads * head_dim * 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(model, forward, batch: int, context: int, warmup: int, steps: int) -> float:
    """Mean ms per decode step over ``steps`` after ``warmup`` (which includes any compilation).
    One eager step runs first, where a prefill would, and is overwritten by the first timed-run
    step: the transformers recipe compiles the decode steps only."""
    device = next(model.parameters()).device
    cache = filled_cache(model, batch, context, warmup + steps + 8)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    start = 0.0
    with torch.no_grad():
        pos = torch.full((batch, 1), context, dtype=torch.long, device=device)
        model.forward(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
        for i in range(warmup + steps):
            if i == warmup:
                sync(device)
                start = time.perf_counter()
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            pos = torch.full((batch, 1), context + i, dtype=torch.long, device=device)
            forward(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
        sync(device)
    return (time.perf_counter() - start) / steps * 1e3


def compiled_forward(model, device: torch.device, impl: str):
    torch._dynamo.reset()  # a new cache, shapes and backend: start clean and free old graphs
    if impl == "flex_attention":
        # transformers builds flex_attention's block mask with create_block_mask(_compile=True),
        # which now warns that the flag is deprecated; dynamo can't trace warnings.warn, and
        # fullgraph=True turns that into an error. Tracing may skip the warning.
        config = torch._dynamo.config
        ignored = getattr(config, "ignore_logging_functions", None)
        (ignored if ignored is not None else config.ignore_logger_methods).add(warnings.warn)
        # torch 2.11 then fails to JSON-encode its config for compile metrics and logs the
        # traceback after every compile; the metrics are not used here.
        logging.getLogger("torch._dynamo.metrics_context").setLevel(logging.CRITICAL)
    if device.type == "cuda":
        return torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    return torch.compile(model.forward, backend="aot_eager", fullgraph=True)  # CPU smoke run


def plan(args) -> list[Row]:
    """Every job, in the order they run."""
    impls = [i for i in args.impls if i != "flash_attention_2" or transformers.utils.is_flash_attn_2_available()]
    cheap = [i for i in impls if i in ("leanattn", "sdpa")] + [NULL]
    rest = [i for i in impls if i not in cheap]
    shapes = [(m, b, c) for m in args.models for b in args.batches for c in sorted(args.contexts, reverse=True)]
    jobs = [Row(m, b, c, i, "eager") for m, b, c in shapes for i in cheap]
    jobs += [Row(m, b, c, i, "compiled") for m, b, c in shapes for i in cheap]
    jobs += [Row(m, b, c, i, mode) for mode in args.modes for m, b, c in shapes for i in rest]
    return [j for j in jobs if j.mode in args.modes]


def run(args) -> list[Row]:
    """Every job of :func:`plan`. A shape's eager jobs run together, in ``args.rounds``
    rounds of ``args.steps`` steps per backend in which the backends take turns
    (``leanattn.bench.rounds``), each job's time its median round: eager steps are host-bound, and the host's speed drifts by more than the differences
    between backends over a run of such jobs one after another. A compiled job runs alone (its
    compilation takes tens of seconds): its steps are GPU-bound."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    models = {m: build_model(m, args.layers, device, dtype) for m in args.models}
    jobs = plan(args)
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        bar = None
    t0 = time.perf_counter()
    done: set[int] = set()
    for first in jobs:
        if id(first) in done:
            continue
        shape = (first.model, first.batch, first.context)
        group = [first] if first.mode == "compiled" else [
            j for j in jobs if j.mode == "eager" and (j.model, j.batch, j.context) == shape]
        done.update(id(j) for j in group)
        if bar is not None:
            bar.set_description(f"{first.model} {first.batch}x{first.context} {first.mode}"
                                + (f" {first.impl}" if first.mode == "compiled" else ""))
        model = models[first.model]
        room = args.warmup + args.steps + 8
        if time.perf_counter() - t0 > args.budget_s:
            status = "skipped: time budget"
        elif device.type == "cuda" and kv_bytes(model, first.batch, first.context + room) > 0.8 * torch.cuda.mem_get_info(device)[0]:
            status = "skipped: memory"
        else:
            status = None
        for job in group:
            job.status = status or "ok"

        def measure(i: int) -> float | None:
            """One timed run of the group's job ``i`` (None once it has failed)."""
            job = group[i]
            if job.status != "ok":
                return None
            begun = time.perf_counter()
            try:
                model.set_attn_implementation(job.impl)
                forward = compiled_forward(model, device, job.impl) if job.mode == "compiled" else model.forward
                lt.calls.clear()
                ms = time_decode(model, forward, job.batch, job.context, args.warmup, args.steps)
                # Eager calls are counted: a leanattn row whose steps went to SDPA must say so.
                if job.impl == lt.NAME and job.mode == "eager" and set(lt.calls) != {lt.NAME}:
                    job.status = f"calls: {dict(lt.calls)}"
                return ms
            except Exception as e:  # out of memory, a backend refusing the shape, ...
                job.status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                return None
            finally:
                job.seconds = round(job.seconds + time.perf_counter() - begun, 1)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()

        times = take_turns(range(len(group)), args.rounds if first.mode == "eager" else 1, measure)
        for i, job in enumerate(group):
            if job.status == "ok":
                job.ms = median_round(times[i])
                job.tokens_per_s = job.batch * 1e3 / job.ms
            if bar is not None:
                bar.update(1)
            else:
                print(f"{job.model} {job.batch}x{job.context} {job.impl} {job.mode}: {job.ms} ms ({job.status})",
                      file=sys.stderr)
    if bar is not None:
        bar.close()
    return jobs


def ctx_label(n: int) -> str:
    return f"{n >> 10}k" if n >= 1024 and n % 1024 == 0 else str(n)


def table(rows: list[Row], args) -> str:
    """Markdown: one line per (model, batch, context, mode); tokens/s per backend, leanattn's
    speedup over sdpa, and attention's share of the step for leanattn and sdpa."""
    by = {(r.model, r.batch, r.context, r.impl, r.mode): r for r in rows}
    impls = [i for i in dict.fromkeys(r.impl for r in rows) if i != NULL]
    head = ["model", "batch", "context", "mode", *[f"{i} tok/s" for i in impls], "× sdpa", "attn share leanattn", "attn share sdpa"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = dict.fromkeys((r.model, r.batch, r.context, r.mode) for r in rows)
    for m, b, c, mode in keys:
        def get(impl: str) -> Row | None:
            r = by.get((m, b, c, impl, mode))
            return r if r is not None and r.ms is not None else None

        cells = [f"{get(i).tokens_per_s:.1f}" if get(i) else "-" for i in impls]
        lean, sdpa, null = get("leanattn"), get("sdpa"), get(NULL)
        speedup = f"{sdpa.ms / lean.ms:.2f}" if lean and sdpa else "-"
        shares = [f"{max(0.0, 1 - null.ms / r.ms):.0%}" if r and null else "-" for r in (lean, sdpa)]
        lines.append("| " + " | ".join([m, str(b), ctx_label(c), mode, *cells, speedup, *shares]) + " |")
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r.model, r.batch) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (m, b) in zip(axes[0], panels):
        for (impl, mode) in dict.fromkeys((r.impl, r.mode) for r in rows if r.impl != NULL):
            pts = sorted((r.context, r.tokens_per_s) for r in rows
                         if (r.model, r.batch, r.impl, r.mode) == (m, b, impl, mode) and r.ms is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linestyle="-" if mode == "compiled" else "--", label=f"{impl} ({mode})")
        ax.set_xscale("log", base=2)
        contexts = sorted({r.context for r in rows})
        ax.set_xticks(contexts, [ctx_label(c) for c in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"{m}, batch {b}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for results.json, results.md, results.png")
    ap.add_argument("--quick", action="store_true", help="tiny model, short contexts, few steps (CPU smoke run)")
    ap.add_argument("--models", nargs="+", default=["llama8b", "tp-shard"], choices=list(MODELS))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", help="default 1 16")
    ap.add_argument("--contexts", type=int, nargs="+", help="default 8192 32768 131072")
    ap.add_argument("--impls", nargs="+", default=["leanattn", "sdpa", "flex_attention", "flash_attention_2"])
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps of a job (of each round, eager)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of a shape's eager jobs")
    ap.add_argument("--budget-s", type=float, default=330.0, help="start no job after this many seconds")
    args = ap.parse_args()
    if args.quick:
        args.models, args.layers, args.impls, args.warmup, args.steps = ["tiny"], 2, ["leanattn", "sdpa"], 1, 2
        args.rounds = 2
    args.batches = args.batches or ([1, 2] if args.quick else [1, 16])
    args.contexts = args.contexts or ([64, 160] if args.quick else [8192, 32768, 131072])
    os.makedirs(args.out, exist_ok=True)
    rows = run(args)
    text = table(rows, args)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter)"
    notes = [f"{m}: {MODELS[m][0]}; {args.layers} layers; bf16, random weights" for m in args.models]
    skipped = [f"{r.model} {r.batch}x{ctx_label(r.context)} {r.impl} {r.mode}: {r.status}" for r in rows if r.status != "ok"]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(device=gpu, torch=torch.__version__, transformers=transformers.__version__,
                       args=vars(args), rows=[asdict(r) for r in rows]), f, indent=1)
    md = [f"# Decode end to end on {gpu}", f"torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{args.steps} timed steps after {args.warmup} warm-up; eager: the median of {args.rounds} such runs, "
          "the backends taking turns", *[f"- {n}" for n in notes], "", text]
    if skipped:
        md += ["", "Not measured, or not as asked:", *[f"- {s}" for s in skipped]]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    try:
        plot(rows, os.path.join(args.out, "results.png"))
    except ImportError:
        print("matplotlib is missing: no plot", file=sys.stderr)
    print("\n".join(md))


if __name__ == "__main__":
    main()
