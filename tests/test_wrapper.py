"""DecodeWrapper: plan once, run per layer; bitwise equal to leanattn.decode; clear errors."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

import leanattn
from leanattn._testing import DIRECT_LAUNCH_ERROR

from _util import DEVICE, ON_GPU, assert_close, make_inputs, merge_config, poisoned_like, reference, tile_size, to_paged


def _wrapper(q, k, programs, **kw):
    return leanattn.DecodeWrapper(q.shape[2], k.shape[2], q.shape[3], q.dtype, q.device, num_programs=programs, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("leftpad", [False, True])
def test_run_bitwise_equals_decode(dtype, paged, leftpad):
    """Several layers planned once: each run equals decode on the same inputs, bit for bit, and
    the reference within tolerance (lengths 0, 1, tile +- 1, split heads)."""
    t = tile_size(64, dtype, 4)
    lens = [0, 1, t - 1, t + 1, 3 * t + 7]
    cap = 4 * t
    pad = torch.tensor([0, 0, 3, t, 2 * t + 1], dtype=torch.int32, device=DEVICE) if leftpad else None
    programs = 6
    w = None
    for layer in range(2):
        q, k, v, sl = make_inputs(lens, 8, 2, 64, dtype, cache_len=cap, seed=layer)
        kw = {}
        kc, vc = k, v
        if paged:
            kc, vc, table = to_paged(k, v, [cap] * len(lens), 16, seed=layer)
            kw = {"block_table": table}
        if w is None:
            w = _wrapper(q, k, programs, paged=paged)
            w.plan(sl, cap, cache_leftpad=pad)
        out = poisoned_like(q)
        res, lse = w.run(q, kc, vc, out=out, return_lse=True, **kw)
        assert res is out
        again, again_lse = leanattn.decode(q, kc, vc, sl, cache_leftpad=pad, return_lse=True, num_programs=programs, **kw)
        assert torch.equal(out, again) and torch.equal(lse, again_lse)
        assert_close(out, lse, *reference(q, k, v, sl, cache_leftpad=pad))


def test_plan_without_lengths_and_hf_layout():
    """``plan(None, capacity, batch=...)``: every sequence full; a (B, Hkv, N, D) cache as its transpose."""
    t = tile_size(128, torch.float16, 2)
    q, k, v, _ = make_inputs([2 * t + 5] * 3, 4, 2, 128, torch.float16, hf_layout=True)
    w = _wrapper(q, k, 5)
    w.plan(None, k.shape[1], batch=3)
    out = w.run(q, k, v)
    assert torch.equal(out, leanattn.decode(q, k, v, num_programs=5))
    assert_close(out, None, reference(q, k, v)[0], None)


def test_replanning_follows_new_lengths():
    q, k, v, sl = make_inputs([100, 40, 7], 4, 1, 64, torch.bfloat16, cache_len=128)
    w = _wrapper(q, k, 4)
    for lens in ([100, 40, 7], [0, 128, 1], [5, 5, 5]):
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        w.plan(sl, 128)
        out, lse = w.run(q, k, v, return_lse=True)
        assert_close(out, lse, *reference(q, k, v, sl))


def test_leftpad_against_reference_with_decode():
    """cache_leftpad: keys are positions [leftpad, seqlen); leftpad past seqlen gives an empty row."""
    q, k, v, sl = make_inputs([90, 50, 64, 10], 8, 2, 64, torch.float16, cache_len=96)
    pad = torch.tensor([7, 0, 63, 20], dtype=torch.int32, device=DEVICE)
    out = poisoned_like(q)
    _, lse = leanattn.decode(q, k, v, sl, cache_leftpad=pad, out=out, return_lse=True, num_programs=5)
    assert_close(out, lse, *reference(q, k, v, sl, cache_leftpad=pad))
    assert (out[3] == 0).all() and torch.isneginf(lse[3]).all()


def test_mismatched_calls_are_refused():
    q, k, v, sl = make_inputs([20, 7], 4, 2, 64, torch.float16, cache_len=32)
    w = _wrapper(q, k, 3)
    with pytest.raises(RuntimeError, match="before plan"):
        w.run(q, k, v)
    w.plan(sl, 32)
    q8 = torch.randn(2, 1, 8, 64, dtype=torch.float16, device=DEVICE)
    cases = [
        ((q8, k, v), "q_heads, kv_heads, head_dim"),
        ((q.bfloat16(), k.bfloat16(), v.bfloat16()), "q_heads, kv_heads, head_dim, dtype"),
        ((q[:1], k[:1], v[:1]), "planned for batch 2"),
        ((q, k[:, :16], v[:, :16]), "planned for capacity 32"),
        ((q[..., :48], k[..., :48], v[..., :48]), "head_dim must be one of"),
        ((q[..., :32], k[..., :32], v[..., :32]), "q_heads, kv_heads, head_dim"),  # supported, not planned
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
            w.run(*args)
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        w.plan(sl.view(2, 1), 32)
    with pytest.raises(ValueError, match="q_heads .* multiple"):
        leanattn.DecodeWrapper(5, 2, 64, torch.float16, DEVICE)


@pytest.mark.parametrize("cache", ["bf16", "bf16 paged", "fp8"])
def test_plan_decode_equals_the_wrapper_and_decode(cache):
    """``decode(plan=plan_decode(..., paged=...))``, the functional plan/run, gives the wrapper's
    and the self-locating decode's results bit for bit: left padding, a window, two query tokens.
    (A plan for the other kind of cache is exact but deals other shares: on the GPU paged caches
    take smaller ones.)"""
    kv_dtype = torch.float8_e4m3fn if cache == "fp8" else torch.bfloat16
    t = tile_size(64, kv_dtype, 8)
    lens, cap = [0, t + 3, 3 * t + 1], 4 * t
    q, k, v, sl = make_inputs(lens, 8, 2, 64, torch.bfloat16, cache_len=cap, seed=3)
    q = torch.randn(3, 2, 8, 64, generator=torch.Generator().manual_seed(4)).to(q)
    pad = torch.tensor([0, 2, t + 1], dtype=torch.int32, device=DEVICE)
    k, v = k.to(kv_dtype), v.to(kv_dtype)  # the reference reads the fp8 values exactly
    kc, vc, kw = k, v, {}
    if cache == "bf16 paged":
        kc, vc, table = to_paged(k, v, [cap] * len(lens), 16, seed=5)
        kw = {"block_table": table}
    features = dict(cache_leftpad=pad, window_size=(t, 0))
    plan = leanattn.plan_decode(sl, cap, q_heads=8, kv_heads=2, head_dim=64, kv_dtype=kv_dtype, q_len=2, num_programs=5,
                                paged=bool(kw), **features)
    assert plan.dtype == torch.int32 and plan.shape == (5, 8)
    out, lse = leanattn.decode(q, kc, vc, sl, plan=plan, return_lse=True, **features, **kw)
    again, again_lse = leanattn.decode(q, kc, vc, sl, num_programs=5, return_lse=True, **features, **kw)
    assert torch.equal(out, again) and torch.equal(lse, again_lse)
    w = _wrapper(q, k, 5, max_q_len=2, kv_dtype=kv_dtype, paged=bool(kw))
    w.plan(sl, cap, q_len=2, **features)
    assert torch.equal(out, w.run(q, kc, vc, **kw))
    assert_close(out, lse, *reference(q, k.to(q.dtype), v.to(q.dtype), sl, **features))
    if cache == "fp8":  # a plan made for another cache dtype (another tile on the GPU) is refused
        other = leanattn.plan_decode(sl, cap, q_heads=8, kv_heads=2, head_dim=64, q_len=2, num_programs=5, **features)
        with pytest.raises(ValueError, match="kv_dtype torch.float8_e4m3fn"):
            leanattn.decode(q, kc, vc, sl, plan=other, **features)


def test_layer_shapes_of_other_types_are_refused():
    """Heads, head dim and q_len must be ints, named in the error (a shape that passed before is
    remembered, and does not let another through)."""
    sl = torch.tensor([20, 7], dtype=torch.int32, device=DEVICE)
    leanattn.plan_decode(sl, 32, q_heads=4, kv_heads=2, head_dim=64)
    leanattn.DecodeWrapper(4, 2, 64, torch.float16, DEVICE)
    for kw, error, msg in [
        (dict(q_heads=4.0), TypeError, "q_heads must be an int, got 4.0"),
        (dict(kv_heads=True), TypeError, "kv_heads must be an int, got True"),
        (dict(head_dim=64.0), TypeError, "head_dim must be an int, got 64.0"),
        (dict(head_dim=100), ValueError, "head_dim must be one of"),
    ]:
        with pytest.raises(error, match=msg):
            leanattn.plan_decode(sl, 32, **{"q_heads": 4, "kv_heads": 2, "head_dim": 64, **kw})
    with pytest.raises(TypeError, match="q_heads must be an int, got 4.0"):
        leanattn.DecodeWrapper(4.0, 2, 64, torch.float16, DEVICE)
    with pytest.raises(TypeError, match="max_q_len must be an int, got 2.0"):
        leanattn.DecodeWrapper(4, 2, 64, torch.float16, DEVICE, max_q_len=2.0)


def test_plan_decode_mismatches_are_refused():
    q, k, v, sl = make_inputs([20, 7], 4, 2, 64, torch.float16, cache_len=32)
    plan = leanattn.plan_decode(sl, 32, q_heads=4, kv_heads=2, head_dim=64, kv_dtype=k.dtype, num_programs=3)
    assert torch.equal(leanattn.decode(q, k, v, sl, plan=plan), leanattn.decode(q, k, v, sl, num_programs=3))
    cases = [
        (dict(q=q, k=k[:, :16], v=v[:, :16]), {}, "capacity 16 (planned 32)"),
        (dict(q=q.repeat(1, 1, 2, 1), k=k, v=v), {}, "q_heads 8 (planned 4)"),
        (dict(q=q, k=k, v=v), dict(window_size=(8, 0)), "window_left 8 (planned -1)"),
        (dict(q=q, k=k, v=v), dict(cache_leftpad=sl * 0), "cache_leftpad given True"),
        (dict(q=q, k=k, v=v), dict(num_programs=4), "num_programs 4 differs from the plan's grid of 3"),
        (dict(q=q, k=k, v=v), dict(plan=plan.long()), "plan must be int32"),
        (dict(q=q, k=k, v=v), dict(plan=plan[:, :4]), "plan must be int32"),
    ]
    for tensors, kw, msg in cases:
        kw = {"plan": plan, **kw}
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            leanattn.decode(tensors["q"], tensors["k"], tensors["v"], sl, **kw)
    with pytest.raises(ValueError, match="needs cache_seqlens, or batch"):
        leanattn.plan_decode(None, 32, q_heads=4, kv_heads=2, head_dim=64)
    with pytest.raises(ValueError, match="needs device="):
        leanattn.plan_decode(None, 32, q_heads=4, kv_heads=2, head_dim=64, batch=2)
    with pytest.raises(ValueError, match="q_heads .* multiple"):
        leanattn.plan_decode(sl, 32, q_heads=5, kv_heads=2, head_dim=64)
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        leanattn.plan_decode(sl.long(), 32, q_heads=4, kv_heads=2, head_dim=64)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("paged", [False, True])
def test_graph_with_plan_and_layers_replays_new_lengths(paged):
    """One CUDA graph holds the plan and three layers; each replay re-plans for new lengths and
    block tables, and each layer matches decode bitwise."""
    from leanattn.bench.peers import capture_cuda_graph

    cap, batch, layers = 4096, 6, 3
    xs = [make_inputs([cap] * batch, 32, 8, 128, torch.bfloat16, seed=i) for i in range(layers)]
    seqlens = torch.full((batch,), cap, dtype=torch.int32, device=DEVICE)
    caches, kw = [], {}
    table = None
    for q, k, v, _ in xs:
        if paged:
            kp, vp, table_i = to_paged(k, v, [cap] * batch, 16)
            caches.append((kp, vp))
            table = table_i  # to_paged with the default seed gives every layer the same table
        else:
            caches.append((k, v))
    if paged:
        kw = {"block_table": table}
    w = leanattn.DecodeWrapper(32, 8, 128, torch.bfloat16, DEVICE, paged=paged)
    outs = [torch.empty_like(x[0]) for x in xs]
    lses: list[torch.Tensor] = []

    def step():
        w.plan(seqlens, cap)
        lses.clear()
        for (q, *_), (kc, vc), out in zip(xs, caches, outs):
            lses.append(w.run(q, kc, vc, out=out, return_lse=True, **kw)[1])
        return lses

    graph, captured_lses = capture_cuda_graph(step)
    rng = random.Random(5)
    for trial in range(6):
        new = [0, cap, 1] + [rng.randint(0, cap) for _ in range(batch - 3)]
        rng.shuffle(new)
        seqlens.copy_(torch.tensor(new, dtype=torch.int32))
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for (q, k, v, _), (kc, vc), out, lse in zip(xs, caches, outs, captured_lses):
            assert_close(out, lse, *reference(q, k, v, seqlens))
            again, again_lse = leanattn.decode(q, kc, vc, seqlens, return_lse=True, **kw)
            assert torch.equal(out, again) and torch.equal(lse, again_lse)
    assert w.compiled_kernels and not DIRECT_LAUNCH_ERROR, "the direct launch path was not taken"


@pytest.mark.parametrize("api", ["decode", "wrapper"])
def test_lse_written_into_a_given_strided_tensor(api):
    """``lse=``: the LSE lands in the caller's (batch, q_heads, q_len) view, any strides, equal to
    the returned one; without return_lse, or with the wrong shape or dtype, it is refused."""
    t = tile_size(64, torch.bfloat16, 4)
    _, k, v, sl = make_inputs([0, 5, 2 * t + 3], 8, 2, 64, torch.bfloat16, seed=4)
    q = torch.randn(3, 2, 8, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).to(DEVICE)
    buf = torch.full((3, 2, 8 + 1), float("nan"), dtype=torch.float32, device=DEVICE)
    view = buf[:, :, 1:].transpose(1, 2)  # (batch, q_heads, q_len), strides (18, 1, 9)
    if api == "decode":
        out, lse = leanattn.decode(q, k, v, sl, return_lse=True, lse=view, num_programs=5)
        ref_out, ref_lse = leanattn.decode(q, k, v, sl, return_lse=True, num_programs=5)
    else:
        w = leanattn.DecodeWrapper(8, 2, 64, torch.bfloat16, q.device, max_q_len=2, num_programs=5)
        w.plan(sl, k.shape[1], q_len=2)
        out, lse = w.run(q, k, v, return_lse=True, lse=view)
        ref_out, ref_lse = w.run(q, k, v, return_lse=True)
    assert lse is view and torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert buf[:, :, 0].isnan().all()
    call = leanattn.decode if api == "decode" else (lambda *a, **kw: w.run(*a[:3], **kw))
    for bad, kw in ((view, {}), (view.double(), {"return_lse": True}), (view[:, :4], {"return_lse": True}),
                    (torch.zeros(1, 1, 1, device=DEVICE).expand(3, 8, 2), {"return_lse": True})):
        with pytest.raises(ValueError, match="lse"):
            call(q, k, v, sl, lse=bad, **kw)


@pytest.mark.parametrize("api", ["decode", "wrapper"])
def test_out_of_other_strides_after_an_allocated_one(api):
    """A call that allocates its output, then one writing into a given ``out`` of other strides
    (a view of a wider tensor), then the first again: every output is right and the given one
    is written in place, its neighbours untouched (the call key tells the layouts apart)."""
    t = tile_size(64, torch.float16, 4)
    q, k, v, sl = make_inputs([37, 2 * t + 5, 0], 8, 2, 64, torch.float16, seed=6)
    want = reference(q, k, v, sl)
    if api == "decode":
        call = lambda **kw: leanattn.decode(q, k, v, sl, return_lse=True, num_programs=5, **kw)
    else:
        w = leanattn.DecodeWrapper(8, 2, 64, torch.float16, q.device, num_programs=5)
        w.plan(sl, k.shape[1])
        call = lambda **kw: w.run(q, k, v, return_lse=True, **kw)
    assert_close(*call(), *want)
    d = q.shape[3]
    wide = torch.full((*q.shape[:3], d + 16), float("nan"), dtype=q.dtype, device=q.device)
    view = wide[..., 8 : 8 + d]  # 16-byte aligned like q, strides (640, 640, 80, 1) against (512, 512, 64, 1)
    out, lse = call(out=view)
    assert out is view
    assert_close(out, lse, *want)
    assert wide[..., :8].isnan().all() and wide[..., 8 + d :].isnan().all()
    assert_close(*call(), *want)


def test_a_seen_layout_still_checks_the_plan():
    """A run whose layout the wrapper has seen skips the full checks; a later plan of another
    q_len must still refuse it (else the plan's shares would not match the run's rows)."""
    q, k, v, sl = make_inputs([70, 90], 8, 2, 64, torch.bfloat16, seed=21)
    q2 = torch.randn(2, 2, 8, 64, generator=torch.Generator().manual_seed(22)).to(torch.bfloat16).to(DEVICE)
    w = leanattn.DecodeWrapper(8, 2, 64, torch.bfloat16, DEVICE, max_q_len=2, num_programs=3)
    w.plan(sl, k.shape[1], q_len=2, window_size=(31, -1))
    out = w.run(q2, k, v)
    assert_close(out, None, *reference(q2, k, v, sl, window_size=(31, -1)))
    w.plan(sl, k.shape[1], q_len=1, window_size=(31, -1))
    with pytest.raises(ValueError, match="planned for q_len 1"):
        w.run(q2, k, v)


@pytest.mark.parametrize("q_heads,kv_heads", [(0, 8), (8, 0), (12, 8)])
def test_wrapper_refuses_head_counts_decode_refuses(q_heads, kv_heads):
    with pytest.raises(ValueError, match=r"q_heads \(\d+\) must be a positive multiple of kv_heads"):
        leanattn.DecodeWrapper(q_heads, kv_heads, 64, torch.bfloat16, DEVICE)


def test_a_run_on_the_other_kind_of_cache_warns_once_and_stays_exact(monkeypatch):
    """A wrapper made for contiguous caches that runs a paged one (or the other way round) warns
    once, naming the flag, where that kind's config differs from the planned one, and still
    equals the reference; where the configs agree (the interpreter's) it says nothing."""
    from leanattn import KernelConfig, _call

    lens = [70, 5]
    q, k, v, sl = make_inputs(lens, 8, 2, 64, torch.float16, cache_len=96)
    kp, vp, table = to_paged(k, v, [96] * 2, 16)
    runs = ((False, dict(k_cache=kp, v_cache=vp, block_table=table)), (True, dict(k_cache=k, v_cache=v)))
    # The heuristic's configs: one for both kinds under the interpreter, smaller shares for paged
    # caches on the GPU.
    agree = leanattn.choose_config(64, torch.float16, 4) == leanattn.choose_config(64, torch.float16, 4, paged=True)
    for paged, run in runs:
        w = _wrapper(q, k, 4, paged=paged)
        w.plan(sl, 96)
        if agree:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                w.run(q, **run)
        else:
            with pytest.warns(UserWarning, match=f"paged={not paged}"):
                assert_close(w.run(q, **run), None, *reference(q, k, v, sl)[:1], None)
    real = _call.heuristic
    monkeypatch.setattr(_call, "heuristic", lambda d, dt, rows, paged, invariant, large=False: KernelConfig(
        tile=real(d, dt, rows, paged, invariant).tile, num_warps=4, num_stages=1 if paged else 2, programs_per_sm=1))
    for paged, run in runs:
        w = _wrapper(q, k, 4, paged=paged)
        w.plan(sl, 96)
        with pytest.warns(UserWarning, match=f"paged={not paged}"):
            first = w.run(q, **run)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = w.run(q, **run, out=torch.empty_like(q))  # a new layout, no second warning
        assert torch.equal(first, again)
        assert_close(first, None, *reference(q, k, v, sl))


@pytest.mark.parametrize("merge_kernel", [None, True])
def test_empty_batch_runs_with_either_merge(merge_kernel):
    """A step with no sequences: plan and run return an empty output, whichever merge the config
    asks for (zero heads never take the merge kernel, whose shape is sized per head)."""
    config = merge_config(64, torch.float16, 4, merge_kernel)
    w = leanattn.DecodeWrapper(8, 2, 64, torch.float16, DEVICE, num_programs=16, config=config)
    w.plan(torch.zeros(0, dtype=torch.int32, device=DEVICE), 64)
    q = torch.randn(0, 1, 8, 64, dtype=torch.float16, device=DEVICE)
    k = torch.randn(0, 64, 2, 64, dtype=torch.float16, device=DEVICE)
    assert w.run(q, k, k).shape == (0, 1, 8, 64)


def test_default_merge_follows_members_per_head():
    """The heuristic's merge, through decode and the wrapper: one head cut among 16 programs at
    full capacity takes the merge kernel, among 8 the last arrivers' tree; a window narrower
    than the cache counts its width, not the capacity."""
    from leanattn._testing import DECODE_CALLS, wrapper_calls

    config = leanattn.choose_config(64, torch.float16, 4)
    per = config.tile * config.target_share
    for capacity, window, merged in ((16 * per, -1, True), (8 * per, -1, False), (16 * per, 8 * per - 1, False)):
        q, k, v, sl = make_inputs([capacity - 5], 4, 1, 64, torch.float16, cache_len=capacity)
        DECODE_CALLS.clear()
        out = leanattn.decode(q, k, v, sl, num_programs=16, window_size=(window, 0))
        (call,) = DECODE_CALLS.values()
        assert call.params["MERGE_KERNEL"] is merged
        w = _wrapper(q, k, 16)
        w.plan(sl, capacity, window_size=(window, 0))
        assert torch.equal(w.run(q, k, v), out)
        (wcall,) = wrapper_calls(w)
        assert wcall.params["MERGE_KERNEL"] is merged
        assert_close(out, None, *reference(q, k, v, sl, window_size=(window, 0)))


def test_constructor_attributes_cannot_be_assigned():
    """The scale (and every constructor argument) is baked into the wrapper's cached calls and
    buffers: assigning one would be silently ignored by the next run, so it is refused, and the
    wrapper keeps computing with the value it was made with."""
    q, k, v, sl = make_inputs([20, 7], 4, 2, 64, torch.float16, cache_len=32)
    w = _wrapper(q, k, 3, softmax_scale=0.3)
    w.plan(sl, 32)
    first = w.run(q, k, v)
    for name, value in [("softmax_scale", 0.1), ("num_programs", 5), ("q_heads", 8), ("head_dim", 128),
                        ("paged", True), ("max_q_len", 4), ("dtype", torch.bfloat16), ("device", "cpu")]:
        with pytest.raises(AttributeError, match=f"DecodeWrapper.{name} cannot be assigned"):
            setattr(w, name, value)
    assert (w.softmax_scale, w.num_programs, w.q_heads, w.head_dim, w.paged) == (0.3, 3, 4, 64, False)
    assert torch.equal(w.run(q, k, v), first)
    assert_close(first, None, reference(q, k, v, sl, softmax_scale=0.3)[0], None)


def test_constructor_attributes_of_other_wrappers_cannot_be_assigned():
    """MLAWrapper and ContextParallelDecode refuse assignment of what their plans are built from
    (ContextParallelDecode checked on an instance made without a process group)."""
    from leanattn.distributed import ContextParallelDecode

    m = leanattn.MLAWrapper(16, 576, 512, torch.bfloat16, DEVICE, softmax_scale=0.2)
    for name in ("softmax_scale", "num_programs", "head_dim_v", "q_heads"):
        with pytest.raises(AttributeError, match=f"MLAWrapper.{name} cannot be assigned"):
            setattr(m, name, 1)
    assert m.softmax_scale == 0.2 and m.head_dim_v == 512
    cp = object.__new__(ContextParallelDecode)
    for name in ("softmax_scale", "num_programs", "q_heads", "kv_heads", "scatter_heads", "world_size", "group"):
        with pytest.raises(AttributeError, match=f"ContextParallelDecode.{name} cannot be assigned"):
            setattr(cp, name, 1)


def test_plan_that_fails_to_grow_the_workspace_leaves_the_last_plan(monkeypatch):
    """A batch-invariant plan may have to grow the workspace, which can fail (out of memory, or
    inside a CUDA-graph capture). Nothing of the wrapper changes then: not its grid or config
    (here a grid made to differ, as a larger call's does on a GPU), so runs keep the last plan
    and match it, rather than caching a call built from half of the new one."""
    from leanattn import _call

    q, k, v, sl = make_inputs([20, 7], 4, 2, 64, torch.float16, cache_len=32)
    w = _wrapper(q, k, 3, batch_invariant=True)
    w.plan(sl, 32)
    first = w.run(q, k, v)
    state, bufs = (w.num_programs, w._config, w._split, w._plan_key), w._bufs

    def refuse(*args, **kwargs):
        raise torch.OutOfMemoryError("no memory for the workspace")

    monkeypatch.setattr(_call, "grid", lambda *args: 7)
    monkeypatch.setattr(_call, "buffers", refuse)
    with pytest.raises(torch.OutOfMemoryError):
        w.plan(sl, 32)
    assert (w.num_programs, w._config, w._split, w._plan_key) == state and w._bufs is bufs
    monkeypatch.undo()
    out, _ = w.run(q, k, v, return_lse=True)  # a layout not run yet: a new call, from the last plan
    assert torch.equal(out, first)


def test_plan_recovers_from_a_run_on_unplanned_lengths():
    """A run after the lengths changed in place without a plan breaks the contract and its output
    is garbage; it also leaves tickets raised (arrivals the old shares never bring). The next plan
    starts them at zero, so every later step is exact again."""
    # 512 tokens: the plan cuts heads among the 5 programs at any tile (32 under the
    # interpreter, 64 on a GPU), so the misuse leaves tickets raised.
    q, k, v, _ = make_inputs([512, 512], 4, 2, 64, torch.float16, seed=9)
    sl = torch.tensor([450, 10], dtype=torch.int32, device=DEVICE)
    w = _wrapper(q, k, 5)
    w.plan(sl, 512)
    assert_close(w.run(q, k, v), None, reference(q, k, v, sl)[0], None)
    sl.copy_(torch.tensor([512, 300], dtype=torch.int32))
    w.run(q, k, v)  # the misuse
    assert w._workspace.tickets.any()  # (left raised: the case tested)
    for step in range(2):
        sl.copy_(torch.tensor([400 - 7 * step, 140 + step], dtype=torch.int32))
        w.plan(sl, 512)
        assert not w._workspace.tickets.any()
        out, lse = w.run(q, k, v, return_lse=True)
        assert_close(out, lse, *reference(q, k, v, sl))


def test_plan_decode_recovers_from_a_call_on_unplanned_lengths():
    """decode(plan=) on lengths changed since plan_decode breaks the contract: garbage, and the
    tickets of planned calls left raised, so later planned calls would come out NaN. Calls
    without a plan draw other tickets, so they stay exact at once; the next plan_decode starts
    the planned ones at zero."""
    # 512 tokens: the plan cuts heads among the 5 programs at any tile (32 under the
    # interpreter, 64 on a GPU), so the misuse leaves tickets raised.
    q, k, v, _ = make_inputs([512, 512], 4, 2, 64, torch.float16, seed=11)
    sl = torch.tensor([450, 10], dtype=torch.int32, device=DEVICE)
    plan = leanattn.plan_decode(sl, 512, q_heads=4, kv_heads=2, head_dim=64, kv_dtype=k.dtype, num_programs=5)
    assert_close(leanattn.decode(q, k, v, sl, plan=plan, num_programs=5), None, reference(q, k, v, sl)[0], None)
    sl.copy_(torch.tensor([512, 300], dtype=torch.int32))
    leanattn.decode(q, k, v, sl, plan=plan, num_programs=5)  # the misuse
    ws = leanattn._workspace.workspace_for(q.device)
    # Raised (the case tested), and only among the planned calls' tickets.
    assert ws.planned_tickets().any() and not ws.tickets[: ws.tickets.numel() // 2].any()
    out, lse = leanattn.decode(q, k, v, sl, num_programs=5, return_lse=True)  # no plan, before any new one
    assert_close(out, lse, *reference(q, k, v, sl))
    for step in range(2):
        sl.copy_(torch.tensor([400 - 7 * step, 140 + step], dtype=torch.int32))
        plan = leanattn.plan_decode(sl, 512, q_heads=4, kv_heads=2, head_dim=64, kv_dtype=k.dtype, num_programs=5)
        assert not ws.tickets.any()
        out, lse = leanattn.decode(q, k, v, sl, plan=plan, num_programs=5, return_lse=True)
        assert_close(out, lse, *reference(q, k, v, sl))
        out, lse = leanattn.decode(q, k, v, sl, num_programs=5, return_lse=True)
        assert_close(out, lse, *reference(q, k, v, sl))
