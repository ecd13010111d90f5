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


def test_timeline_tool_instruments_the_current_kernel():
    """benchmarks/timeline.py finds its anchors in the kernel source: four timestamps per program,
    and the copy keeps the kernel's signature (so a KernelConfig(kernel=...) can launch it)."""
    import importlib.util
    import inspect
    from pathlib import Path

    from leanattn._testing import lean_decode_kernel

    path = Path(__file__).parents[1] / "benchmarks" / "timeline.py"
    spec = importlib.util.spec_from_file_location("timeline_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    timed = tool.instrumented_kernel()
    assert timed.arg_names == lean_decode_kernel.arg_names
    src = inspect.getsource(timed.fn)
    assert [f"_stamp(Lse, batch, stride_lb, pid, {k})" in src for k in range(4)] == [True] * 4
