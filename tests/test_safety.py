"""Serving safety: bounded page reads, check mode, autograd refusal, concurrent streams."""

from __future__ import annotations

import math

import pytest
import torch

import leanattn
from leanattn._testing import WORKSPACES

from _util import DEVICE, ON_GPU, assert_close, make_inputs, poisoned_like, reference, tile_size, to_paged

BAD_IDS = ["num_pages", -1, 10**6, -2 * 10**9]


def _paged_case(seed: int = 0):
    t = tile_size(64, torch.bfloat16, 4)
    lens = [3 * t + 5, 2 * t, 17, 0]
    q, k, v, sl = make_inputs(lens, 8, 2, 64, torch.bfloat16, cache_len=4 * t, seed=seed)
    kp, vp, table = to_paged(k, v, lens, 16, seed=seed)
    # The pools are views of buffers one finite page longer: a read of page num_pages (a dropped
    # bound) would find finite data there, and the NaN rows the test asks for would be missing.
    kp, vp = (torch.cat([x, torch.ones_like(x[:1])])[:-1] for x in (kp, vp))
    return q, k, v, sl, kp, vp, table


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("api", ["decode", "wrapper"])
def test_out_of_range_page_gives_nan_rows_for_its_sequence_only(bad, api):
    """A bad id in a live slot of sequence 1: its rows and LSE are NaN; every other sequence is
    bitwise what it is with a valid table; nothing outside the cache is read (the interpreter
    and the GPU would fault or return garbage otherwise)."""
    q, k, v, sl, kp, vp, table = _paged_case()
    bad_table = table.clone()
    bad_table[1, 1] = kp.shape[0] if bad == "num_pages" else bad

    def call(tab):
        out = poisoned_like(q)
        if api == "decode":
            _, lse = leanattn.decode(q, kp, vp, sl, block_table=tab, out=out, return_lse=True, num_programs=7)
        else:
            w = leanattn.DecodeWrapper(8, 2, 64, torch.bfloat16, DEVICE, num_programs=7, paged=True)
            w.plan(sl, tab.shape[1] * 16)
            _, lse = w.run(q, kp, vp, block_table=tab, out=out, return_lse=True)
        return out, lse

    good_out, good_lse = call(table)
    assert_close(good_out, good_lse, *reference(q, k, v, sl))
    out, lse = call(bad_table)
    assert torch.isnan(out[1]).all() and torch.isnan(lse[1]).all()
    others = [0, 2, 3]
    assert torch.equal(out[others], good_out[others]) and torch.equal(lse[others], good_lse[others])


@pytest.mark.parametrize("where", ["last page, two query tokens", "before the window"])
def test_out_of_range_page_poisons_only_the_rows_that_attend_to_it(where):
    """Length 97 in pages of 16: the last page holds key 96 alone. With two causal query tokens
    only the second attends to it, so only the second is NaN; a window of 20 never reaches page
    0, so a bad id there changes nothing. The clean sequence 1 is bitwise unchanged throughout."""
    lens = [97, 97]
    q, k, v, sl = make_inputs(lens, 8, 2, 64, torch.bfloat16, cache_len=112, seed=3)
    q = torch.randn(2, 2, 8, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).to(DEVICE)
    kp, vp, table = to_paged(k, v, lens, 16, seed=3)
    bad_table = table.clone()
    window = (20, 0) if where == "before the window" else (-1, -1)
    bad_table[0, 0 if where == "before the window" else 6] = kp.shape[0] + 5

    def call(tab):
        out = poisoned_like(q)
        _, lse = leanattn.decode(q, kp, vp, sl, block_table=tab, out=out, return_lse=True, num_programs=5,
                                 window_size=window)
        return out, lse

    good_out, good_lse = call(table)
    assert_close(good_out, good_lse, *reference(q, k, v, sl, window_size=window))
    out, lse = call(bad_table)
    if where == "before the window":
        assert torch.equal(out, good_out) and torch.equal(lse, good_lse)
    else:
        assert torch.isnan(out[0, 1]).all() and torch.isnan(lse[0, :, 1]).all()
        assert torch.equal(out[0, 0], good_out[0, 0]) and torch.equal(lse[0, :, 0], good_lse[0, :, 0])
        assert torch.equal(out[1], good_out[1]) and torch.equal(lse[1], good_lse[1])


def test_check_mode_names_sequence_slot_and_value():
    q, k, v, sl, kp, vp, table = _paged_case()
    num_pages = kp.shape[0]
    leanattn.decode(q, kp, vp, sl, block_table=table, check=True)  # valid: no error
    bad_table = table.clone()
    bad_table[0, 2] = num_pages + 3
    with pytest.raises(ValueError, match=rf"block_table\[0, 2\] = {num_pages + 3} .*sequence 0, slot 2"):
        leanattn.decode(q, kp, vp, sl, block_table=bad_table, check=True)
    # Garbage in unused slots (past the live length) is fine: to_paged fills them with huge ids.
    assert (table[2, 2:] >= num_pages).all()
    cap = table.shape[1] * 16
    for lens, msg in (([1, -1, 0, 0], r"cache_seqlens\[1\] = -1"), ([cap + 1, 0, 0, 0], rf"cache_seqlens\[0\] = {cap + 1}")):
        with pytest.raises(ValueError, match=msg):
            leanattn.decode(q, kp, vp, torch.tensor(lens, dtype=torch.int32, device=DEVICE), block_table=table, check=True)
    pad = torch.tensor([0, 0, 18, 0], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"cache_leftpad\[2\] = 18 .*cache_seqlens=17"):
        leanattn.decode(q, kp, vp, sl, block_table=table, cache_leftpad=pad, check=True)
    # A sequence left empty by its left padding has no live slot: garbage there is fine.
    pad = torch.tensor([0, 0, 17, 0], dtype=torch.int32, device=DEVICE)
    emptied = table.clone()
    emptied[2, 1] = -7  # the slot holding position 17
    leanattn.decode(q, kp, vp, sl, block_table=emptied, cache_leftpad=pad, check=True)


def test_wrapper_check_mode():
    q, k, v, sl, kp, vp, table = _paged_case()
    w = leanattn.DecodeWrapper(8, 2, 64, torch.bfloat16, DEVICE, num_programs=5, paged=True)
    cap = table.shape[1] * 16
    with pytest.raises(ValueError, match=r"cache_seqlens\[3\] = -2"):
        w.plan(torch.tensor([1, 1, 1, -2], dtype=torch.int32, device=DEVICE), cap, check=True)
    w.plan(sl, cap, check=True)
    w.run(q, kp, vp, block_table=table, check=True)
    bad_table = table.clone()
    bad_table[1, 0] = -5
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = -5 .*sequence 1, slot 0"):
        w.run(q, kp, vp, block_table=bad_table, check=True)


@pytest.mark.parametrize("which", ["q", "k_cache", "v_cache"])
def test_inputs_that_require_grad_are_refused(which):
    q, k, v, sl = make_inputs([20, 7], 4, 2, 64, torch.float16)
    args = {"q": q, "k_cache": k, "v_cache": v}
    args[which] = args[which].clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match=rf"no backward pass.*{which} require"):
        leanattn.decode(args["q"], args["k_cache"], args["v_cache"], sl, num_programs=3)
    w = leanattn.DecodeWrapper(4, 2, 64, torch.float16, DEVICE, num_programs=3)
    w.plan(sl, k.shape[1])
    with pytest.raises(RuntimeError, match="no backward pass"):
        w.run(args["q"], args["k_cache"], args["v_cache"])
    with torch.no_grad():  # fine without grad mode
        out = leanattn.decode(args["q"], args["k_cache"], args["v_cache"], sl, num_programs=3)
    assert_close(out, None, reference(q, k, v, sl)[0], None)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_two_streams_overlapping_calls_with_split_heads():
    """Two DecodeWrappers (each owns its workspace) on two streams at once, many iterations,
    heads split over many programs; every result checked against the reference."""
    cases = [make_inputs([60000, 3, 20000], 32, 8, 128, torch.bfloat16, seed=s) for s in range(2)]
    refs = [reference(*c) for c in cases]
    streams = [torch.cuda.Stream() for _ in cases]
    wrappers = [leanattn.DecodeWrapper(32, 8, 128, torch.bfloat16, DEVICE) for _ in cases]
    for w, (q, k, v, sl) in zip(wrappers, cases):
        w.plan(sl, k.shape[1])
    outs = [torch.empty_like(c[0]) for c in cases]
    lses = [None, None]
    torch.cuda.synchronize()
    for _ in range(50):
        for i, ((q, k, v, sl), s, w) in enumerate(zip(cases, streams, wrappers)):
            with torch.cuda.stream(s):
                outs[i].fill_(math.nan)
                lses[i] = w.run(q, k, v, out=outs[i], return_lse=True)[1]
        torch.cuda.synchronize()
        for out, lse, ref in zip(outs, lses, refs):
            assert_close(out, lse, *ref)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_graph_captured_on_a_side_stream():
    """Capture on a stream that never ran leanattn: the capture uses the device's workspace (made
    by the eager warm-up); eager calls on that stream afterwards and replays with new lengths stay
    right."""
    q, k, v, sl = make_inputs([9000, 1, 0, 4000], 32, 8, 128, torch.bfloat16)
    leanattn.decode(q, k, v, sl)  # warm-up, on the default stream
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    out = torch.empty_like(q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        _, lse = leanattn.decode(q, k, v, sl, out=out, return_lse=True)
    with torch.cuda.stream(side):
        eager, eager_lse = leanattn.decode(q, k, v, sl, return_lse=True)
    torch.cuda.synchronize()
    assert_close(eager, eager_lse, *reference(q, k, v, sl))
    for lens in ([1, 9000, 3, 0], [9000, 9000, 9000, 9000]):
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        out.fill_(math.nan)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, lse, *reference(q, k, v, sl))


def test_reserve_workspace_covers_the_calls_it_names():
    """After reserve_workspace, a decode of that shape allocates nothing (so it can run first in a
    CUDA graph's warm-up); a larger grid still grows the workspace."""
    dev = torch.device(DEVICE)
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    WORKSPACES.pop(dev, None)
    leanattn.reserve_workspace(dev, 8, 2, 64, torch.bfloat16, q_len=2, num_programs=5)
    ws = WORKSPACES[dev]
    acc = ws.acc
    q = torch.randn(3, 2, 8, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(3, 40, 2, 64, device=dev, dtype=torch.bfloat16)
    out = leanattn.decode(q, k, k, num_programs=5)
    assert ws.acc is acc and torch.isfinite(out).all()
    leanattn.decode(q, k, k, num_programs=9)
    assert ws.acc is not acc


def test_reserve_workspace_covers_paged_and_contiguous_grids(monkeypatch):
    """Where paged and contiguous caches take different grids, reserve_workspace (which does not
    know the kind) reserves for the larger: a paged decode after it allocates nothing."""
    from leanattn import KernelConfig
    from leanattn.kernels import config as kernel_config

    real = kernel_config.choose_config

    def two_grids(head_dim, kv_dtype, rows, paged=False, batch_invariant=False, large=False):  # 3 vs 1 an SM
        c = real(head_dim, kv_dtype, rows, paged, batch_invariant, large)
        return KernelConfig(c.tile, c.num_warps, c.num_stages, programs_per_sm=3 if paged else 1)

    monkeypatch.setattr(kernel_config, "choose_config", two_grids)
    monkeypatch.setattr(leanattn._call, "heuristic", lambda d, dt, rows, paged, bi, large=False: two_grids(d, dt, rows, paged, bi))
    monkeypatch.setattr(leanattn._launch, "grid_size", lambda device, per_sm: 4 * per_sm)  # 4 "SMs", also on the CPU
    dev = torch.device(DEVICE)
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    WORKSPACES.pop(dev, None)
    leanattn.reserve_workspace(dev, 8, 2, 64, torch.bfloat16)
    ws = WORKSPACES[dev]
    acc = ws.acc
    q = torch.randn(2, 1, 8, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(2, 64, 2, 64, device=dev, dtype=torch.bfloat16)
    kp, vp, table = to_paged(k, k, [64, 64], 16)
    out = leanattn.decode(q, kp, vp, block_table=table)
    assert ws.acc is acc and torch.isfinite(out).all()
