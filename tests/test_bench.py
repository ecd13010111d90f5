"""The benchmark's pure parts: shape text, byte counts, the summary and its report (no GPU)."""

import math

import pytest
import torch

from leanattn.bench.run import datasheet_peak, markdown, summarize
from leanattn.bench.shapes import default_suite, parse_shape


def test_parse_shapes_and_round_trip():
    s = parse_shape("8x32k@32/8:d=64:fp16:page=16")
    assert (s.lens, s.q_heads, s.kv_heads, s.head_dim, s.dtype, s.page_size) == ((32768,) * 8, 32, 8, 64, torch.float16, 16)
    r = parse_shape("1k+2k+300@16/2")
    assert r.lens == (1024, 2048, 300) and r.ragged and r.dtype == torch.bfloat16
    for shape in default_suite():
        assert parse_shape(shape.name) == shape


def test_kv_bytes_is_k_plus_v_read_once():
    s = parse_shape("2x1k@32/8")
    assert s.kv_bytes == 2 * (2 * 1024) * 8 * 128 * 2
    assert parse_shape("1k+3@8/8:fp16").kv_bytes == 2 * (1024 + 3) * 8 * 128 * 2


@pytest.mark.parametrize("bad", ["1x32k", "1x32k@32", "1x32k@32/8:d=x", "1x32k@32/8:int8", "axb@1/1"])
def test_bad_shapes_say_how_to_write_one(bad):
    with pytest.raises(ValueError, match="bad shape"):
        parse_shape(bad)


def test_suite_covers_the_issue_shapes():
    names = {s.name for s in default_suite()}
    for need in ("1x512k@32/32", "64x2k@32/8", "16x8k@64/8", "1x32k@8/1", "4x16k@16/16:d=64",
                 "1k+2k+4k+8k+16k+32k+64k+128k@32/8", "8x32k@32/8:page=1", "8x32k@32/8:page=64"):
        assert need in names
    assert {s.head_dim for s in default_suite()} >= {32, 64, 128, 192, 256, 512}
    assert any(s.dtype == torch.float16 for s in default_suite())
    # d=512 at the bandwidth target's size: at least 256 MiB of K and V a call.
    assert all(s.kv_bytes >= 256 * 2**20 for s in default_suite() if s.head_dim == 512)


def test_summary_speedup_and_report():
    row = dict(family="f", ctx=1, kv_bytes=2**20)
    record = {
        "gpu": "NVIDIA H200", "date": "2026-01-01T00:00:00", "copy_gbs": 4000.0, "datasheet_gbs": 4800.0,
        "versions": {"torch": "t", "triton": "r", "flashinfer": None},
        "rows": [
            {**row, "shape": "a", "method": "leanattn", "ms": 0.010, "gbs": 100.0, "pct_peak": 2.0, "rel_err": 1e-3},
            {**row, "shape": "a", "method": "sdpa_cudnn", "ms": 0.020, "gbs": 50.0, "rel_err": 1e-3},
            {**row, "shape": "a", "method": "flashinfer", "status": "flashinfer not installed"},
            {**row, "shape": "b", "method": "leanattn", "ms": 0.040, "gbs": 25.0, "pct_peak": 1.0, "rel_err": 1e-3},
            {**row, "shape": "b", "method": "sdpa_cudnn", "ms": 0.010, "gbs": 100.0, "rel_err": 1e-3},
        ],
    }
    lines = {ln["shape"]: ln for ln in summarize(record)}
    assert lines["a"]["speedup"] == pytest.approx(2.0) and lines["a"]["best_peer"] == "sdpa_cudnn"
    assert lines["b"]["speedup"] == pytest.approx(0.25)
    md = markdown(record)
    assert "(flashinfer not installed)" in md
    assert f"{math.sqrt(2.0 * 0.25):.2f}x" in md and "minimum 0.25x" in md


def test_datasheet_peaks():
    assert datasheet_peak("NVIDIA H200") == 4.8e12
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == 3.35e12
    assert datasheet_peak("Some Future GPU") is None


def _timeline_tool():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "timeline.py"
    spec = importlib.util.spec_from_file_location("timeline_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_timeline_phases_from_stamps():
    """benchmarks/timeline.py's statistics: microseconds from the first program's start, programs
    without an exit stamp (no share) left out."""
    tool = _timeline_tool()
    us = 1000
    stamps = torch.tensor([
        [10 * us, 12 * us, 13 * us, 15 * us, 20 * us, 0, 21 * us],  # a whole head: no ticket
        [11 * us, 12 * us, 14 * us, 17 * us, 24 * us, 25 * us, 30 * us],
        [12 * us, 13 * us, 15 * us, 19 * us, 22 * us, 22 * us, 23 * us],
        [9 * us, 0, 0, 0, 0, 0, 0],  # no share: wrote its start only
    ])
    p = tool.phases(stamps)
    assert p["programs"] == 3
    assert p["start"] == 2 and p["waited"] == 2 and p["waited max"] == 3 and p["share"] == 4
    assert p["1st tile"] == 7 and p["streamed"] == 12 and p["streamed max"] == 14
    assert p["ticket"] == 12  # the lower middle (torch.median) and p["end"] == 13 and p["span"] == 20
    assert p["last ticket"] == 1 and p["last merge"] == 5
    assert tool.variant("tile=128,programs=66,num_stages=2") == ({"tile": 128, "num_stages": 2}, 66)
    assert tool.variant("") == ({}, None)
    assert tool.variant("num_stages=6,TIMELINE=1") == ({"num_stages": 6, "constexprs": (("TIMELINE", 1),)}, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's refusal (CPU mode)")
def test_gpu_instruction_probes_are_refused_by_the_interpreter():
    """The TIMELINE stamps (%globaltimer) are a GPU instruction: under the interpreter a config
    asking for them is refused, not faked."""
    import dataclasses

    q = torch.randn(1, 1, 2, 64, dtype=torch.float16)
    k = torch.randn(1, 32, 1, 64, dtype=torch.float16)
    config = dataclasses.replace(leanattn.choose_config(64, k.dtype, 2), constexprs=(("TIMELINE", True),))
    with pytest.raises(ValueError, match="interpreter has none"):
        leanattn.decode(q, k, k, torch.tensor([32], dtype=torch.int32), config=config)


# --- suites, the append pattern, rounds, the comparer (all on the CPU) ---

import importlib.util  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import leanattn  # noqa: E402
from leanattn.bench import rounds as rounds_mod  # noqa: E402
from leanattn.bench import run as run_mod  # noqa: E402
from leanattn.bench.append import AppendNotSeen, TOLERANCE, check_seen, launch_append, make_appends, token_rows  # noqa: E402
from leanattn.bench.peers import Unsupported  # noqa: E402
from leanattn.bench.run import failures, serving_markdown  # noqa: E402
from leanattn.bench.serving import _references, make_layers  # noqa: E402
from leanattn.bench.shapes import SUITES, suite  # noqa: E402
from _util import DEVICE, ON_GPU  # noqa: E402

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", ["eager", "serving", "serving-full"])
def test_suites_cover_head_dims_groups_and_layouts(name):
    shapes = suite(name)
    assert len({s.name for s in shapes}) == len(shapes)
    assert {s.head_dim for s in shapes} >= {64, 80, 96, 128, 256}
    assert {s.q_heads // s.kv_heads for s in shapes} >= set(range(1, 9))
    assert any(s.page_size == 0 for s in shapes) and {s.page_size for s in shapes} & {16, 64}
    for d in (64, 80, 96, 128, 256):  # each head dim contiguous and paged
        assert {s.page_size > 0 for s in shapes if s.head_dim == d} == {False, True}, d


def test_serving_suite_is_small_tp_shards():
    shapes = suite("serving")
    assert len(shapes) <= 34
    assert all(16 * 2**20 <= s.kv_bytes <= 256 * 2**20 for s in shapes)
    # Batch-invariant mode is watched too, small and large, contiguous and paged.
    invariant = [s for s in shapes if s.split]
    assert {s.kv_bytes for s in invariant} >= {16 * 2**20, 256 * 2**20}
    assert {s.page_size > 0 for s in invariant} == {False, True}
    assert all(s.page_size in (0, 16, 64) for s in shapes)
    # The issue's eight d=128 shards stay in it.
    names = {s.name for s in shapes}
    assert {"1x32k@8/1", "1x4k@32/8", "4x8k@8/1", "1x128k@8/1", "64x2k@8/1", "1x32k@32/8", "8x8k@32/8",
            "16x4k@64/8"} <= names
    assert set(SUITES) == {"eager", "serving", "serving-full"}
    with pytest.raises(ValueError, match="suite must be one of"):
        suite("nope")


@pytest.mark.parametrize("text", ["0+1+40+70@4/2:d=32:q=2", "3+40+17@4/2:d=32:page=16", "2x40@8/1:d=32:page=16:q=3"])
def test_append_kernel_writes_the_newest_token_and_q(text):
    """Under the interpreter: after the kernel, each sequence's newest q_len rows (through the
    block table when paged) hold the new K and V, q holds the new q, nothing else changed; and
    writing the stale values back restores the inputs exactly."""
    shape = parse_shape(text)
    ls = make_layers(shape, DEVICE, 2)
    appends = make_appends(shape, ls.xs)
    x = ls.xs[1]
    before = (x.q.clone(), x.k.clone(), x.v.clone())
    q, k, v = appends.fresh[1]
    old_k, old_v, live = token_rows(shape, x)
    assert not torch.equal(k[live], old_k[live]) and not torch.equal(v[live], old_v[live]) and not torch.equal(q, x.q)
    assert k.abs().sum() > 0 and v.abs().sum() > 0
    launch_append(shape, x, appends.fresh[1])
    got_k, got_v, live = token_rows(shape, x)
    assert torch.equal(got_k[live], k[live]) and torch.equal(got_v[live], v[live]) and torch.equal(x.q, q)
    # Every other cache element is untouched: write the new rows into the old cache by indexing.
    want_k, want_v = before[1].clone(), before[2].clone()
    for b in range(shape.batch):
        for t in range(shape.q_len):
            row = shape.lens[b] - shape.q_len + t
            if row < 0:
                continue
            idx = (int(x.block_table[b, row // shape.page_size]), row % shape.page_size) if shape.page_size else (b, row)
            want_k[idx], want_v[idx] = k[b, t], v[b, t]
    assert torch.equal(x.k, want_k) and torch.equal(x.v, want_v)
    assert torch.equal(ls.xs[0].k, make_layers(shape, DEVICE, 1).xs[0].k)  # other layers untouched
    launch_append(shape, x, appends.stale[1])
    assert all(torch.equal(a, b) for a, b in zip((x.q, x.k, x.v), before))


def test_appends_are_fresh_per_layer():
    shape = parse_shape("2x64@8/2:d=32")
    appends = make_appends(shape, make_layers(shape, CPU, 3).xs)
    qs = [q for q, _, _ in appends.fresh]
    assert not torch.equal(qs[0], qs[1]) and not torch.equal(qs[1], qs[2])


@pytest.mark.parametrize("text", ["2x200@8/1:d=32", "1+150@4/4:d=32:page=16"])
def test_reference_check_sees_whether_the_token_was_read(text):
    """The references with and without the appended token differ far beyond the tolerance (the
    newest key leans toward its queries); leanattn run after the append passes the check, and
    the same call on the stale token fails it, naming the method and the error."""
    shape = parse_shape(text)
    ls = make_layers(shape, DEVICE, 2)
    appends = make_appends(shape, ls.xs)
    with_token, without = _references(shape, ls, appends)
    assert ((with_token - without).norm() / with_token.norm()).item() > 10 * TOLERANCE
    x = ls.xs[-1]
    out = leanattn.decode(x.q, x.k, x.v, x.seqlens, block_table=x.block_table)
    err, err_without = check_seen("leanattn", out, with_token, without)
    assert err < TOLERANCE < err_without
    launch_append(shape, x, (x.q, *appends.stale[-1][1:]))  # the stale token, the fresh q
    stale = leanattn.decode(x.q, x.k, x.v, x.seqlens, block_table=x.block_table)
    with pytest.raises(AppendNotSeen, match=r"leanattn: off the reference with the appended token by \d\.\d+e"):
        check_seen("leanattn", stale, with_token, without)


def test_check_seen_refuses_references_it_cannot_tell_apart():
    ref = torch.randn(2, 1, 4, 8)
    with pytest.raises(AppendNotSeen, match="cannot tell"):
        check_seen("m", ref, ref, ref * (1 + 1e-3))


def test_take_turns_rotates_and_medians_leave_out_a_slow_round():
    order: list[str] = []
    slow_round = {"a": 2, "b": 2, "c": 4}  # host drift: each method hit in one round

    def measure(name: str) -> float:
        order.append(name)
        r = sum(1 for n in order if n == name) - 1
        return {"a": 10.0, "b": 20.0, "c": 30.0}[name] * (3 if r == slow_round[name] else 1) + r * 0.01

    samples = rounds_mod.take_turns(["a", "b", "c"], 5, measure)
    assert order[:9] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [len(v) for v in samples.values()] == [5, 5, 5]
    assert rounds_mod.median_round(samples["a"]) == pytest.approx(10.03)  # not 30.02, its slow round
    assert rounds_mod.median_round(samples["c"]) == pytest.approx(30.02)
    assert rounds_mod.median_round([3.0, 1.0, 2.0, 4.0]) == 3.0
    assert rounds_mod.take_turns(["a", "b"], 2, lambda n: None if n == "b" else 1.0) == {"a": [1.0, 1.0], "b": []}
    with pytest.raises(ValueError, match="rounds"):
        rounds_mod.take_turns(["a"], 0, lambda n: 1.0)
    assert rounds_mod.host_calls(0.02) == 200 and rounds_mod.host_calls(0.5) == 40 and rounds_mod.host_calls(50.0) == 10


def test_eager_shape_takes_turns_and_reports_median_rounds_and_host(monkeypatch):
    """The eager suite's loop with fake timers: methods alternate within each round, each row's
    time is its median round, and host µs comes from the same run."""
    shape = parse_shape("1x64@4/2:d=32")
    calls: list[str] = []
    clocks = {"fast": [5.0, 1.0, 1.1, 1.2, 9.0], "slow": [2.0, 2.1, 8.0, 2.2, 2.3]}

    def method(name: str, scale: float):
        def prepare(shape, x):
            def fn():
                calls.append(name)
                kw = {"block_table": x.block_table} if x.block_table is not None else {}
                return leanattn.reference.decode(x.q.float(), x.k, x.v, x.seqlens, **kw)[:, 0] * scale
            fn.name = name
            return fn
        return prepare

    def refuse(shape, x):
        raise Unsupported("not this one")

    monkeypatch.setattr(run_mod, "METHODS", {"fast": method("fast", 1.0), "slow": method("slow", 1.5), "no": refuse})
    ticks = {"fast": iter(clocks["fast"]), "slow": iter(clocks["slow"])}
    order: list[str] = []

    def fake_round(fn):
        order.append(fn.name)
        return next(ticks[fn.name])

    monkeypatch.setattr(run_mod, "bench_round", fake_round)
    monkeypatch.setattr(run_mod, "host_us", lambda fn, calls: {"fast": 7.0, "slow": 3.0}[fn.name] + calls * 0)
    rows = {r["method"]: r for r in run_mod._eager_shape(shape, ["fast", "slow", "no"], CPU, None, 5)}
    assert order == ["fast", "slow", "slow", "fast", "fast", "slow", "slow", "fast", "fast", "slow"]
    assert rows["fast"]["ms"] == 1.2 and rows["slow"]["ms"] == 2.2
    assert rows["fast"]["round_ms"] == clocks["fast"] and rows["fast"]["host_us"] == 7.0
    assert rows["fast"]["rel_err"] < 1e-5 and rows["slow"]["rel_err"] == pytest.approx(0.5, rel=1e-3)
    assert rows["no"]["status"] == "not this one" and "ms" not in rows["no"]


def test_serving_report_lists_failed_checks():
    row = dict(kv_bytes=2**24, layers=32, mode="graph", pattern="append", append_us=2.0, host_us=10.0)
    record = {"rows": [
        {**row, "shape": "s", "method": "leanattn", "ms": 0.010, "rel_err": 2e-3},
        {**row, "shape": "s", "method": "sdpa_cudnn", "status": "FAILED: sdpa_cudnn: off the reference by 3.1e-01"},
        {**row, "shape": "s", "method": "flashinfer", "ms": 0.012},
    ]}
    assert [r["method"] for r in failures(record)] == ["sdpa_cudnn"]
    md = serving_markdown(record)
    assert "| FAILED |" in md and "append µs" in md and "off the reference by 3.1e-01" in md
    assert "1.20" in md  # flashinfer / leanattn


def _compare_tool():
    path = Path(__file__).parents[1] / "benchmarks" / "compare.py"
    spec = importlib.util.spec_from_file_location("compare_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _record(mode: str | None, rows: list[tuple[str, str, float | None]], pattern: str | None = None) -> dict:
    out = {"rows": [dict(shape=s, method=m, **({"ms": ms} if ms is not None else {"status": "refused"}),
                         **({"mode": mode, "pattern": pattern} if mode == "graph" else {})) for s, m, ms in rows]}
    if mode is not None:
        out["mode"] = mode
    return out


def test_compare_flags_rows_over_the_tolerance_and_lists_missing_shapes(tmp_path, capsys):
    tool = _compare_tool()
    # The baseline is an eager file of the old format (no mode anywhere).
    old = _record(None, [("a", "leanattn", 0.100), ("a", "sdpa_cudnn", 0.100), ("b", "leanattn", 0.100),
                         ("c", "leanattn", 0.100), ("d", "leanattn", 0.100), ("d", "leanattn_graph", 0.050)])
    new = _record("eager", [("a", "leanattn", 0.104), ("a", "sdpa_cudnn", 0.101), ("b", "leanattn", 0.102),
                            ("d", "leanattn", None), ("d", "leanattn_graph", 0.0501), ("e", "leanattn", 0.1)])
    result = tool.compare(old, new, 0.03)
    by = {(ln["shape"], ln["method"]): ln for ln in result["lines"]}
    assert by["a", "leanattn"]["flagged"] and by["a", "leanattn"]["ratio"] == pytest.approx(1.04)
    assert not by["b", "leanattn"]["flagged"] and by["b", "leanattn"]["ratio"] == pytest.approx(1.02)
    assert by["d", "leanattn"]["flagged"] and by["d", "leanattn"]["ratio"] is None  # no time now
    assert not by["d", "leanattn_graph"]["flagged"]
    assert ("a", "sdpa_cudnn") not in by  # peers are not flagged
    assert result["only_old"] == [("c", "eager")] and result["only_new"] == [("e", "eager")]
    assert result["peer_ratio"] == pytest.approx(1.01)
    paths = []
    for name, rec in (("old.json", old), ("new.json", new)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(rec))
    assert tool.main([str(p) for p in paths]) == 1
    out = capsys.readouterr().out
    assert "a eager leanattn: 1.040x" in out and "b eager leanattn" not in out.split("rows more than")[1]
    assert "shapes only in the baseline: c (eager)" in out and "shapes only in the new run: e (eager)" in out
    assert tool.main([str(paths[0]), str(paths[0])]) == 0
    assert tool.main([str(paths[0]), str(paths[0]), "--tolerance", "0.05"]) == 0
    assert tool.main([str(paths[1]), str(paths[0]), "--tolerance", "0.01"]) == 0  # faster is never flagged


def test_compare_keeps_graph_patterns_apart():
    tool = _compare_tool()
    plain = _record("graph", [("a", "leanattn", 0.010)], pattern="plain")
    append = _record("graph", [("a", "leanattn", 0.020)], pattern="append")
    result = tool.compare(plain, append)
    assert result["lines"] == [] and result["only_old"] == [("a", "graph")] and result["only_new"] == [("a", "graph/append")]
    assert not tool.compare(append, append)["lines"][0]["flagged"]


def test_compare_reads_the_committed_results():
    tool = _compare_tool()
    root = Path(__file__).parents[1] / "benchmarks" / "results"
    for name in ("h200", "h200-serving"):
        record = json.loads((root / name / "results.json").read_text())
        result = tool.compare(record, record)
        assert result["lines"] and not any(ln["flagged"] for ln in result["lines"])
        assert all(ln["ratio"] == 1.0 for ln in result["lines"] if ln["ratio"] is not None)


class _ReplayedStep:
    """A stand-in for a captured CUDA graph on the CPU: a replay runs the step again."""

    def __init__(self, step):
        self.step = step

    def replay(self) -> None:
        self.step()


@pytest.mark.skipif(ON_GPU, reason="stands a re-run step in for the CUDA graph; the GPU runs the bench itself")
def test_serving_shape_append_flow_on_the_cpu(monkeypatch):
    """run_serving_shape with the graph replaced by re-running the step (interpreter): leanattn's
    two methods see the appended token; a method that misses it gets a FAILED row with both
    errors and no time; the plain pattern has no such check."""
    from leanattn.bench import serving

    monkeypatch.setattr(serving, "capture_cuda_graph", lambda step: (_ReplayedStep(step), step()))
    monkeypatch.setattr(serving, "layer_count", lambda shape: 2)
    monkeypatch.setattr(serving, "host_us", lambda one_call, context=None: 4.0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)

    def early(shape, ls):  # reads q but stops one key short: the newest token is never seen
        def layer(i):
            x = ls.xs[i]
            return leanattn.decode(x.q, x.k, x.v, x.seqlens - 1, block_table=x.block_table)

        return serving.Prepared(layer, lambda: None)

    monkeypatch.setitem(serving.SERVING_METHODS, "early", early)
    shape = parse_shape("2x96@8/2:d=32:page=16")
    rows = {r["method"]: r for r in serving.run_serving_shape(shape, ["leanattn", "leanattn_decode", "early"], CPU,
                                                             "append", rounds=2, bench=lambda fn: (fn(), 0.5)[1])}
    for m in ("leanattn", "leanattn_decode"):
        r = rows[m]
        assert r["rel_err"] < TOLERANCE < r["rel_err_without_append"] and r["pattern"] == "append", r
        assert r["ms"] == 0.25 and r["round_ms"] == [0.25, 0.25] and r["host_us"] == 4.0 and r["append_us"] == 250.0
    assert rows["early"]["status"].startswith("FAILED: early: off the reference with the appended token by")
    assert "ms" not in rows["early"]
    plain = {r["method"]: r for r in serving.run_serving_shape(shape, ["leanattn", "early"], CPU, "plain", rounds=1,
                                                              bench=lambda fn: 1.0)}
    assert plain["leanattn"]["rel_err"] < TOLERANCE and "append_us" not in plain["leanattn"]
    assert plain["early"]["ms"] == 0.5 and "status" not in plain["early"]  # per layer
    with pytest.raises(ValueError, match="pattern must be one of append, plain"):
        serving.run_serving_shape(shape, ["leanattn"], CPU, "sideways")


def test_flashinfer_tensor_core_decode_is_refused_at_head_dims_where_it_faults():
    from leanattn.bench.peers import refuse_flashinfer_head_dim

    refuse_flashinfer_head_dim(parse_shape("1x4k@32/8:d=128"), tensor_cores=True)
    refuse_flashinfer_head_dim(parse_shape("1x4k@32/8:d=80"), tensor_cores=False)
    with pytest.raises(Unsupported, match="head dim 80"):
        refuse_flashinfer_head_dim(parse_shape("1x4k@32/8:d=80"), tensor_cores=True)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7])
def test_take_turns_balances_who_runs_right_after_whom(n):
    """Over a full cycle of rounds (n for an even number of methods, 2n for an odd one), each
    method runs first equally often and follows every other method equally often within a
    round: a method that heats the GPU or moves its clocks does not always precede the same one."""
    order: list[int] = []
    names = list(range(n))
    rounds = n if n % 2 == 0 else 2 * n
    rounds_mod.take_turns(names, rounds, lambda m: order.append(m))
    runs = [order[r * n:(r + 1) * n] for r in range(rounds)]
    assert all(sorted(run) == names for run in runs)
    firsts = [run[0] for run in runs]
    assert all(firsts.count(m) == rounds // n for m in names)
    pairs = [(a, b) for run in runs for a, b in zip(run, run[1:])]
    want = 1 if n % 2 == 0 else 2
    assert all(pairs.count((a, b)) == want for a in names for b in names if a != b), pairs
