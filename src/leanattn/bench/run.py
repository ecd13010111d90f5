"""Time leanattn and its peers on the same inputs in one process; write JSON, Markdown and a plot."""

from __future__ import annotations

import datetime
import json
import math
import platform
import sys
from pathlib import Path
from typing import Iterable

import torch

import leanattn

from .peers import METHODS, OWN, Unsupported, make_inputs
from .rounds import bench_round, host_calls, host_us, median_round, take_turns
from .serving import NOT_PEERS
from .shapes import Shape

__all__ = ["run_suite", "datasheet_peak", "copy_bandwidth"]

# Datasheet HBM bandwidth, bytes/s, by the name torch reports.
_PEAKS = {
    "H200": 4.8e12,
    "H100 80GB HBM3": 3.35e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100-SXM4-40GB": 1.555e12,
    "A100 80GB PCIe": 1.935e12,
    "L40S": 0.864e12,
}


def datasheet_peak(name: str) -> float | None:
    """Datasheet memory bandwidth (bytes/s) of a GPU we recognise by name, else None."""
    for key in sorted(_PEAKS, key=len, reverse=True):
        if key in name:
            return _PEAKS[key]
    return None


def bench_median(fn, rep_ms: int = 40, repeats: int = 3) -> float:
    """Milliseconds: the lowest of ``repeats`` medians of ``do_bench``, which flushes L2 before
    every timed call. Calls of tens of microseconds show whole runs 2-3x slower than the next run
    of the same call; the lowest median keeps one such run from deciding it. For one thing timed
    alone (copy bandwidth, probes); a suite's methods take turns instead (``leanattn.bench.rounds``)."""
    import triton.testing

    return min(float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")) for _ in range(repeats))


def copy_bandwidth(device: torch.device, nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = bench_median(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.reshape(ref.shape).float()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # a plain counter
        class _P:
            n = 0

            def update(self, k: int = 1) -> None:
                self.n += k
                print(f"\r{self.n}/{total}", end="", file=sys.stderr, flush=True)

            def set_description(self, s: str) -> None:
                pass

            def close(self) -> None:
                print(file=sys.stderr)

        return _P()


def run_suite(
    shapes: Iterable[Shape], methods: Iterable[str], device: torch.device, checkpoint: Path | None = None,
    mode: str = "eager", pattern: str = "append", rounds: int = 5, suite: str | None = None,
) -> dict:
    """Time every method on every shape. Returns the full record (also what the JSON holds);
    with ``checkpoint``, the record so far is written there after every shape.

    ``mode``: "eager" times single calls with L2 flushed; "graph" times a CUDA graph of a decode
    step's layers with ``pattern`` "append" or "plain" (see ``leanattn.bench.serving``). Either
    way a shape's methods take turns over ``rounds`` rounds and each row reports its median
    round, with host µs per eager call measured the same way. ``suite``: the suite's name, kept
    in the record."""
    shapes, methods = list(shapes), list(methods)
    props = torch.cuda.get_device_properties(device)
    copy = copy_bandwidth(device)
    peak = datasheet_peak(props.name)
    record = {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "leanattn": leanattn.__version__,
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "flashinfer": _version("flashinfer"),
        },
        "mode": mode,
        "rounds": rounds,
        **({"pattern": pattern} if mode == "graph" else {}),
        **({"suite": suite} if suite else {}),
        "copy_gbs": copy / 1e9,
        "datasheet_gbs": peak / 1e9 if peak else None,
        "rows": [],
    }
    bar = _progress(len(shapes) * len(methods))
    for shape in shapes:
        if mode == "graph":
            from .serving import run_serving_shape

            bar.set_description(f"{shape.name} (graph, {pattern})")
            record["rows"] += run_serving_shape(shape, methods, device, pattern, rounds)
        else:
            bar.set_description(f"{shape.name} (eager)")
            record["rows"] += _eager_shape(shape, methods, device, peak, rounds)
        bar.update(len(methods))
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text(json.dumps(record, indent=1))
    bar.close()
    return record


def _eager_shape(shape: Shape, methods: list[str], device: torch.device, peak: float | None, rounds: int) -> list[dict]:
    """Rows for one shape in eager mode: every method checked against the float32 reference,
    then timed in ``rounds`` rounds of turns (L2 flushed before each timed call), then its host
    µs per call in as many rounds."""
    if shape.has_features:
        raise ValueError(f"{shape.name}: model-feature options (fp8, q=, win=, softcap=, sinks) need --mode graph")
    x = make_inputs(shape, device)
    kw = {"block_table": x.block_table} if x.block_table is not None else {}
    ref = leanattn.reference.decode(x.q.float(), x.k, x.v, x.seqlens, compute_dtype=torch.float32, **kw)[:, 0]
    rows, ready = {}, {}
    for method in methods:
        row = {"shape": shape.name, "family": shape.family, "ctx": max(shape.lens), "method": method,
               "kv_bytes": shape.kv_bytes, "mode": "eager"}
        rows[method] = row
        try:
            fn = METHODS[method](shape, x)
            row["rel_err"] = _rel_err(fn(), ref)
            ready[method] = fn
        except Unsupported as e:
            row["status"] = str(e)
    names = list(ready)
    times = take_turns(names, rounds, lambda m: bench_round(ready[m]))
    hosts = take_turns(names, rounds, lambda m: host_us(ready[m], host_calls(median_round(times[m]))))
    for m in names:
        row = rows[m]
        row["ms"] = median_round(times[m])
        row["round_ms"] = times[m]
        row["gbs"] = shape.kv_bytes / (row["ms"] * 1e-3) / 1e9
        row["pct_peak"] = 100 * row["gbs"] * 1e9 / peak if peak else None
        row["host_us"] = median_round(hosts[m])
    del x, ref, ready
    torch.cuda.empty_cache()
    return list(rows.values())


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def summarize(record: dict) -> list[dict]:
    """One line per shape: leanattn's time and GB/s, the best peer and the speedup over it."""
    by_shape: dict[str, dict[str, dict]] = {}
    for row in record["rows"]:
        by_shape.setdefault(row["shape"], {})[row["method"]] = row
    lines = []
    for shape, rows in by_shape.items():
        own = rows.get("leanattn", {})
        peers = {m: r for m, r in rows.items() if m not in OWN and "ms" in r}
        best = min(peers.items(), key=lambda kv: kv[1]["ms"]) if peers else None
        line = {"shape": shape, "kv_mib": next(iter(rows.values()))["kv_bytes"] / 2**20,
                "ms": own.get("ms"), "gbs": own.get("gbs"), "pct_peak": own.get("pct_peak"),
                "rel_err": own.get("rel_err"), "graph_ms": rows.get("leanattn_graph", {}).get("ms"),
                "best_peer": best[0] if best else None, "best_peer_gbs": best[1]["gbs"] if best else None,
                "speedup": best[1]["ms"] / own["ms"] if best and own.get("ms") else None,
                "host_us": own.get("host_us"), "best_peer_host_us": best[1].get("host_us") if best else None,
                "peers": {m: (r.get("gbs"), r.get("status"), r.get("rel_err")) for m, r in rows.items() if m not in OWN}}
        lines.append(line)
    return lines


def _fmt(v, spec: str, none: str = "–") -> str:
    return none if v is None else format(v, spec)


def _header(record: dict) -> str:
    return (f"{record['gpu']}, {record['date'][:10]}; torch {record['versions']['torch']}, triton "
            f"{record['versions']['triton']}, flashinfer {record['versions']['flashinfer'] or 'absent'}. "
            f"Copy bandwidth {record['copy_gbs']:.0f} GB/s (read + write), datasheet "
            f"{_fmt(record['datasheet_gbs'], '.0f', 'unknown')} GB/s. ")


def markdown(record: dict) -> str:
    lines = summarize(record)
    peers = [m for m in dict.fromkeys(r["method"] for r in record["rows"]) if m not in OWN]
    head = _header(record) + (f"GB/s = K+V bytes read once / time; each method's time is its median of "
                              f"{record.get('rounds', 1)} rounds in which the methods take turns (L2 flushed before "
                              f"each timed call); host µs = wall time per eager call, leanattn / best peer.\n\n")
    for run in record.get("runs", []):
        head += f"- run {run['date']}: {run['shapes']} (copy {run['copy_gbs']:.0f} GB/s)\n"
    head += "\n" if record.get("runs") else ""
    cols = (["shape", "KV MiB", "leanattn µs", "GB/s", "% peak", "graph µs", "best peer", "speedup", "host µs"]
            + [f"{p} GB/s" for p in peers] + ["rel err"])
    out = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    speedups = []
    for ln in lines:
        if ln["speedup"]:
            speedups.append(ln["speedup"])
        cells = [f"`{ln['shape']}`", f"{ln['kv_mib']:.0f}", _fmt(ln["ms"] and ln["ms"] * 1e3, ".1f"), _fmt(ln["gbs"], ".0f"),
                 _fmt(ln["pct_peak"], ".0f"), _fmt(ln["graph_ms"] and ln["graph_ms"] * 1e3, ".1f"),
                 ln["best_peer"] or "–", _fmt(ln["speedup"], ".2f"),
                 f"{_fmt(ln['host_us'], '.1f')} / {_fmt(ln['best_peer_host_us'], '.1f')}"]
        for p in peers:
            gbs, status, _ = ln["peers"].get(p, (None, "not run", None))
            cells.append(_fmt(gbs, ".0f") if gbs is not None else f"({status})" if status else "–")
        cells.append(_fmt(ln["rel_err"], ".1e"))
        out.append("| " + " | ".join(cells) + " |")
    if speedups:
        gm = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        out.append(f"\nGeometric-mean speedup over the best peer: {gm:.2f}x over {len(speedups)} shapes; "
                   f"minimum {min(speedups):.2f}x.")
    return "\n".join(out) + "\n"


def terminal_table(record: dict) -> str:
    rows = summarize(record)
    out = [f"{'shape':<42}{'KV MiB':>8}{'µs':>9}{'GB/s':>7}{'%pk':>5}{'graph µs':>9}  {'best peer':<14}{'GB/s':>6}{'speedup':>8}{'err':>9}"]
    for ln in rows:
        out.append(f"{ln['shape']:<42}{ln['kv_mib']:>8.0f}{_fmt(ln['ms'] and ln['ms'] * 1e3, '9.1f'):>9}"
                   f"{_fmt(ln['gbs'], '7.0f'):>7}{_fmt(ln['pct_peak'], '5.0f'):>5}"
                   f"{_fmt(ln['graph_ms'] and ln['graph_ms'] * 1e3, '9.1f'):>9}  {(ln['best_peer'] or '–'):<14}"
                   f"{_fmt(ln['best_peer_gbs'], '6.0f'):>6}{_fmt(ln['speedup'], '8.2f'):>8}{_fmt(ln['rel_err'], '9.1e'):>9}")
    return "\n".join(out)


def serving_markdown(record: dict) -> str:
    """The serving table: µs per call in graph replay for every method, speedup over the best
    peer, the floor, host µs per eager call, and (append pattern) the appends' µs; then every
    failed check."""
    by_shape: dict[str, dict[str, dict]] = {}
    for row in record["rows"]:
        by_shape.setdefault(row["shape"], {})[row["method"]] = row
    methods = list(dict.fromkeys(r["method"] for r in record["rows"]))
    appended = any(r.get("pattern") == "append" for r in record["rows"])
    cols = (["shape", "KV MiB", "layers"] + [f"{m} µs" for m in methods] + ["vs best peer"]
            + (["append µs"] if appended else []) + ["host µs: " + ", ".join(methods)])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    speedups = []
    for shape, rows in by_shape.items():
        first = next(iter(rows.values()))
        cells = [f"`{shape}`", f"{first['kv_bytes'] / 2**20:.0f}", str(first["layers"])]
        for m in methods:
            r = rows.get(m, {})
            status = r.get("status", "not run")
            cells.append(f"{r['ms'] * 1e3:.1f}" if "ms" in r else "FAILED" if status.startswith("FAILED") else f"({status})")
        own = rows.get("leanattn", {}).get("ms")
        peers = [r["ms"] for m, r in rows.items() if m not in NOT_PEERS and "ms" in r]
        speed = min(peers) / own if own and peers else None
        if speed:
            speedups.append(speed)
        cells.append(f"{speed:.2f}" if speed else "–")
        if appended:
            us = next((r["append_us"] for r in rows.values() if "append_us" in r), None)
            cells.append(f"{us:.1f}" if us is not None else "–")
        cells.append(" / ".join(f"{rows[m]['host_us']:.1f}" if "host_us" in rows.get(m, {}) else "–" for m in methods))
        out.append("| " + " | ".join(cells) + " |")
    if speedups:
        gm = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        out.append(f"\nGeometric mean over the best peer: {gm:.2f}x over {len(speedups)} shapes; minimum {min(speedups):.2f}x.")
    failed = failures(record)
    if failed:
        out.append("\nFailed checks:\n" + "\n".join(f"- `{r['shape']}` {r['method']}: {r['status']}" for r in failed))
    return "\n".join(out) + "\n"


def failures(record: dict) -> list[dict]:
    """The rows whose output failed its check (the appended token not seen)."""
    return [r for r in record["rows"] if str(r.get("status", "")).startswith("FAILED")]


def plot(record: dict, path: Path) -> None:
    """GB/s against context length, one line per method, one panel per shape family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in record["rows"]:
        if "gbs" in r:
            fams.setdefault(r["family"], {}).setdefault(r["method"], []).append((r["ctx"], r["gbs"]))
    fams = {f: m for f, m in fams.items() if len({c for pts in m.values() for c, _ in pts}) > 1}
    if not fams:
        return
    palette = plt.get_cmap("tab10")
    color = {m: palette(i % 10) for i, m in enumerate(METHODS)}  # one colour per method everywhere
    cols = min(3, len(fams))
    rows = -(-len(fams) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax, (fam, methods) in zip(axes.flat, fams.items()):
        for m, pts in methods.items():
            pts.sort()
            ax.plot([c for c, _ in pts], [g for _, g in pts], marker="o", label=m, color=color.get(m),
                    lw=2.5 if m == "leanattn" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_title(fam)
        ax.set_xlabel("context length")
        ax.set_ylabel("GB/s")
        if record.get("datasheet_gbs"):
            ax.axhline(record["datasheet_gbs"], color="grey", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(fams):]:
        ax.axis("off")
    fig.suptitle(f"decode attention, {record['gpu']} ({record['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(record: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(record, indent=1))
    if record.get("mode") == "graph":
        (out_dir / "results.md").write_text(_header(record) + "\n\n" + serving_markdown(record))
        return
    (out_dir / "results.md").write_text(markdown(record))
    plot(record, out_dir / "results.png")
