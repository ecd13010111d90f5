"""The GPU sweep (tests/sweep_gpu.py) and the sanitizer cases (benchmarks/sanitize_cases.py),
run small on whatever device there is (the Triton interpreter on the CPU)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

import leanattn

import sweep_gpu
from _util import DEVICE

SMALL = ["--max-len", "80", "--max-batch", "3", "--kv-heads", "1,2", "--grids", "none,1,7"]
SMALL_LIMITS = sweep_gpu.Limits(max_batch=3, max_len=80, kv_heads=(1, 2), grids=(None, 1, 7))


def test_sweep_runs_clean_and_writes_its_summary(tmp_path):
    path = tmp_path / "sweep.json"
    assert sweep_gpu.main(["--cases", "5", "--seed", "3", "--out", str(path), *SMALL]) == 0
    result = json.loads(path.read_text())
    summary = result["summary"]
    assert (summary["seed"], summary["cases"], summary["failures"]) == (3, 5, 0)
    assert summary["runtime_s"] > 0 and summary["gpu"] and result["failures"] == []
    assert len(result["variants"]) == summary["variants"] == sweep_gpu.Limits().variants


def test_sweep_paths_bad_pages_check_mode_and_both_apis():
    """Forced through the rarer paths: out-of-range pages in live slots (NaN rows expected) and
    check mode; the cases must use both APIs and a paged cache."""
    limits = dataclasses.replace(SMALL_LIMITS, bad_page_rate=0.5, check_rate=1.0, clamp_rate=0.0)
    pool = sweep_gpu.draw_pool(11, limits.variants)
    cases = [sweep_gpu.draw_case(11, i, pool, limits, graph_ok=False) for i in range(40)]
    bad = next(c for c in cases if c.bad_page is not None)
    checked = next(c for c in cases if c.check and c.variant.page_size == 0)
    wrapped = next(c for c in cases if c.variant.api == "wrapper" and c.layers == 2)
    for case in (bad, checked, wrapped):
        assert sweep_gpu.run_case(case, DEVICE) is None, case


def test_sweep_reports_a_wrong_element(monkeypatch, tmp_path):
    """A result off in one element must fail its case, and the record must re-run it."""
    real_decode, real_run = leanattn.decode, leanattn.DecodeWrapper.run

    def corrupt(res):
        out = res[0] if isinstance(res, tuple) else res
        # Far off whatever the sequence (empty rows must be exact zeros, NaN rows all NaN).
        out[-1, 0, -1, 0] = 1e4
        return res

    monkeypatch.setattr(leanattn, "decode", lambda *a, **kw: corrupt(real_decode(*a, **kw)))
    monkeypatch.setattr(leanattn.DecodeWrapper, "run", lambda self, *a, **kw: corrupt(real_run(self, *a, **kw)))
    path = tmp_path / "sweep.json"
    assert sweep_gpu.main(["--cases", "3", "--seed", "5", "--out", str(path), *SMALL]) == 1
    result = json.loads(path.read_text())
    assert result["summary"]["failures"] == len(result["failures"]) == 3
    first = result["failures"][0]
    assert first["case"] == 0 and "sequence" in first["error"]
    assert first["repro"].endswith("--seed 5 --case 0 --max-batch 3 --max-len 80 --kv-heads 1,2 --grids none,1,7")
    pool = sweep_gpu.draw_pool(5, SMALL_LIMITS.variants)
    assert first["params"] == sweep_gpu.draw_case(5, 0, pool, SMALL_LIMITS, graph_ok=False).to_dict()


def test_cases_are_drawn_from_seed_and_index_alone():
    pool = sweep_gpu.draw_pool(0, 40)
    assert pool == sweep_gpu.draw_pool(0, 40) != sweep_gpu.draw_pool(1, 40)
    limits = sweep_gpu.Limits()
    a = sweep_gpu.draw_case(0, 123, pool, limits, graph_ok=True)
    assert a == sweep_gpu.draw_case(0, 123, pool, limits, graph_ok=True)
    assert a != sweep_gpu.draw_case(0, 124, pool, limits, graph_ok=True)
    graphs = [i for i in range(200) if sweep_gpu.draw_case(0, i, pool, limits, graph_ok=True).graph]
    assert graphs == [25, 75, 125, 175]


def test_pool_covers_every_axis_within_few_kernels():
    """Every value of every compile-time axis is in the pool, and a case's runtime draws stay in
    its variant's specialisation classes (so the pool bounds the compiles)."""
    pool = sweep_gpu.draw_pool(7, 40)
    for axis, values in (("head_dim", sweep_gpu.HEAD_DIMS), ("group", sweep_gpu.GROUPS),
                         ("page_size", sweep_gpu.PAGE_SIZES), ("dtype", tuple(sweep_gpu.DTYPES)),
                         ("leftpad", (False, True)), ("return_lse", (False, True)),
                         ("has_seqlens", (False, True)), ("api", ("decode", "wrapper")),
                         ("q_len", set(sweep_gpu.Q_LENS)), ("kv", tuple(sweep_gpu.KV_DTYPES)),
                         ("window", (False, True)), ("causal", (False, True)), ("softcap", (False, True)),
                         ("sinks", (False, True)), ("scale_kinds", set(sweep_gpu.SCALE_KINDS) | {"-"}),
                         ("merge", set(sweep_gpu.MERGES))):
        assert {getattr(v, axis) for v in pool} == set(values), axis
    assert all((v.scale_kinds == "-") == (v.kv == "same") for v in pool)
    assert all((v.config is None) == (v.merge == "auto") for v in pool)
    assert {v.config.merge_kernel for v in pool if v.config is not None} == {False, True}
    limits = sweep_gpu.Limits()
    for i in range(2000):
        c = sweep_gpu.draw_case(7, i, pool, limits)
        v = c.variant
        assert sweep_gpu.grid_class(c.num_programs) == v.grid_class
        assert not v.return_lse or sweep_gpu.int_class(v.group * c.kv_heads) == v.lse_class
        if v.page_size:
            slots = c.capacity // v.page_size
            assert c.capacity % v.page_size == 0 and c.table_stride >= slots
            assert sweep_gpu.int_class(c.table_stride) == v.table_class
        # Within the cache budget, but for the capacity's slack and page rounding.
        slack = 2 * v.tile + max(v.page_size, 1)
        assert c.batch * c.kv_heads * v.head_dim * (c.capacity - slack) <= sweep_gpu.CACHE_ELEMENTS
        assert all(0 <= n for n in c.lens) and len(c.lens) == c.batch
        assert (c.window_size != [-1, -1]) == v.window and (c.softcap > 0) == v.softcap
        assert (c.scales != "-") == (v.kv != "same") and v.q_len * v.group <= leanattn.max_query_rows(v.head_dim)


def test_paging_copies_owned_slots_and_fills_the_rest_with_garbage():
    """The sweep's pages hold the dense cache's slots; every dead slot holds an id outside the
    pool, and the reference reads the same keys through the pages."""
    import random

    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(3, 64, 2, 16, generator=gen), torch.randn(3, 64, 2, 16, generator=gen)
    lens, pads = [0, 33, 64], [0, 17, 0]
    owned = sweep_gpu._live_slots(lens, pads, 64, 16)
    assert owned.tolist() == [[False] * 4, [False, True, True, False], [True] * 4]
    for strided in (False, True):
        kp, vp, ids = sweep_gpu.page_cache(k, v, owned, 16, gen, gen, strided)
        assert kp.shape == (6 + 3, 16, 2, 16) and kp.is_contiguous() != strided
        table = sweep_gpu.table_for(ids, lens, pads, 64, 16, kp.shape[0], random.Random(0))
        dead = ~owned
        assert ((table[dead] < 0) | (table[dead] >= kp.shape[0])).all()
        for b, s in owned.nonzero().tolist():
            page = int(table[b, s])
            assert torch.equal(kp[page], k[b, 16 * s : 16 * s + 16])
            assert torch.equal(vp[page], v[b, 16 * s : 16 * s + 16])


def test_sanitize_cases_run_clean():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import sanitize_cases

    assert sanitize_cases.main() == 0
