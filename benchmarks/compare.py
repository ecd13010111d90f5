"""Compare a ``leanattn bench`` run against a committed baseline, shape by shape.

    python benchmarks/compare.py BASELINE.json NEW.json [--tolerance 0.03]

Rows of the two ``results.json`` files are matched by (shape, method, mode), where a graph row's
mode carries its pattern ("graph", or "graph/append" for the append pattern: the two time
different steps). For leanattn's own methods it prints every shape's time in both runs and the
ratio new / old, flags each more than ``--tolerance`` slower (or without a time in the new run
where the baseline had one), lists shapes found in one file only, and prints the peers' median
ratio (how much the machine itself moved between the runs). Exit status 1 when any row is
flagged, 0 otherwise; 2 for a file it cannot read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# leanattn's methods in either mode; every other method is a peer or the read floor.
OWN = ("leanattn", "leanattn_graph", "leanattn_decode")
FLOOR = ("read_floor",)


def row_mode(record: dict, row: dict) -> str:
    """A row's mode: its own "mode" or the record's (files before rows had one: eager), with
    "/append" for the append pattern."""
    mode = row.get("mode") or record.get("mode") or "eager"
    pattern = row.get("pattern") or (record.get("pattern") if mode == "graph" else None)
    return f"{mode}/{pattern}" if pattern == "append" else mode


def index(record: dict) -> dict[tuple[str, str, str], dict]:
    """Rows of a results record by (shape, method, mode)."""
    return {(r["shape"], r["method"], row_mode(record, r)): r for r in record["rows"]}


def compare(old: dict, new: dict, tolerance: float = 0.03) -> dict:
    """The comparison of two results records: ``lines`` (one per shape and leanattn method in
    either run: shape, method, mode, old_ms, new_ms, ratio, flagged), ``only_old`` and
    ``only_new`` ((shape, mode) pairs found in one run only), ``peer_ratio`` (median new / old of
    the peers' rows present in both, or None)."""
    a, b = index(old), index(new)
    shapes_a = {(s, mode) for s, _, mode in a}
    shapes_b = {(s, mode) for s, _, mode in b}
    lines = []
    for key in dict.fromkeys([*a, *b]):
        shape, method, mode = key
        if method not in OWN or (shape, mode) not in shapes_a or (shape, mode) not in shapes_b:
            continue
        old_ms, new_ms = a.get(key, {}).get("ms"), b.get(key, {}).get("ms")
        if old_ms is None and new_ms is None:  # timed in neither (e.g. refused both times)
            continue
        ratio = new_ms / old_ms if old_ms and new_ms else None
        # Slower than allowed, or timed before and not now (refused, failed its check, missing).
        flagged = (ratio is not None and ratio > 1 + tolerance) or (old_ms is not None and new_ms is None)
        lines.append(dict(shape=shape, method=method, mode=mode, old_ms=old_ms, new_ms=new_ms, ratio=ratio,
                          flagged=flagged, status=b.get(key, {}).get("status")))
    peers = sorted(b[k]["ms"] / a[k]["ms"] for k in a.keys() & b.keys()
                   if k[1] not in OWN + FLOOR and a[k].get("ms") and b[k].get("ms"))
    return dict(lines=lines, only_old=sorted(shapes_a - shapes_b), only_new=sorted(shapes_b - shapes_a),
                peer_ratio=peers[len(peers) // 2] if peers else None)


def report(result: dict, tolerance: float) -> str:
    """The comparison as text: a table, then the flagged rows and the missing shapes."""
    def us(ms: float | None) -> str:
        return "–" if ms is None else f"{ms * 1e3:.1f}"

    out = [f"{'shape':<40} {'mode':<13} {'method':<16} {'old µs':>9} {'new µs':>9} {'new/old':>8}"]
    for ln in result["lines"]:
        ratio = "–" if ln["ratio"] is None else f"{ln['ratio']:.3f}"
        mark = "  SLOWER" if ln["flagged"] and ln["ratio"] is not None else "  NO TIME" if ln["flagged"] else ""
        out.append(f"{ln['shape']:<40} {ln['mode']:<13} {ln['method']:<16} {us(ln['old_ms']):>9} "
                   f"{us(ln['new_ms']):>9} {ratio:>8}{mark}")
    if result["peer_ratio"] is not None:
        out.append(f"\npeers' median new/old: {result['peer_ratio']:.3f} (the machine's own drift between the runs)")
    flagged = [ln for ln in result["lines"] if ln["flagged"]]
    out.append(f"\n{len(flagged)} of {len(result['lines'])} rows more than {tolerance:.0%} slower or without a time")
    for ln in flagged:
        why = f"{ln['ratio']:.3f}x" if ln["ratio"] is not None else f"no time ({ln['status'] or 'not run'})"
        out.append(f"  {ln['shape']} {ln['mode']} {ln['method']}: {why}")
    for side, missing in (("baseline", result["only_old"]), ("new run", result["only_new"])):
        if missing:
            out.append(f"shapes only in the {side}: " + ", ".join(f"{s} ({m})" for s, m in missing))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline", type=Path, help="results.json of the baseline run")
    ap.add_argument("new", type=Path, help="results.json of the new run")
    ap.add_argument("--tolerance", type=float, default=0.03, help="flag rows slower than 1 + this (default 0.03)")
    args = ap.parse_args(argv)
    try:
        old, new = (json.loads(p.read_text()) for p in (args.baseline, args.new))
    except (OSError, ValueError) as e:
        print(f"compare.py: cannot read {e}", file=sys.stderr)
        return 2
    result = compare(old, new, args.tolerance)
    print(report(result, args.tolerance))
    return 1 if any(ln["flagged"] for ln in result["lines"]) else 0


if __name__ == "__main__":
    sys.exit(main())
