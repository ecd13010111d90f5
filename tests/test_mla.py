"""MLA decode (leanattn.mla_decode, MLAWrapper) against the float64 reference: contiguous and paged
caches, ragged and empty sequences, several query tokens, split and merged blocks, fp8 scales,
bad pages, argument errors; GPU cases at DeepSeek-V3's shapes (576 / 512)."""

from __future__ import annotations

import math

import pytest
import torch

import dataclasses

import leanattn
from leanattn._testing import MLA_CALLS, MLA_KNOWN, blocks_of, gluon_serves, launch_plan, mla_heuristic, mla_tma_view
from leanattn.kernels.config import choose_mla_config, interpreting
from leanattn.kernels.mla_decode import mla_merge_kernel

from _util import DEVICE, ON_GPU, TOL, LSE_TOL, rel_err, to_paged

FP8 = torch.float8_e4m3fn


def mla_inputs(lens, q_heads, head_dim, *, q_len=1, dtype=torch.bfloat16, cache_len=None, seed=0):
    """Random q (batch, q_len, q_heads, head_dim), kv_cache (batch, cache_len, 1, head_dim) and lengths."""
    gen = torch.Generator().manual_seed(seed)
    n = cache_len or max(max(lens), 1)
    q = torch.randn(len(lens), q_len, q_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    kv = torch.randn(len(lens), n, 1, head_dim, generator=gen).to(dtype).to(DEVICE)
    return q, kv, torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def paged(kv, lens, page_size, seed=0):
    kp, _, table = to_paged(kv, kv, lens, page_size, seed=seed)
    return kp, table


def check(out, lse, q, kv, sl, dv, **kw):
    """Output written, finite, within the dtype's tolerance of the float64 reference; LSE too."""
    ref, ref_lse = leanattn.reference.mla_decode(q.double(), kv.double() if kv.dtype.itemsize > 1 else kv, sl,
                                                 head_dim_v=dv, return_lse=True, **kw)
    assert out.shape == (*q.shape[:3], dv)
    assert torch.isfinite(out).all(), "output has NaN/inf: unwritten or broken elements"
    err = rel_err(out, ref)
    assert err < TOL[out.dtype], f"relative error {err:.3e}"
    if lse is not None:
        empty = torch.isinf(ref_lse)
        assert torch.equal(torch.isinf(lse), empty)
        if (~empty).any():
            assert (lse[~empty] - ref_lse[~empty]).abs().max().item() < LSE_TOL


# (lens, q_heads, head_dim, head_dim_v, q_len)
CASES = [
    ([70, 0, 131], 4, 80, 64, 1),  # ragged with an empty sequence
    ([45, 97], 8, 80, 64, 2),  # two query tokens, causal
    ([150], 2, 64, 48, 1),  # head_dim_v not a power of two
    ([33, 64], 6, 64, 64, 3),  # no rope part; 3 tokens x 6 heads
]


@pytest.mark.parametrize("programs", [None, 3, 7])
@pytest.mark.parametrize("lens,hq,d,dv,q_len", CASES)
def test_contiguous(lens, hq, d, dv, q_len, programs):
    q, kv, sl = mla_inputs(lens, hq, d, q_len=q_len)
    out, lse = leanattn.mla_decode(q, kv, sl, head_dim_v=dv, return_lse=True, num_programs=programs)
    check(out, lse, q, kv, sl, dv)


# Under the interpreter tiles are 32 keys: pages of 32 and 64 take the TMA loop (a tile within a
# page, 64: two tiles a page), 16 and 7 the pointer loop.
@pytest.mark.parametrize("page_size", [16, 7, 32, 64])
def test_paged(page_size):
    lens = [90, 0, 41]
    q, kv, sl = mla_inputs(lens, 4, 80, q_len=2, seed=1)
    kp, table = paged(kv, lens, page_size)
    out, lse = leanattn.mla_decode(q, kp, sl, block_table=table, head_dim_v=64, return_lse=True, num_programs=5)
    check(out, lse, q, kp, sl, 64, block_table=table)


def test_not_causal_scale_and_out():
    lens = [60, 20]
    q, kv, sl = mla_inputs(lens, 4, 80, q_len=2, seed=2)
    out = torch.full((2, 2, 4, 64), math.nan, dtype=q.dtype, device=DEVICE)
    lse = torch.full((2, 4, 2), math.nan, device=DEVICE)
    got, got_lse = leanattn.mla_decode(q, kv, sl, head_dim_v=64, causal=False, softmax_scale=0.3, out=out, lse=lse,
                                       return_lse=True)
    assert got is out and got_lse is lse
    check(out, lse, q, kv, sl, 64, causal=False, softmax_scale=0.3)


def test_deepseek_shape_short_cache():
    """576 values a token, V its first 512; 128 heads: two blocks of 64 rows on one cache."""
    lens = [40, 7]
    q, kv, sl = mla_inputs(lens, 128, 576, seed=3)
    config = mla_heuristic(576, 512, kv.dtype, 128)
    assert blocks_of(1, 128, config.block_rows) == (64, 2)
    out, lse = leanattn.mla_decode(q, kv, sl, softmax_scale=192**-0.5, return_lse=True, num_programs=3)
    check(out, lse, q, kv, sl, 512, softmax_scale=192**-0.5)


def test_blocks_split_and_merge_bitwise():
    """A block cut among many programs is merged exactly; the same call twice gives the same bits."""
    q, kv, sl = mla_inputs([200, 150], 8, 80, q_len=1, seed=4)
    a = leanattn.mla_decode(q, kv, sl, head_dim_v=64, num_programs=11)
    b = leanattn.mla_decode(q, kv, sl, head_dim_v=64, num_programs=11)
    assert torch.equal(a, b)
    check(a, None, q, kv, sl, 64)


def test_batch_invariant():
    q, kv, sl = mla_inputs([130, 70, 0], 4, 80, seed=5)
    kw = dict(head_dim_v=64, batch_invariant=True, split_size=64, return_lse=True)
    out, lse = leanattn.mla_decode(q, kv, sl, num_programs=4, **kw)
    check(out, lse, q, kv, sl, 64)
    alone, alone_lse = leanattn.mla_decode(q[:1], kv[:1], sl[:1], num_programs=9, **kw)
    assert torch.equal(alone, out[:1]) and torch.equal(alone_lse, lse[:1])


@pytest.mark.parametrize("kind", ["float", "token"])
@pytest.mark.parametrize("paged_cache", [False, True])
def test_fp8(kind, paged_cache):
    lens = [75, 30]
    q, kv, sl = mla_inputs(lens, 4, 80, q_len=2, seed=6)
    kv8 = kv.to(FP8)
    kw = {}
    if paged_cache:
        kv8, table = paged(kv8, lens, 16)
        kw["block_table"] = table
    if kind == "float":
        scale = 0.6
    else:
        gen = torch.Generator().manual_seed(6)
        scale = (10 ** (torch.rand(tuple(kv8.shape[:3]), generator=gen) * 4 - 3)).to(DEVICE)
    out, lse = leanattn.mla_decode(q, kv8, sl, head_dim_v=64, kv_scale=scale, return_lse=True, **kw)
    check(out, lse, q, kv8, sl, 64, kv_scale=scale, **kw)


@pytest.mark.parametrize("page_size", [16, 32])
def test_bad_page_gives_nan_rows(page_size):
    lens = [50, 40]
    q, kv, sl = mla_inputs(lens, 4, 80, seed=7)
    kp, table = paged(kv, lens, page_size)
    table[1, 1] = 10**6  # a live slot of sequence 1
    out = leanattn.mla_decode(q, kp, sl, block_table=table, head_dim_v=64)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    with pytest.raises(ValueError, match=r"block_table\[1, 1\]"):
        leanattn.mla_decode(q, kp, sl, block_table=table, head_dim_v=64, check=True)


def test_tma_view_takes_row_tiles_of_16_bit_and_fp8_caches():
    """The 2-D views of the TMA loops: contiguous 16-bit or fp8 caches and pages of a multiple of
    the tile; not smaller pages, rows whose stride is not a multiple of 16 bytes or unevenly
    spaced, or widths that are not powers of two; a rope cache apart with its own row stride.
    The Triton kernel's TMA loop reads 16-bit caches only (fp8 views are mla_gluon's)."""
    kv = torch.zeros(3, 96, 1, 80, dtype=torch.bfloat16, device=DEVICE)
    assert mla_tma_view(kv, None, 0, 64, 16, 32) == (3 * 96, 32, (80, 64), (80, 16))
    assert mla_tma_view(kv, None, 96, 64, 16, 32) == (3 * 96, 32, (80, 64), (80, 16))
    assert mla_tma_view(kv, None, 96, 64, 16, 64) is None  # a 64-key tile would cross pages of 96
    assert mla_tma_view(kv.to(FP8), None, 0, 64, 16, 32) == (3 * 96, 32, (80, 64), (80, 16))
    odd = torch.zeros(3, 96, 1, 88, dtype=torch.bfloat16, device=DEVICE)
    assert mla_tma_view(odd[..., :80], None, 0, 64, 16, 32) is not None  # rows 176 bytes apart
    assert mla_tma_view(odd.to(FP8)[..., :80], None, 0, 64, 16, 32) is None  # rows 88 bytes apart
    q, _, sl = mla_inputs([70, 3], 4, 80, cache_len=96, seed=2)
    MLA_CALLS.clear()
    leanattn.mla_decode(q, kv[:2].to(FP8), sl, head_dim_v=64, kv_scale=0.5)
    assert [call.tma for call in MLA_CALLS.values()] == [None]
    assert mla_tma_view(kv, None, 0, 56, 24, 32) is None  # rope 24
    wide = torch.zeros(3, 100, 1, 80, dtype=torch.bfloat16, device=DEVICE)
    assert mla_tma_view(wide[:, :96], None, 0, 64, 16, 32) is None  # rows of the batch 100 apart, not 96
    latent, rope = kv[..., :64].contiguous(), torch.zeros(3, 96, 1, 16, dtype=torch.bfloat16, device=DEVICE)
    assert mla_tma_view(latent, rope, 0, 64, 16, 32) == (3 * 96, 32, (64, 64), (16, 16))
    assert mla_tma_view(latent, wide[:, :96, :, :16], 0, 64, 16, 32) is None


@pytest.mark.parametrize("page_size", [0, 64])  # 64: a multiple of the tile, CPU (32) or GPU (64)
def test_slots_past_the_length_are_never_read(page_size):
    """The TMA loop copies whole tiles: NaN in the dead slots after each sequence's length (the
    rest of its tile, of its page, the next sequence's rows) must not reach the output."""
    lens = [40, 17]
    q, kv, sl = mla_inputs(lens, 4, 80, cache_len=64, seed=3)
    for b, n in enumerate(lens):
        kv[b, n:] = math.nan
    kw = {}
    if page_size:
        kv, kw["block_table"] = paged(kv, lens, page_size)
    assert mla_tma_view(kv, None, page_size, 64, 16, mla_heuristic(80, 64, kv.dtype, 4).tile) is not None
    out, lse = leanattn.mla_decode(q, kv, sl, head_dim_v=64, return_lse=True, **kw)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    clean = torch.nan_to_num(kv, nan=0.0)
    check(out, lse, q, clean, sl, 64, **kw)


@pytest.mark.parametrize("page_size", [16, 32])
def test_empty_sequences_with_an_empty_block_table(page_size):
    """No live key: zeros and an LSE of -inf, and no block-table entry read (the table has none)."""
    q = torch.randn(2, 1, 4, 80).to(torch.bfloat16).to(DEVICE)
    kp = torch.randn(3, page_size, 1, 80).to(torch.bfloat16).to(DEVICE)
    table = torch.empty((2, 0), dtype=torch.int32, device=DEVICE)
    out, lse = leanattn.mla_decode(q, kp, torch.zeros(2, dtype=torch.int32, device=DEVICE), block_table=table,
                                   head_dim_v=64, return_lse=True)
    assert (out == 0).all() and torch.isinf(lse).all() and (lse < 0).all()


def test_batch_invariant_bits_do_not_depend_on_the_cache_layout():
    """Batch-invariant mode gives a sequence the same bits contiguous or paged, whichever tile
    loop the layout would otherwise take."""
    lens = [130, 70]
    q, kv, sl = mla_inputs(lens, 4, 80, seed=5)
    kw = dict(head_dim_v=64, batch_invariant=True, split_size=64, return_lse=True)
    out, lse = leanattn.mla_decode(q, kv, sl, **kw)
    for page_size in (32, 16):
        kp, table = paged(kv, lens, page_size)
        o, l = leanattn.mla_decode(q, kp, sl, block_table=table, **kw)
        assert torch.equal(o, out) and torch.equal(l, lse), f"page_size {page_size}"


def test_strided_cache_takes_the_pointer_loop_and_is_exact():
    """A cache viewed out of a longer one (rows not evenly spaced across the batch) is read by
    pointers, with the same results as its contiguous copy."""
    lens = [60, 33]
    q, kv, sl = mla_inputs(lens, 4, 80, cache_len=90, seed=8)
    view = kv[:, :64]
    assert mla_tma_view(view, None, 0, 64, 16, mla_heuristic(80, 64, view.dtype, 4).tile) is None
    out, lse = leanattn.mla_decode(q, view, sl, head_dim_v=64, return_lse=True)
    check(out, lse, q, view, sl, 64)
    same, same_lse = leanattn.mla_decode(q, view.contiguous(), sl, head_dim_v=64, return_lse=True)
    assert rel_err(same, out) < TOL[out.dtype] and (same_lse - lse).abs().max().item() < LSE_TOL


def test_wrapper_matches_function():
    lens = [120, 0, 33]
    q, kv, sl = mla_inputs(lens, 4, 80, q_len=2, seed=8)
    kp, table = paged(kv, lens, 16)
    w = leanattn.MLAWrapper(4, 80, 64, torch.bfloat16, DEVICE, max_q_len=2, num_programs=6)
    w.plan(sl, table.shape[1] * 16, q_len=2)
    out, lse = w.run(q, kp, block_table=table, return_lse=True)
    check(out, lse, q, kp, sl, 64, block_table=table)
    direct, direct_lse = leanattn.mla_decode(q, kp, sl, block_table=table, head_dim_v=64, return_lse=True,
                                             num_programs=6)
    assert torch.equal(out, direct) and torch.equal(lse, direct_lse)
    with pytest.raises(ValueError, match="planned for q_len 2"):
        w.run(q[:, :1], kp, block_table=table)


def test_wrapper_plan_recovers_from_a_run_on_unplanned_lengths():
    """As DecodeWrapper's: a run after the lengths changed without a plan (garbage, and tickets
    left raised) is undone by the next plan; later steps match the reference."""
    q, kv, _ = mla_inputs([128, 128], 4, 80, seed=10)
    sl = torch.tensor([64, 10], dtype=torch.int32, device=DEVICE)
    w = leanattn.MLAWrapper(4, 80, 64, torch.bfloat16, DEVICE, num_programs=5)
    w.plan(sl, 128)
    out, lse = w.run(q, kv, return_lse=True)
    check(out, lse, q, kv, sl, 64)
    sl.copy_(torch.tensor([128, 90], dtype=torch.int32))
    w.run(q, kv)  # the misuse
    for step in range(2):
        sl.copy_(torch.tensor([100 - 7 * step, 40 + step], dtype=torch.int32))
        w.plan(sl, 128)
        out, lse = w.run(q, kv, return_lse=True)
        check(out, lse, q, kv, sl, 64)


def test_wrapper_plan_that_fails_to_grow_the_workspace_leaves_the_last_plan(monkeypatch):
    """As DecodeWrapper's: a batch-invariant plan whose workspace growth fails changes nothing
    (here with a grid made to differ), and runs keep the last plan."""
    from leanattn import _call

    lens = [120, 33]
    q, kv, sl = mla_inputs(lens, 4, 80, seed=9)
    w = leanattn.MLAWrapper(4, 80, 64, torch.bfloat16, DEVICE, num_programs=5, batch_invariant=True)
    w.plan(sl, kv.shape[1])
    first = w.run(q, kv)
    state, bufs = (w.num_programs, w._config, w._split), w._bufs

    def refuse(*args, **kwargs):
        raise torch.OutOfMemoryError("no memory for the workspace")

    monkeypatch.setattr(_call, "grid", lambda *args: 7)
    monkeypatch.setattr(_call, "buffers", refuse)
    with pytest.raises(torch.OutOfMemoryError):
        w.plan(sl, kv.shape[1])
    assert (w.num_programs, w._config, w._split) == state and w._bufs is bufs
    monkeypatch.undo()
    out, _ = w.run(q, kv, return_lse=True)  # a new call, from the last plan
    assert torch.equal(out, first)


@pytest.mark.parametrize("change,match", [
    (dict(head_dim_v=72), "head_dim_v must be a multiple of 16"),
    (dict(head_dim_v=96), r"head_dim_v must be a multiple of 16 in \[16, head_dim=80\]"),
    (dict(kv=lambda kv: kv.expand(-1, -1, 2, -1)), "one latent head"),
    (dict(kv=lambda kv: kv[..., :64]), "head_dim 80 like q"),
    (dict(q=lambda q: q.expand(-1, 17, -1, -1)), r"q_len in \[1, 16\]"),
    (dict(q=lambda q: q.float()), "q must be float16 or bfloat16"),
    (dict(sl=lambda sl: sl.long()), "cache_seqlens must be int32"),
    (dict(kv_scale=0.5), "kv_scale dequantises an fp8 kv_cache"),
    (dict(out=lambda q: torch.empty(*q.shape, dtype=q.dtype)), r"out must be \(2, 1, 4, 64\)"),
])
def test_errors(change, match):
    q, kv, sl = mla_inputs([10, 5], 4, 80)
    q = change.get("q", lambda x: x)(q)
    kv = change.get("kv", lambda x: x)(kv)
    sl = change.get("sl", lambda x: x)(sl)
    kw = {"head_dim_v": change.get("head_dim_v", 64)}
    if "kv_scale" in change:
        kw["kv_scale"] = change["kv_scale"]
    if "out" in change:
        kw["out"] = change["out"](q)
    with pytest.raises((ValueError, TypeError), match=match):
        leanattn.mla_decode(q, kv, sl, **kw)


# cache_leftpad: the live keys of each sequence are cache positions [leftpad, seqlen). Contiguous
# caches take the TMA loop under the interpreter, pages of 32 the pointer loop (a left pad need not
# be tile-aligned), pages of 16 the pointer loop anyway.
@pytest.mark.parametrize("page_size", [0, 32, 16])
@pytest.mark.parametrize("q_len", [1, 3])
def test_cache_leftpad(page_size, q_len):
    lens, pads = [90, 70, 0, 40], [7, 0, 0, 40]  # a pad inside a tile, none, empty, all padding
    q, kv, sl = mla_inputs(lens, 4, 80, q_len=q_len, cache_len=96, seed=12)
    pad = torch.tensor(pads, dtype=torch.int32, device=DEVICE)
    kw = {}
    if page_size:
        kv, kw["block_table"] = paged(kv, [96] * 4, page_size)
    out, lse = leanattn.mla_decode(q, kv, sl, cache_leftpad=pad, head_dim_v=64, return_lse=True, num_programs=5,
                                   **kw)
    check(out, lse, q, kv, sl, 64, cache_leftpad=pad, **kw)
    # The padded keys are never read: poisoning them changes nothing.
    poisoned = kv.clone()
    for b, p in enumerate(pads):
        for t in range(p):
            row = (int(kw["block_table"][b, t // page_size]), t % page_size) if page_size else (b, t)
            poisoned[row] = math.nan
    again = leanattn.mla_decode(q, poisoned, sl, cache_leftpad=pad, head_dim_v=64, num_programs=5, **kw)
    assert torch.equal(again, out)
    w = leanattn.MLAWrapper(4, 80, 64, torch.bfloat16, DEVICE, max_q_len=3, num_programs=5)
    w.plan(sl, 96, q_len=q_len, cache_leftpad=pad)
    assert torch.equal(w.run(q, kv, **kw), out)
    with pytest.raises(ValueError, match=r"cache_leftpad\[3\] = 41"):
        leanattn.mla_decode(q, kv, sl, cache_leftpad=pad + (pad == 40).int(), head_dim_v=64, check=True, **kw)


# rope_cache: the rope part in a tensor of its own (transformers' DeepSeek cache, FlashInfer's kpe).
# The same rows as one 576-wide cache give the same bits, through either tile loop.
@pytest.mark.parametrize("page_size", [0, 32, 16])
@pytest.mark.parametrize("fp8", [False, True])
def test_rope_cache_apart(page_size, fp8):
    lens = [90, 0, 41]
    q, kv, sl = mla_inputs(lens, 4, 80, q_len=2, cache_len=96, seed=13)
    kw = {"kv_scale": 0.7} if fp8 else {}
    if fp8:
        kv = kv.to(FP8)
    if page_size:
        kv, kw["block_table"] = paged(kv, [96] * 3, page_size)
    latent, rope = kv[..., :64].contiguous(), kv[..., 64:].contiguous()
    pad = torch.tensor([3, 0, 40], dtype=torch.int32, device=DEVICE)
    fused, fused_lse = leanattn.mla_decode(q, kv, sl, cache_leftpad=pad, head_dim_v=64, return_lse=True,
                                           num_programs=5, **kw)
    out, lse = leanattn.mla_decode(q, latent, sl, rope_cache=rope, cache_leftpad=pad, head_dim_v=64, return_lse=True,
                                   num_programs=5, **kw)
    assert torch.equal(out, fused) and torch.equal(lse, fused_lse)
    check(out, lse, q, latent, sl, 64, rope_cache=rope, cache_leftpad=pad, **kw)
    w = leanattn.MLAWrapper(4, 80, 64, torch.bfloat16, DEVICE, kv_dtype=kv.dtype, max_q_len=2, num_programs=5)
    w.plan(sl, 96, q_len=2, cache_leftpad=pad)
    assert torch.equal(w.run(q, latent, rope_cache=rope, **kw), out)


@pytest.mark.parametrize("change,match", [
    (lambda kv, rope: (kv, rope[..., :8]), r"rope_cache must be \(3, 96, 1, 16\)"),
    (lambda kv, rope: (kv, rope[:2]), r"rope_cache must be \(3, 96, 1, 16\)"),
    (lambda kv, rope: (kv, rope.half()), "rope_cache must have kv_cache's dtype"),
    (lambda kv, rope: (torch.cat([kv, rope], -1), rope), "kv_cache must hold the latent only"),
])
def test_rope_cache_errors(change, match):
    q, kv, sl = mla_inputs([50, 20, 9], 4, 80, cache_len=96, seed=14)
    latent, rope = change(kv[..., :64].contiguous(), kv[..., 64:].contiguous())
    with pytest.raises((ValueError, TypeError), match=match):
        leanattn.mla_decode(q, latent, sl, rope_cache=rope, head_dim_v=64)


def test_known_layouts_skip_only_the_layout_checks(monkeypatch):
    """A call whose argument layout was checked before skips validation but not the per-call
    checks (grad, values with check=True), and gives the same bits; a new layout is checked."""
    import leanattn.mla as mla_module

    lens = [60, 33]
    q, kv, sl = mla_inputs(lens, 4, 80, seed=15)
    first = leanattn.mla_decode(q, kv, sl, head_dim_v=64, num_programs=5)
    checked, validate = [], mla_module.validate_mla
    monkeypatch.setattr(mla_module, "validate_mla", lambda *a: checked.append(a) or validate(*a))
    again = leanattn.mla_decode(q, kv, sl, head_dim_v=64, num_programs=5)
    assert torch.equal(again, first) and checked == []
    with pytest.raises(RuntimeError, match="no backward"):
        leanattn.mla_decode(q.clone().requires_grad_(), kv, sl, head_dim_v=64, num_programs=5)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 99"):
        leanattn.mla_decode(q, kv, torch.tensor([3, 99], dtype=torch.int32, device=DEVICE), head_dim_v=64,
                            num_programs=5, check=True)
    with pytest.raises(ValueError, match="head_dim_v must be a multiple of 16"):
        leanattn.mla_decode(q, kv, sl, head_dim_v=72, num_programs=5)
    assert len(checked) == 1


def test_lengths_checked():
    q, kv, sl = mla_inputs([10, 5], 4, 80)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 99"):
        leanattn.mla_decode(q, kv, torch.tensor([3, 99], dtype=torch.int32, device=DEVICE), head_dim_v=64, check=True)


# GPU: DeepSeek-V3's shapes (576 = 512 latent + 64 rope), the real grid.
GPU_CASES = [
    ([32768], 16, 1), ([32768, 1, 0, 20000], 128, 1), ([4096] * 16, 16, 1), ([8192] * 4, 128, 1),
    ([1152] * 32, 128, 1), ([3000, 17, 12345], 16, 2), ([5000, 300], 64, 4),
]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("page_size", [0, 64, 1])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("lens,hq,q_len", GPU_CASES)
def test_gpu_deepseek(lens, hq, q_len, fp8, page_size):
    q, kv, sl = mla_inputs(lens, hq, 576, q_len=q_len, seed=len(lens))
    kw = {}
    if fp8:
        kv = kv.to(FP8)
        kw["kv_scale"] = 0.8
    if page_size:
        kv, kw["block_table"] = paged(kv, lens, page_size)
    out, lse = leanattn.mla_decode(q, kv, sl, softmax_scale=192**-0.5, return_lse=True, **kw)
    check(out, lse, q, kv, sl, 512, softmax_scale=192**-0.5, **kw)
    again, again_lse = leanattn.mla_decode(q, kv, sl, softmax_scale=192**-0.5, return_lse=True, **kw)
    assert torch.equal(again, out) and torch.equal(again_lse, lse)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("page_size", [0, 64, 16])
@pytest.mark.parametrize("hq", [16, 128])
def test_gpu_dead_slots_rope_apart_and_leftpad(page_size, hq):
    """DeepSeek-V3's shapes on the GPU's own loops (128 heads contiguous or page 64: the TMA
    loop, on Hopper the Gluon kernel; 16 heads, eager, or page 16: the pointer loop): NaN in every slot past a sequence's length
    never reaches the output; a left pad and a rope cache apart give the reference's values, the
    rope apart the same bits as one 576-wide cache."""
    lens, pads = [3000, 1, 700, 0], [0, 0, 129, 0]
    q, kv, sl = mla_inputs(lens, hq, 576, cache_len=3072, seed=21)
    for b, n in enumerate(lens):
        kv[b, n:] = math.nan
    clean = torch.nan_to_num(kv, nan=0.0)
    kw = {}
    if page_size:
        kv, kw["block_table"] = paged(kv, [3072] * 4, page_size)
        clean = torch.nan_to_num(kv, nan=0.0)
    pad = torch.tensor(pads, dtype=torch.int32, device=DEVICE)
    scale = 192**-0.5
    out, lse = leanattn.mla_decode(q, kv, sl, softmax_scale=scale, return_lse=True, **kw)
    check(out, lse, q, clean, sl, 512, softmax_scale=scale, **kw)
    padded, padded_lse = leanattn.mla_decode(q, kv, sl, cache_leftpad=pad, softmax_scale=scale, return_lse=True, **kw)
    check(padded, padded_lse, q, clean, sl, 512, cache_leftpad=pad, softmax_scale=scale, **kw)
    latent, rope = kv[..., :512].contiguous(), kv[..., 512:].contiguous()
    apart, apart_lse = leanattn.mla_decode(q, latent, sl, rope_cache=rope, cache_leftpad=pad, softmax_scale=scale,
                                           return_lse=True, **kw)
    assert torch.equal(apart, padded) and torch.equal(apart_lse, padded_lse)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_gpu_wrapper_cuda_graph_new_lengths():
    """Plan and several layers' runs in one CUDA graph; replays with new lengths match the reference."""
    cap, batch, hq = 8192, 4, 128
    q, kv, sl = mla_inputs([cap] * batch, hq, 576, seed=11)
    kp, table = paged(kv, [cap] * batch, 64)
    w = leanattn.MLAWrapper(hq, 576, 512, torch.bfloat16, DEVICE)
    out = torch.empty(batch, 1, hq, 512, dtype=torch.bfloat16, device=DEVICE)
    lengths = sl.clone()
    w.plan(lengths, cap)
    w.run(q, kp, block_table=table, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w.plan(lengths, cap)
        w.run(q, kp, block_table=table, out=out)
    for new in ([cap, 1, 0, 4000], [17, 8000, 3, 2]):
        lengths.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        check(out, None, q, kp, lengths, 512, block_table=table)


def _merge_cut_blocks(lens, hq, d, dv, tile, programs, target_share, seed):
    """mla_merge_kernel, the merge after kernels/mla_gluon.py's kernel on Hopper, on partials of
    each cut share segment made in float64 and left in the slots that kernel leaves them in
    (2 p, or 2 p + 1 for a share's later segment); every other workspace value NaN, so a read
    of a slot the merge should not read shows. Launched twice on the same tickets: each launch
    must leave every ticket zero and give the same bits; the blocks that shares cut get the
    reference's output and LSE, the others are not written. Returns each cut block's members."""
    q, kv, sl = mla_inputs(lens, hq, d, seed=seed)
    batch, capacity = len(lens), kv.shape[1]
    plan = torch.zeros(programs, 8, dtype=torch.int32, device=DEVICE)
    launch_plan(plan, programs, sl, None, batch, 1, capacity, 1, 0, False, tile, target_share, False, tickets=None)
    scale = d**-0.5
    ws_acc = torch.full((3 * programs, hq, dv), float("nan"), dtype=torch.float32, device=DEVICE)
    ws_stats = torch.full((3 * programs, 2, hq), float("nan"), dtype=torch.float32, device=DEVICE)
    members = {}
    for p, (total, progs, start, end, b, _, t, _) in enumerate(plan.tolist()):
        g = start
        while p < progs and g < end:
            n = max(-(-lens[b] // tile), 1)
            t_end = min(n, t + end - g)
            if (t, t_end) != (0, n):
                members[b] = members.get(b, 0) + 1
                keys = kv[b, t * tile:min(t_end * tile, lens[b]), 0].double()
                s = (q[b, 0].double() @ keys.T) * scale / math.log(2)  # log2 units, as the kernels
                m = s.max(dim=1).values
                w = torch.exp2(s - m[:, None])
                slot = 2 * p + (g != start)
                ws_acc[slot] = (w @ keys[:, :dv]).float()
                ws_stats[slot, 0], ws_stats[slot, 1] = m.float(), w.sum(dim=1).float()
            g, t, b = g + t_end - t, 0, b + 1
    columns = dv // 32
    tickets = torch.zeros(programs * columns, dtype=torch.int32, device=DEVICE)
    ref, ref_lse = leanattn.reference.mla_decode(q.double(), kv.double(), sl, head_dim_v=dv, return_lse=True)
    runs = []
    for _ in range(2):
        out = torch.full((batch, 1, hq, dv), 7.0, dtype=q.dtype, device=DEVICE)
        lse = torch.full((batch, hq, 1), 7.0, dtype=torch.float32, device=DEVICE)
        mla_merge_kernel[(programs, columns)](
            out, lse, sl, sl, plan, ws_acc, ws_stats, tickets, *out.stride()[:3], *lse.stride(), capacity,
            GROUP=hq, Q_LEN=1, MERGE_ROWS=hq, DV_PAD=dv, TILE=tile, COLS=32, ARRIVE_CHUNK=16, HAS_SEQLENS=True,
            HAS_LEFTPAD=False, RETURN_LSE=True, USE_PDL=False)
        assert (tickets == 0).all(), "a ticket was not put back"
        for b in range(batch):
            if b in members:
                assert rel_err(out[b], ref[b]) < TOL[out.dtype], f"block {b} of {members[b]} members"
                assert (lse[b] - ref_lse[b]).abs().max().item() < LSE_TOL
            else:
                assert (out[b] == 7.0).all() and (lse[b] == 7.0).all()
        runs.append((out, lse))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    return members


def test_merge_kernel_joins_the_cut_blocks_from_their_slots():
    """Ragged blocks cut among an uneven grid: a block of several members, one of more than two
    chunks (ARRIVE_CHUNK = 16: both levels of the tree), blocks that no share cuts."""
    members = _merge_cut_blocks([300, 0, 131, 64, 7, 1700], 8, 80, 64, 32, 48, 1, seed=13)
    assert len(members) < 6 and min(members.values()) < 16 and max(members.values()) > 32


def test_merge_kernel_chunk_edges():
    """One tile a program, so blocks of exactly 16, 17 and 33 members: one chunk written at the
    first level; a full chunk and a chunk of one member (the block's last, which draws the
    second ticket); two full chunks and one of one member."""
    tile = 16
    members = _merge_cut_blocks([16 * tile, 17 * tile, 33 * tile], 4, 80, 64, tile, 66, 1, seed=5)
    assert members == {0: 16, 1: 17, 2: 33}


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="reads the compiled GPU code")
def test_gpu_merge_kernel_orders_chunk_sums_before_tickets():
    """The merge's memory ordering, read off its compiled code: the ticket is an acquire-release
    atomic at GPU scope right after a block barrier (every thread's stores of the chunk's sum
    before it), and the workspace is read past L1 (``ld.global.cg``). A race stress test
    rarely sees a missing fence; this does."""
    _merge_cut_blocks([17 * 16], 4, 80, 64, 16, 17, 1, seed=6)
    caches = mla_merge_kernel.device_caches[torch.cuda.current_device()][0].values()
    assert caches
    for compiled in caches:
        lines = [line.strip() for line in compiled.asm["ptx"].splitlines()]
        atomics = [i for i, line in enumerate(lines) if "atom." in line and ".add" in line]  # maybe predicated
        assert len(atomics) == 1, "the chunk ticket is missing"
        for i in atomics:
            assert ".acq_rel" in lines[i] and ".gpu" in lines[i], f"ticket not acq_rel at GPU scope: {lines[i]}"
            assert any("bar.sync" in line for line in lines[max(0, i - 12):i]), \
                f"no barrier before the ticket: {lines[max(0, i - 12):i + 1]}"
        # What the last chunk reads after its ticket is the other chunks' sums, stored from other SMs.
        loads = [line for line in lines[atomics[0]:] if "ld.global" in line]
        assert loads and all(".cg" in line for line in loads), f"a chunk's sum may come from a stale L1 line: {loads}"


def test_gluon_serves_only_shapes_it_fits(monkeypatch):
    """The Hopper path's own limits, as if on a Hopper GPU: 64-key tiles, latent and rope widths
    multiples of 64, a latent of at least 128, q + two tiles + p within 227 KiB of shared memory."""
    import leanattn._mla_call as mla_call

    monkeypatch.setattr(mla_call, "_capability", lambda device: 9)
    monkeypatch.setattr(mla_call, "interpreting", lambda: False)
    cuda = torch.device("cuda", 0)
    on = mla_call._GLUON and mla_call.mla_gluon.AVAILABLE  # LEANATTN_GLUON, a Triton with Gluon
    assert gluon_serves(cuda, 64, 512, 64, 64) == on and gluon_serves(cuda, 64, 512, 64, 16) == on
    assert gluon_serves(cuda, 64, 256, 64, 64) == on
    assert not gluon_serves(cuda, 64, 512, 128, 64)  # 250 KiB of shared memory at 64 rows
    assert not gluon_serves(cuda, 64, 64, 64, 16)  # latent 64: under two warpgroups' M
    assert not gluon_serves(cuda, 32, 512, 64, 16)  # 32-key tiles
    assert not gluon_serves(cuda, 64, 512, 32, 16)  # rope 32
    # fp8: q, two fp8 tiles as they land, one in fp16 and p; 226 KiB at 64 rows
    assert gluon_serves(cuda, 64, 512, 64, 64, 1) == on and gluon_serves(cuda, 64, 512, 64, 16, 1) == on
    assert not gluon_serves(cuda, 64, 512, 128, 64, 1)  # 250 KiB
    # the warp-specialised fp8 kernel: 16-row blocks of DeepSeek's widths
    assert mla_call.fp8_ws_serves(16, 64, 512, 64) == mla_call._GLUON_WS
    assert not mla_call.fp8_ws_serves(32, 64, 512, 64) and not mla_call.fp8_ws_serves(16, 64, 256, 64)
    # Where the kernel runs, fp8 16-row blocks take its 64-key tiles; elsewhere 32 (the Triton
    # kernel's best; under the interpreter, small tiles always).
    assert choose_mla_config(576, 512, FP8, 16, gluon=True).tile == (32 if interpreting() else 64)
    assert choose_mla_config(576, 512, FP8, 16).tile == 32
    monkeypatch.setattr(mla_call, "_capability", lambda device: 10)
    assert not gluon_serves(cuda, 64, 512, 64, 64)  # no warpgroup products on Blackwell


GLUON = ON_GPU and gluon_serves(torch.device(DEVICE), 64, 512, 64, 64)


def _wrapper_run(q, kv, sl, cap, gluon, programs=None, calls=None, **kw):
    """One plan and run of an MLAWrapper whose config takes mla_gluon's kernel or not (``calls``:
    a list that receives the wrapper's kernel calls)."""
    hq = q.shape[2]
    config = dataclasses.replace(mla_heuristic(576, 512, kv.dtype, q.shape[1] * hq, torch.device(DEVICE)), gluon=gluon)
    w = leanattn.MLAWrapper(hq, 576, 512, q.dtype, DEVICE, kv_dtype=kv.dtype, max_q_len=q.shape[1],
                            softmax_scale=192**-0.5, config=config, num_programs=programs)
    w.plan(sl, cap, q_len=q.shape[1], cache_leftpad=kw.pop("cache_leftpad", None))
    result = w.run(q, kv, return_lse=True, **kw)
    if calls is not None:
        calls += w._calls.values()
    return result


@pytest.mark.gpu
@pytest.mark.skipif(not GLUON, reason="needs a Hopper GPU and Triton's Gluon")
@pytest.mark.parametrize("hq,q_len,page_size,apart,pad,programs", [
    (16, 1, 64, False, False, None), (128, 1, 64, False, False, None), (32, 1, 0, True, True, 7),
    (16, 4, 128, False, False, 132), (128, 2, 0, False, True, None), (64, 1, 64, True, False, 5),
    (8, 3, 0, False, False, None),
])
def test_gpu_gluon_kernel_against_the_triton_kernel(hq, q_len, page_size, apart, pad, programs):
    """mla_gluon's kernel (Hopper) against the Triton kernel and the float64 reference at
    DeepSeek-V3's widths: 16 to 64 rows a block, contiguous or paged, a rope cache apart, a left
    pad, several query tokens, lengths that end inside a tile, an empty one, NaN past every
    length, grids that cut blocks among programs (the merge kernel) or not."""
    lens, cap = [3000, 1, 700, 0, 64, 2049], 3072
    q, kv, sl = mla_inputs(lens, hq, 576, q_len=q_len, cache_len=cap, seed=hq + q_len)
    for b, n in enumerate(lens):
        kv[b, n:] = math.nan
    kw = {}
    if pad:
        kw["cache_leftpad"] = torch.tensor([0, 0, 129, 0, 3, 64], dtype=torch.int32, device=DEVICE)
    if page_size:
        kv, kw["block_table"] = paged(kv, [cap] * len(lens), page_size)
    clean = torch.nan_to_num(kv, nan=0.0)
    if apart:
        kv, kw["rope_cache"] = kv[..., :512].contiguous(), kv[..., 512:].contiguous()
    ref_kw = {k: v for k, v in kw.items() if k != "rope_cache"}
    out, lse = _wrapper_run(q, kv, sl, cap, True, programs, **kw)
    check(out, lse, q, clean, sl, 512, softmax_scale=192**-0.5, **ref_kw)
    tri, tri_lse = _wrapper_run(q, kv, sl, cap, False, programs, **kw)
    assert rel_err(out, tri) < TOL[out.dtype]
    assert (lse - tri_lse).nan_to_num(posinf=0.0, neginf=0.0).abs().max().item() < LSE_TOL
    # mla_decode, eager: the Gluon path where its kernel saves more than its host time (32- and
    # 64-row blocks here), else the Triton kernel; each gives its wrapper's bits.
    MLA_CALLS.clear()
    MLA_KNOWN.clear()
    eager, eager_lse = leanattn.mla_decode(q, kv, sl, softmax_scale=192**-0.5, return_lse=True, num_programs=programs,
                                           **kw)
    (call,) = MLA_CALLS.values()
    assert call.gluon and call.gluon_eager == (hq * q_len > 16)
    want, want_lse = (out, lse) if call.gluon_eager else (tri, tri_lse)
    assert torch.equal(eager, want) and torch.equal(eager_lse, want_lse)


@pytest.mark.gpu
@pytest.mark.skipif(not GLUON, reason="needs a Hopper GPU and Triton's Gluon")
@pytest.mark.parametrize("hq,q_len,page_size,programs,dtype", [
    (128, 1, 64, None, torch.bfloat16), (64, 1, 0, 7, torch.bfloat16), (32, 2, 128, 132, torch.bfloat16),
    (16, 3, 0, 3, torch.float16),
])
def test_gpu_gluon_ws_against_the_uniform_kernel(monkeypatch, hq, q_len, page_size, programs, dtype):
    """The warp-specialised kernel (blocks of 64 rows, or 48 padded to 64) against the uniform
    Gluon kernel and the float64 reference: bf16 and fp16, ragged lengths ending inside tiles, an
    empty sequence, NaN past every length, shares cut inside blocks (the merge) or not, several
    query tokens under the causal mask; twice with the same bits."""
    from leanattn import _mla_call as mla_call

    lens, cap = [5000, 33, 0, 1, 4095, 64, 2900], 5120
    q, kv, sl = mla_inputs(lens, hq, 576, q_len=q_len, cache_len=cap, dtype=dtype, seed=hq + q_len)
    for b, n in enumerate(lens):
        kv[b, n:] = math.nan
    kw = {}
    if page_size:
        kv, kw["block_table"] = paged(kv, [cap] * len(lens), page_size)
    clean = torch.nan_to_num(kv, nan=0.0)
    calls = []
    out, lse = _wrapper_run(q, kv, sl, cap, True, programs, calls, **kw)
    assert [call.gluon_ws for call in calls] == [True]
    again, again_lse = _wrapper_run(q, kv, sl, cap, True, programs, **kw)
    assert torch.equal(out, again) and torch.equal(lse, again_lse)
    check(out, lse, q, clean, sl, 512, softmax_scale=192**-0.5, **kw)
    monkeypatch.setattr(mla_call, "_GLUON_WS", False)
    uni, uni_lse = _wrapper_run(q, kv, sl, cap, True, programs, **kw)
    assert rel_err(out, uni) < TOL[out.dtype]
    assert (lse - uni_lse).nan_to_num(posinf=0.0, neginf=0.0).abs().max().item() < LSE_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not GLUON, reason="needs a Hopper GPU and Triton's Gluon")
@pytest.mark.parametrize("hq,q_len,page_size,apart,pad,programs,kind,fp8,ws", [
    (16, 1, 64, False, False, None, "float", torch.float8_e4m3fn, True),
    (16, 1, 64, False, False, None, "float", torch.float8_e4m3fn, False),
    (128, 1, 64, False, False, None, "head", torch.float8_e4m3fn, True),
    (32, 2, 0, True, True, 7, "seq", torch.float8_e4m3fn, True),
    (32, 1, 64, False, False, 132, "float", torch.float8_e4m3fn, True),
    (16, 4, 128, False, False, 132, "seq", torch.float8_e5m2, True),
    (64, 1, 0, False, False, 5, "float", torch.float8_e5m2, True),
    (16, 1, 0, True, True, 7, "seq", torch.float8_e5m2, True),
    (8, 2, 128, False, False, 132, "head", torch.float8_e4m3fn, False),
    (8, 2, 128, False, False, 132, "head", torch.float8_e4m3fn, True),
    (16, 1, 0, False, False, None, "token", torch.float8_e4m3fn, True),
])
def test_gpu_gluon_fp8_against_the_triton_kernel(monkeypatch, hq, q_len, page_size, apart, pad, programs, kind, fp8,
                                                 ws):
    """fp8 caches on mla_gluon's kernels (tiles converted to fp16: in shared memory by every
    warp, or by two converting warpgroups at 16 rows) against the Triton kernel and the float64
    reference: e4m3 and e5m2, one scale (a float or a (1,) tensor) or one a request, 16 to 64
    rows a block, contiguous or paged, a rope cache apart, a left pad, several query tokens,
    lengths ending inside a tile, an empty one, NaN past every length, shares cut inside blocks.
    Per-token scales stay on the Triton kernel. ``ws`` False: 16-row blocks on the uniform
    kernel (LEANATTN_GLUON_WS=0)."""
    from leanattn import _mla_call as mla_call

    monkeypatch.setattr(mla_call, "_GLUON_WS", ws)
    lens, cap = [3000, 1, 700, 0, 64, 2049], 3072
    q, kv, sl = mla_inputs(lens, hq, 576, q_len=q_len, cache_len=cap, seed=hq + q_len)
    q = q * 1e5  # past fp16's range: the fp16 products take q by a power of two
    gen = torch.Generator().manual_seed(hq)
    scale = {"float": 1e-6, "head": torch.tensor([2e-6], device=DEVICE),
             "seq": (torch.rand(len(lens), 1, generator=gen) * 2e-6 + 5e-7).to(DEVICE),
             "token": (torch.rand(len(lens), cap, 1, generator=gen) * 2e-6 + 5e-7).to(DEVICE)}[kind]
    clean = (kv * 20).to(fp8)
    kv8 = clean.clone()
    for b, n in enumerate(lens):
        kv8.view(torch.uint8)[b, n:] = 0x7F  # NaN in e4m3 and e5m2
    kw = {"kv_scale": scale}
    if pad:
        kw["cache_leftpad"] = torch.tensor([0, 0, 129, 0, 3, 64], dtype=torch.int32, device=DEVICE)
    if page_size:
        clean, _ = paged(clean, [cap] * len(lens), page_size)
        kv8, kw["block_table"] = paged(kv8, [cap] * len(lens), page_size)
    if apart:
        kv8, kw["rope_cache"] = kv8[..., :512].contiguous(), kv8[..., 512:].contiguous()
    ref_kw = {k: v for k, v in kw.items() if k != "rope_cache"}
    calls = []
    out, lse = _wrapper_run(q, kv8, sl, cap, True, programs, calls, **kw)
    on_ws = ws and kind != "token" and hq * q_len == 16
    assert [(call.gluon, call.gluon_fp8) for call in calls] == [(kind != "token", on_ws)]
    check(out, lse, q, clean, sl, 512, softmax_scale=192**-0.5, **ref_kw)
    again, again_lse = _wrapper_run(q, kv8, sl, cap, True, programs, **kw)
    assert torch.equal(out, again) and torch.equal(lse, again_lse)
    tri, tri_lse = _wrapper_run(q, kv8, sl, cap, False, programs, **kw)
    assert rel_err(out, tri) < TOL[out.dtype]
    assert (lse - tri_lse).nan_to_num(posinf=0.0, neginf=0.0).abs().max().item() < LSE_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not GLUON, reason="needs a Hopper GPU and Triton's Gluon")
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_gluon_in_cuda_graph_capture(fp8):
    """A 16-head mla_decode (the Triton kernel when eager) captured in a CUDA graph after one
    eager call runs the Gluon path (plan, attention, merge; the eager call loaded their
    binaries, which capture cannot) and replays with new lengths exactly; bf16, or fp8 (the
    warp-specialised fp8 kernel)."""
    cap = 4096
    q, kv, sl = mla_inputs([cap] * 2, 16, 576, seed=17)
    kp, table = paged(kv, [cap] * 2, 64)
    extra = {}
    if fp8:
        kp, extra = (kp * 8).to(FP8), {"kv_scale": 0.125}
    lengths = sl.clone()
    kw = dict(block_table=table, softmax_scale=192**-0.5, return_lse=True, **extra)
    MLA_CALLS.clear()
    MLA_KNOWN.clear()
    leanattn.mla_decode(q, kp, lengths, **kw)
    (call,) = MLA_CALLS.values()
    assert call.gluon and not call.gluon_eager and call.gluon_loaded
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = leanattn.mla_decode(q, kp, lengths, **kw)
    for new in ([cap, 1], [3000, 0], [65, 4000]):
        lengths.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        check(out, lse, q, kp, lengths, 512, softmax_scale=192**-0.5, block_table=table, **extra)
    gluon, _ = _wrapper_run(q, kp, lengths, cap, True, block_table=table, **extra)
    assert torch.equal(out, gluon)


@pytest.mark.gpu
@pytest.mark.skipif(not GLUON, reason="needs a Hopper GPU and Triton's Gluon")
@pytest.mark.parametrize("hq,fp8", [(128, False), (128, True), (16, True)])
def test_gpu_gluon_bad_pages_nan_the_rows_that_see_them(hq, fp8):
    """A live key on an out-of-range page: the Gluon kernel NaNs the rows the Triton kernel
    does (all of a one-token sequence's), reads nothing there, and leaves the others exact;
    bf16, fp8 on the uniform kernel (128 heads) and on the warp-specialised one (16)."""
    lens, cap = [300, 200], 320
    q, kv, sl = mla_inputs(lens, hq, 576, cache_len=cap, seed=4)
    kp, table = paged(kv, [cap] * 2, 64)
    extra = {}
    if fp8:
        kp, extra = kp.to(FP8), {"kv_scale": 1.0}
    table[1, 2] = 10**6
    out, lse = _wrapper_run(q, kp, sl, cap, True, block_table=table, **extra)
    tri, tri_lse = _wrapper_run(q, kp, sl, cap, False, block_table=table, **extra)
    assert torch.isnan(out[1]).all() and torch.isnan(lse[1]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(tri)) and torch.equal(torch.isnan(lse), torch.isnan(tri_lse))
    check(out[:1], lse[:1], q[:1], kp, sl[:1], 512, softmax_scale=192**-0.5, block_table=table[:1], **extra)


@pytest.mark.gpu
@pytest.mark.skipif(not GLUON, reason="needs a Hopper GPU and Triton's Gluon")
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_gluon_timeline_counts(fp8):
    """MLAConfig(timeline=True): the uniform (bf16) or fp8 kernel counts every tile once, its
    phases within each program's total, and computes the same bits as without the counts."""
    lens, cap = [3000, 64, 700, 1], 3072
    q, kv, sl = mla_inputs(lens, 16, 576, cache_len=cap, seed=21)
    kw = {"kv_scale": 0.5} if fp8 else {}
    kv = kv.to(FP8) if fp8 else kv
    outs, calls = [], []
    for timeline in (False, True):
        config = dataclasses.replace(mla_heuristic(576, 512, kv.dtype, 16, torch.device(DEVICE)), gluon=True,
                                     timeline=timeline)
        w = leanattn.MLAWrapper(16, 576, 512, q.dtype, DEVICE, kv_dtype=kv.dtype, config=config, num_programs=5)
        w.plan(sl, cap)
        outs.append(w.run(q, kv, **kw))
        calls += w._calls.values()
    assert torch.equal(outs[0], outs[1])
    assert calls[0].timeline is None and calls[1].gluon_fp8 == fp8
    counts = calls[1].timeline.cpu()
    assert counts[:, 8].sum().item() == sum(-(-n // 64) for n in lens)  # every tile once
    busy = counts[counts[:, 8] > 0]
    assert (busy[:, 0] > 0).all() and (busy[:, 1:8].sum(1) <= busy[:, 0]).all()
    if fp8:  # both converting warpgroups stored tiles
        assert (busy[:, 11] + busy[:, 14] > 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not GLUON, reason="needs a Hopper GPU and Triton's Gluon")
def test_gpu_gluon_merge_race_stress():
    """One block cut among the whole grid (about 128 members: eight chunks, both levels of the
    merge), each call on a new q: a merge that read a chunk's sum before its program stored it
    would read the previous call's, which differs. Every call is checked against the Triton
    kernel and repeated for equal bits; every ticket is back at zero afterwards."""
    cap = 32768
    q, kv, sl = mla_inputs([cap], 16, 576, cache_len=cap, seed=21)
    runs = {}
    for gluon in (True, False):
        config = dataclasses.replace(mla_heuristic(576, 512, kv.dtype, 16), gluon=gluon)
        w = leanattn.MLAWrapper(16, 576, 512, q.dtype, DEVICE, softmax_scale=192**-0.5, config=config)
        w.plan(sl, cap)
        runs[gluon] = w
    gen = torch.Generator(device=DEVICE).manual_seed(22)
    for _ in range(20):
        q = torch.randn(q.shape, generator=gen, device=DEVICE).to(q.dtype)
        out, lse = runs[True].run(q, kv, return_lse=True)
        again, again_lse = runs[True].run(q, kv, return_lse=True)
        assert torch.equal(out, again) and torch.equal(lse, again_lse)
        tri, tri_lse = runs[False].run(q, kv, return_lse=True)
        assert rel_err(out, tri) < TOL[out.dtype]
        assert (lse - tri_lse).abs().max().item() < LSE_TOL
    (call,) = runs[True]._calls.values()
    assert call.gluon and (call.merge_tickets == 0).all()


def test_compile_fullgraph():
    """torch.compile sees mla_decode as one custom op: no graph break, the reference's result."""
    torch._dynamo.reset()
    q, kv, sl = mla_inputs([70, 0, 33], 4, 80, seed=9)

    def step(q, kv, sl):
        out, lse = leanattn.mla_decode(q * 1.0, kv, sl, head_dim_v=64, return_lse=True, num_programs=5)
        return out * 1.0, lse

    out, lse = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kv, sl)
    check(out, lse, q, kv, sl, 64)
    explanation = torch._dynamo.explain(step)(q, kv, sl)
    assert explanation.graph_break_count == 0


def test_custom_op_opcheck():
    q, kv, sl = mla_inputs([40, 9], 4, 80)
    out = torch.empty(2, 1, 4, 64, dtype=q.dtype, device=DEVICE)
    lse = torch.empty(2, 4, 1, dtype=torch.float32, device=DEVICE)
    torch.library.opcheck(
        torch.ops.leanattn.mla_decode_into.default, (q, kv, None, out, lse, sl, None, None, None, 1.0, 64, 0.125, True, 3, 0),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_wrapper_workspace_fits_every_planned_q_len():
    """A plan of any q_len up to max_q_len fits the wrapper's workspace: with 17 heads a block
    holds 17 rows at q_len 1 and 4 at q_len 4, but 34 at q_len 2 (merged partials of 64 rows)."""
    lens = [100, 70]
    q, kv, sl = mla_inputs(lens, 17, 32, q_len=2, seed=11)
    w = leanattn.MLAWrapper(17, 32, 16, torch.bfloat16, DEVICE, max_q_len=4, num_programs=5)
    w.plan(sl, kv.shape[1], q_len=2)
    config = w._config
    group = blocks_of(2, 17, config.block_rows)[0]
    _, merge_rows, dv_pad, _ = leanattn._call.padded_sizes(16, 2 * group)
    acc, stats = w._bufs[:2]
    assert acc.numel() >= 2 * w.num_programs * merge_rows * dv_pad
    assert stats.numel() >= 2 * w.num_programs * 2 * merge_rows
    out, lse = w.run(q, kv, return_lse=True)
    check(out, lse, q, kv, sl, 16)


@pytest.mark.parametrize("paged_cache", [False, True])
def test_check_names_kv_scale(paged_cache):
    """check=True refuses a non-finite per-token scale in a live row, naming kv_scale (the
    argument mla_decode takes), not decode's k_scale."""
    lens = [20, 9]
    q, kv, sl = mla_inputs(lens, 4, 80, seed=12)
    kv8 = kv.to(FP8)
    kw = {}
    if paged_cache:
        kv8, kw["block_table"] = paged(kv8, lens, 16)
    scale = torch.ones(tuple(kv8.shape[:3]), device=DEVICE)
    pos = (1, 3, 0) if not paged_cache else (int(kw["block_table"][1, 0]), 3, 0)
    scale[pos] = math.nan
    with pytest.raises(ValueError, match=r"^kv_scale\["):
        leanattn.mla_decode(q, kv8, sl, head_dim_v=64, kv_scale=scale, check=True, **kw)


def test_bad_kv_scale_message_names_kv_cache():
    """A kv_scale of a wrong shape is described against kv_cache's shape, by kv_cache's name."""
    q, kv, sl = mla_inputs([10, 5], 4, 80)
    with pytest.raises(ValueError, match=r"^kv_scale must be .*\(2, 10, 1\) \(per token and kv head: kv_cache's shape") as e:
        leanattn.mla_decode(q, kv.to(FP8), sl, head_dim_v=64, kv_scale=torch.ones(3, device=DEVICE))
    assert "k_cache's" not in str(e.value).replace("kv_cache's", "")


@pytest.mark.parametrize("block_rows", [8, 0])
def test_wrapper_refuses_config_with_too_few_block_rows(block_rows):
    """A block holds every query token of at least one head: fewer than 16 rows is refused by name."""
    from leanattn.kernels.config import MLAConfig

    config = MLAConfig(tile=32, num_warps=4, num_stages=1, programs_per_sm=1, block_rows=block_rows)
    with pytest.raises(ValueError, match=r"config\.block_rows must be"):
        leanattn.MLAWrapper(4, 64, 32, torch.bfloat16, DEVICE, max_q_len=16, config=config)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_q_len=17), r"^max_q_len must be in \[1, 16\], got 17"),
    (dict(max_q_len=0), r"^max_q_len must be in \[1, 16\], got 0"),
    (dict(q_heads=0), r"^q_heads must be at least 1, got 0"),
])
def test_wrapper_errors_name_its_arguments(kwargs, match):
    args = dict(q_heads=4, head_dim=64, head_dim_v=32, dtype=torch.bfloat16, device=DEVICE)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        leanattn.MLAWrapper(**args)


def test_mla_benchmark_parses_and_checks_its_rows():
    """benchmarks/mla.py's shapes (``:apart`` reads the rope part from its own tensor), its
    leanattn method's and its split-KV Triton peer's eager calls, checked against the reference
    as the bench checks them."""
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "mla.py"
    spec = importlib.util.spec_from_file_location("mla_bench", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["mla_bench"] = bench
    spec.loader.exec_module(bench)
    shape = bench.parse_shape("2x40@4:page=32:apart")
    assert (shape.batch, shape.context, shape.q_heads, shape.page, shape.apart) == (2, 40, 4, 32, True)
    with pytest.raises(ValueError, match="unknown options"):
        bench.parse_shape("2x40@4:nope")
    xs, lens, table, _ = bench.make_step(shape, DEVICE)
    for method in (bench.leanattn_method, bench.triton_split_method):  # leanattn and the split-KV peer
        eager, _ = method(shape, xs[:2], lens, table)
        assert bench.check(shape, eager(), xs[0], lens, table) < TOL[torch.bfloat16], method.__name__
    with pytest.raises(bench.Unsupported):
        bench.triton_split_method(bench.parse_shape("2x40@4:q=2"), xs[:2], lens, table)


def test_block_table_of_more_than_2_31_positions():
    """A block table of 2**23 pages of 256 tokens holds 2**31 positions: a GPU launch types the
    capacity as a 64-bit int (tests/test_wide_ints.py compiles the kernels so), and only the live
    pages are read. Pages of 256 take the tensor-descriptor loop (on Hopper, in eager calls over
    caches this large, the Gluon kernel); the wrapper runs it and, on Hopper, the Gluon kernel
    too, against the reference."""
    lens = [300, 45]
    q, kv, sl = mla_inputs(lens, 16, 576, cache_len=512, seed=31)
    kp, table = paged(kv, lens, 256, seed=31)
    wide = torch.full((2, 2**23), 10**6, dtype=torch.int32, device=DEVICE)  # 64 MiB
    wide[:, : table.shape[1]] = table
    out, lse = leanattn.mla_decode(q, kp, sl, block_table=wide, return_lse=True)
    check(out, lse, q, kp, sl, 512, block_table=table)
    for gluon in (False, True) if GLUON else (False,):
        out, lse = _wrapper_run(q, kp, sl, 2**31, gluon, block_table=wide)
        check(out, lse, q, kp, sl, 512, softmax_scale=192**-0.5, block_table=table)
