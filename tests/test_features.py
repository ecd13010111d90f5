"""Model features against the float64 reference: several query tokens, sliding windows, soft-capping,
attention sinks, fp8 caches; each alone, in random combinations, through decode and the wrapper."""

from __future__ import annotations

import math
import random

import pytest
import torch

import leanattn

from _util import DEVICE, assert_close, make_inputs, poisoned_like, reference, tile_size, to_paged

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def queries(batch: int, q_len: int, q_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, q_len, q_heads, head_dim, generator=gen).to(dtype).to(DEVICE)


def run(q, k, v, sl, **kw):
    """decode into a poisoned output; also the float64 reference with the same arguments."""
    out = poisoned_like(q)
    _, lse = leanattn.decode(q, k, v, sl, out=out, return_lse=True, **kw)
    kw.pop("num_programs", None)
    return out, lse, reference(q, k, v, sl, **kw)


@pytest.mark.parametrize("q_len", [2, 4, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_several_query_tokens(q_len, causal):
    """Bottom-right causal alignment; lengths shorter than q_len leave early queries empty."""
    t = tile_size(64, torch.bfloat16, 2 * q_len)
    lens = [0, 1, q_len - 1, t + 3, 2 * t]
    _, k, v, sl = make_inputs(lens, 4, 2, 64, torch.bfloat16, cache_len=2 * t)
    q = queries(len(lens), q_len, 4, 64, torch.bfloat16)
    out, lse, (ref, ref_lse) = run(q, k, v, sl, causal=causal, num_programs=5)
    assert_close(out, lse, ref, ref_lse)
    assert lse.shape == (len(lens), 4, q_len)
    if causal:  # sequence 1 has one key: only its last query sees it
        assert torch.isneginf(lse[1, :, :-1]).all() and torch.isfinite(lse[1, :, -1]).all()


@pytest.mark.parametrize("window", [(0, -1), (5, -1), (40, -1), (10**6, -1), (3, 2), (-1, 4)])
@pytest.mark.parametrize("q_len", [1, 3])
def test_sliding_window(window, q_len):
    causal = window[1] == -1
    t = tile_size(64, torch.float16, 2 * q_len)
    lens = [0, 2, t, 3 * t + 5]
    _, k, v, sl = make_inputs(lens, 4, 2, 64, torch.float16, cache_len=3 * t + 5)
    q = queries(len(lens), q_len, 4, 64, torch.float16, seed=1)
    out, lse, ref = run(q, k, v, sl, causal=causal, window_size=window, num_programs=6)
    assert_close(out, lse, *ref)



@pytest.mark.parametrize("huge", [2**31 - 1, 2**31, 2**63 - 1, 2**63])
def test_window_side_of_int_max_is_unbounded(huge):
    """A window side of INT_MAX or more (a common spelling of "unbounded") bounds nothing: the
    same bits as -1 there, from the kernel and the reference alike (the position arithmetic
    would overflow: every key masked, zero rows and -inf LSE)."""
    lens = [7, 40]
    _, k, v, sl = make_inputs(lens, 4, 2, 64, torch.float16, cache_len=40)
    q = queries(len(lens), 2, 4, 64, torch.float16, seed=3)
    for window, same in [((4, huge), (4, -1)), ((huge, 1), (-1, 1)), ((huge, huge), (-1, -1))]:
        out, lse, ref = run(q, k, v, sl, causal=False, window_size=window, num_programs=3)
        want, want_lse, _ = run(q, k, v, sl, causal=False, window_size=same, num_programs=3)
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
        assert_close(out, lse, *ref)
        assert torch.isfinite(lse).all()
    causal_out, causal_lse, causal_ref = run(q, k, v, sl, window_size=(huge, -1), num_programs=3)
    assert_close(causal_out, causal_lse, *causal_ref)
    assert torch.equal(causal_out, run(q, k, v, sl, num_programs=3)[0])

def test_window_skips_tiles_before_it():
    """Pages wholly before every query's window get out-of-range ids: a read of any of them would
    make the row NaN, so a finite, correct output shows they were never read."""
    t = tile_size(64, torch.bfloat16, 4)
    lens = [8 * t + 3, 5 * t]
    left, q_len, page = t + 1, 2, 16
    _, k, v, sl = make_inputs(lens, 8, 2, 64, torch.bfloat16, cache_len=8 * t + 3)
    q = queries(2, q_len, 8, 64, torch.bfloat16, seed=2)
    kp, vp, table = to_paged(k, v, lens, page)
    for b, n in enumerate(lens):
        first_seen = n - q_len - left
        table[b, : first_seen // page] = -1
    out, lse, ref = run(q, kp, vp, sl, block_table=table, window_size=(left, -1), num_programs=4)
    assert_close(out, lse, reference(q, k, v, sl, window_size=(left, -1))[0], reference(q, k, v, sl, window_size=(left, -1))[1])
    # check=True takes those slots as unread too (an engine may free a window's past pages), and
    # still names a bad page the window reaches; so does DecodeWrapper.run.
    checked = leanattn.decode(q, kp, vp, sl, block_table=table, window_size=(left, -1), num_programs=4, check=True)
    assert torch.equal(checked, out)
    w = leanattn.DecodeWrapper(8, 2, 64, torch.bfloat16, q.device, max_q_len=q_len, num_programs=4, paged=True)
    w.plan(sl, table.shape[1] * page, q_len=q_len, window_size=(left, -1))
    assert torch.equal(w.run(q, kp, vp, block_table=table, check=True), out)
    reached = (lens[0] - q_len - left) // page  # the first slot the window reaches
    table[0, reached] = -1
    for call in (lambda: leanattn.decode(q, kp, vp, sl, block_table=table, window_size=(left, -1), check=True),
                 lambda: w.run(q, kp, vp, block_table=table, check=True)):
        with pytest.raises(ValueError, match=f"block_table\\[0, {reached}\\] = -1 is not a page"):
            call()


@pytest.mark.parametrize("softcap", [0.5, 30.0])
def test_softcap(softcap):
    _, k, v, sl = make_inputs([70, 33, 0], 8, 2, 64, torch.bfloat16)
    q = queries(3, 1, 8, 64, torch.bfloat16, seed=3) * 4  # large scores, so the cap matters
    out, lse, ref = run(q, k, v, sl, softcap=softcap, num_programs=4)
    assert_close(out, lse, *ref)
    plain = reference(q, k, v, sl)[0]
    assert (out.double() - plain).norm() > 0.02 * plain.norm(), "softcap had no effect"


def test_sinks_with_empty_rows():
    _, k, v, sl = make_inputs([50, 0, 1], 8, 2, 64, torch.float16)
    q = queries(3, 2, 8, 64, torch.float16, seed=4)
    sinks = torch.linspace(-2.0, 3.0, 8, dtype=torch.float32, device=DEVICE)
    out, lse, (ref, ref_lse) = run(q, k, v, sl, sinks=sinks, num_programs=5)
    assert_close(out, lse, ref, ref_lse)
    assert (out[1] == 0).all() and torch.allclose(lse[1], sinks[:, None].expand(8, 2))


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_cache(fp8, per_head):
    t = tile_size(128, torch.bfloat16, 4)
    _, k, v, sl = make_inputs([2 * t + 9, 17, 0], 8, 2, 128, torch.bfloat16)
    k8, v8 = (k * 0.5).to(fp8), (v * 2).to(fp8)
    q = queries(3, 1, 8, 128, torch.bfloat16, seed=5)
    if per_head:
        ks = torch.tensor([2.0, 1.5], dtype=torch.float32, device=DEVICE)
        vs = torch.tensor([0.5, 0.25], dtype=torch.float32, device=DEVICE)
    else:
        ks, vs = 2.0, 0.5
    out, lse, ref = run(q, k8, v8, sl, k_scale=ks, v_scale=vs, num_programs=5)
    assert_close(out, lse, *ref)


@pytest.mark.parametrize("q_size", [1e6, 1e-6])
def test_fp8_cache_takes_bf16_queries_outside_fp16_range(q_size):
    """The fp8 path multiplies in fp16: a bf16 q of 1e6 (over fp16's 65504) or 1e-6 (fp16
    subnormals) must still give the reference's output and LSE, K's scale undoing q's size."""
    t = tile_size(128, torch.bfloat16, 4)
    _, k, v, sl = make_inputs([2 * t + 9, 17], 8, 2, 128, torch.bfloat16)
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    q = (queries(2, 1, 8, 128, torch.float32, seed=6) * q_size).to(torch.bfloat16)
    out, lse, ref = run(q, k8, v8, sl, k_scale=1.0 / q_size, v_scale=0.5, num_programs=5)
    assert_close(out, lse, *ref)


def test_bad_feature_arguments():
    q, k, v, sl = make_inputs([20, 7], 4, 2, 64, torch.float16)
    cases = [
        (dict(k_scale=2.0), "k_scale dequantises an fp8 cache"),
        (dict(window_size=(-2, 0)), "window_size must be"),
        (dict(window_size=(3,)), "window_size must be"),
        (dict(softcap=-1.0), "softcap must be"),
        (dict(softcap=math.inf), "softcap must be"),
        (dict(sinks=torch.zeros(3, device=DEVICE)), r"sinks must be float32 \(4,\)"),
        (dict(sinks=torch.zeros(4, dtype=torch.float16, device=DEVICE)), "sinks must be float32"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            leanattn.decode(q, k, v, sl, **kw)
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"k_scale must be a float, or a float32 tensor on .* of shape \(2,\) "
                                         r"\(per kv head\), \(2, 2\) .* or \(2, 20, 2\) \(per token"):
        leanattn.decode(q, k8, v8, sl, k_scale=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match=r"sinks\[1\] = nan is not finite"):
        leanattn.decode(q, k, v, sl, sinks=torch.tensor([0.0, math.nan, 0, 0], device=DEVICE), check=True)


def test_random_combinations_decode_and_wrapper():
    """Random mixes of every feature over paged/contiguous caches, ragged lengths (0, 1, short of
    q_len), GQA groups 1/4/5/7/8 and MQA, head dims; the wrapper must match decode bitwise."""
    rng = random.Random(11)
    for case in range(8):
        kv_heads = rng.choice([1, 2])
        group = rng.choice([1, 4, 5, 7, 8])
        head_dim = rng.choice([64, 80, 128])
        q_len = rng.choice([1, 2, 3])
        dtype = rng.choice([torch.float16, torch.bfloat16])
        lens = [rng.choice([0, 1, q_len - 1, rng.randint(1, 150)]) for _ in range(rng.randint(1, 3))]
        cap = max(lens + [1])
        _, k, v, sl = make_inputs(lens, kv_heads * group, kv_heads, head_dim, dtype, cache_len=cap, seed=case)
        q = queries(len(lens), q_len, kv_heads * group, head_dim, dtype, seed=case)
        kw: dict = {}
        if rng.random() < 0.5:
            kw["window_size"] = (rng.choice([0, 7, 40]), -1)
        if rng.random() < 0.4:
            kw["softcap"] = rng.choice([5.0, 50.0])
        if rng.random() < 0.4:
            kw["sinks"] = torch.randn(kv_heads * group, dtype=torch.float32, device=DEVICE)
        if rng.random() < 0.4:
            fp8 = rng.choice(FP8)
            k, v = k.to(fp8), v.to(fp8)
            kw["k_scale"], kw["v_scale"] = rng.choice([1.0, 0.7]), 1.3
        kc, vc, extra = k, v, {}
        if rng.random() < 0.5:
            kc, vc, table = to_paged(k, v, lens, rng.choice([1, 16]), seed=case)
            extra["block_table"] = table
        programs = rng.choice([1, 3, 9])
        out, lse, ref = run(q, kc, vc, sl, num_programs=programs, **extra, **kw)
        ref_out, ref_lse = reference(q, k, v, sl, **kw)
        assert_close(out, lse, ref_out, ref_lse)
        w = leanattn.DecodeWrapper(kv_heads * group, kv_heads, head_dim, dtype, DEVICE, kv_dtype=k.dtype,
                                   max_q_len=3, num_programs=programs, paged=bool(extra))
        capacity = cap if not extra else extra["block_table"].shape[1] * kc.shape[1]
        w.plan(sl, capacity, q_len=q_len, window_size=kw.get("window_size", (-1, -1)))
        run_kw = {n: kw[n] for n in ("softcap", "sinks", "k_scale", "v_scale") if n in kw}
        again, again_lse = w.run(q, kc, vc, return_lse=True, **extra, **run_kw)
        assert torch.equal(again, out) and torch.equal(again_lse, lse), f"case {case}: wrapper differs from decode"
