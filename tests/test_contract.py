"""No silent wrong answer: every input gives the reference's result or a clear error.

The reference (``leanattn.reference``) is the contract: NaN and inf inputs, views of every
argument, broken merge parts and CPU mode are checked against it or against a named error."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import leanattn

from _util import DEVICE, ON_GPU, TOL, make_inputs, poisoned_like, rel_err, to_paged

HQ, HKV, D = 4, 2, 64


def assert_same_as_reference(out: torch.Tensor, lse: torch.Tensor, ref: torch.Tensor, ref_lse: torch.Tensor) -> None:
    """NaN exactly where the reference has NaN (output and LSE), inf where it has inf, the finite
    rest within the dtype's bound."""
    for name, a, b in (("output", out.double(), ref.double()), ("LSE", lse.double(), ref_lse.double())):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN at {torch.isnan(a).nonzero().tolist()[:4]}, " \
                                                            f"reference at {torch.isnan(b).nonzero().tolist()[:4]}"
        assert torch.equal(torch.isinf(a), torch.isinf(b)) and torch.equal(a[torch.isinf(a)], b[torch.isinf(b)]), \
            f"{name}: inf pattern differs"
    fin = torch.isfinite(ref.double())
    assert rel_err(out[fin], ref[fin]) < TOL.get(out.dtype, 1e-5)
    fin = torch.isfinite(ref_lse)
    assert (lse[fin] - ref_lse[fin]).abs().max().item() < 1e-3 if fin.any() else True


def _ref(q, k, v, sl, **kw):
    return leanattn.reference.decode(q.double(), k.double(), v.double(), sl, return_lse=True, **kw)


# -- views: read through their strides, or refused by name ----------------------------------------

def _strided(x: torch.Tensor) -> torch.Tensor:
    """A view of x's values with stride 2 along dim 0 (every other row of a larger buffer)."""
    big = torch.empty(2 * x.shape[0], *x.shape[1:], dtype=x.dtype, device=x.device)
    big[::2] = x
    return big[::2]


def _fp8_case():
    q, k, v, sl = make_inputs([40, 0, 33], HQ, HKV, D, torch.bfloat16, seed=11)
    return q, k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn), sl


@pytest.mark.parametrize("name", ["cache_seqlens", "cache_leftpad", "sinks", "k_scale", "v_scale", "plan"])
@pytest.mark.parametrize("kind", ["strided", "expanded"])
def test_non_contiguous_vectors_are_refused_by_decode(name, kind):
    """The issue's case: lengths [200, 999, 50, 999][::2] were read as [200, 999]."""
    q, k, v, sl = _fp8_case() if name in ("k_scale", "v_scale") else make_inputs([40, 0, 33], HQ, HKV, D,
                                                                                   torch.float16, seed=1)
    args = dict(cache_seqlens=sl)
    dense = {
        "cache_seqlens": sl, "cache_leftpad": torch.tensor([3, 0, 1], dtype=torch.int32, device=DEVICE),
        "sinks": torch.randn(HQ, device=DEVICE), "k_scale": torch.rand(HKV, device=DEVICE) + 0.5,
        "v_scale": torch.rand(HKV, device=DEVICE) + 0.5,
        "plan": leanattn.plan_decode(sl, k.shape[1], q_heads=HQ, kv_heads=HKV, head_dim=D, kv_dtype=k.dtype,
                                     num_programs=4),
    }[name]
    args[name] = _strided(dense) if kind == "strided" else dense[:1].expand(dense.shape)
    out = poisoned_like(q)
    for check in (False, True):
        with pytest.raises(ValueError, match=f"{name} must be contiguous.*strides"):
            leanattn.decode(q, k, v, out=out, check=check, **args)
    assert torch.isnan(out).all(), "a refused call wrote out"


def test_strided_lengths_are_refused_by_every_planner():
    q, k, v, sl = make_inputs([40, 0, 33, 5], HQ, HKV, D, torch.float16, seed=2)
    view = sl[::2]
    with pytest.raises(ValueError, match="cache_seqlens must be contiguous"):
        leanattn.plan_decode(view, k.shape[1], q_heads=HQ, kv_heads=HKV, head_dim=D, kv_dtype=k.dtype)
    w = leanattn.DecodeWrapper(HQ, HKV, D, torch.float16, DEVICE, num_programs=3)
    with pytest.raises(ValueError, match="cache_leftpad must be contiguous"):
        w.plan(sl[:2], k.shape[1], cache_leftpad=view)
    w.plan(sl[:2], k.shape[1])
    with pytest.raises(ValueError, match="sinks must be contiguous"):
        w.run(q[:2], k[:2], v[:2], sinks=torch.randn(2 * HQ, device=DEVICE)[::2])


def test_broadcast_out_is_refused():
    q, k, v, sl = make_inputs([40, 33], HQ, HKV, D, torch.float16, seed=3)
    with pytest.raises(ValueError, match="out must not be a broadcast view"):
        leanattn.decode(q, k, v, sl, out=torch.empty_like(q[:1]).expand(q.shape))
    with pytest.raises(ValueError, match="out must not be a broadcast view"):
        leanattn.merge_states([q, q], [torch.zeros(2, HQ, 1, device=DEVICE)] * 2, out=torch.empty_like(q[:1]).expand(q.shape))


# -- NaN and inf: the kernel computes what the reference computes ---------------------------------

POISONS = ["q NaN", "q inf", "K NaN live", "V inf live", "K NaN past length", "V NaN before window",
           "sink -inf, empty sequence", "sink NaN"]


@pytest.mark.parametrize("poison", POISONS)
def test_non_finite_inputs_match_the_reference(poison):
    """A NaN or inf input poisons exactly the rows that see it (NaN output and LSE), in the kernel
    and in the reference alike; slots outside the attended range are never read."""
    lens = [70, 0, 45]
    q, k, v, sl = make_inputs(lens, HQ, HKV, D, torch.bfloat16, cache_len=80, seed=4)
    kw: dict = {}
    if poison == "q NaN":
        q[0, 0, 1, 5] = math.nan
    elif poison == "q inf":
        q[2, 0, 3, 0] = math.inf
    elif poison == "K NaN live":
        k[0, 12, 1, 7] = math.nan
    elif poison == "V inf live":
        v[2, 44, 0, 3] = math.inf
    elif poison == "K NaN past length":
        k[2, 50, :, :] = math.nan
    elif poison == "V NaN before window":
        v[0, 3, :, :] = math.nan
        kw["window_size"] = (20, 0)
    elif poison.startswith("sink"):
        kw["sinks"] = torch.randn(HQ, device=DEVICE)
        kw["sinks"][1] = -math.inf if "-inf" in poison else math.nan
    out, lse = leanattn.decode(q, k, v, sl, return_lse=True, num_programs=5, **kw)
    ref, ref_lse = _ref(q, k, v, sl, **kw)
    assert_same_as_reference(out, lse, ref, ref_lse)
    if poison in ("K NaN past length", "V NaN before window"):
        assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    else:
        assert not torch.isfinite(out).all() or poison == "sink -inf, empty sequence"


@pytest.mark.parametrize("bad", ["k_scale NaN", "v_scale inf", "q inf, other heads exact"])
def test_fp8_non_finite_scales_and_queries(bad):
    """With ``check`` a non-finite scale is refused by name; without it the result is the
    reference's (NaN rows, zeros for the empty sequence). An inf in one query row leaves the
    other rows of its group exact (the fp16 pre-scale ignores non-finite values)."""
    q, k, v, sl = _fp8_case()
    ks = torch.rand(HKV, device=DEVICE) + 0.5
    vs = torch.rand(HKV, device=DEVICE) + 0.5
    if bad == "k_scale NaN":
        ks[1] = math.nan
    elif bad == "v_scale inf":
        vs[0] = math.inf
    else:
        q[0, 0, 2, 9] = math.inf
    if bad != "q inf, other heads exact":
        with pytest.raises(ValueError, match=bad.split()[0] + r"\[\d\] = .* is not finite"):
            leanattn.decode(q, k, v, sl, k_scale=ks, v_scale=vs, check=True)
    out, lse = leanattn.decode(q, k, v, sl, k_scale=ks, v_scale=vs, return_lse=True, num_programs=3)
    assert_same_as_reference(out, lse, *_ref(q, k, v, sl, k_scale=ks, v_scale=vs))


FINER_SCALE_POISONS = ["k_scale token NaN", "v_scale token NaN", "v_scale token inf", "k_scale seq inf",
                       "token NaN past the length"]


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("bad", FINER_SCALE_POISONS)
def test_fp8_non_finite_finer_scales(bad, paged):
    """Per-token and per-sequence scales, two query tokens: a NaN k scale of a key poisons the
    output and LSE of exactly the rows that see the key; a NaN v scale, like a NaN in V, the
    outputs (not the LSEs) of every row of its head and sequence, since each reads the key (a
    weight of 0 times NaN is NaN); a per-sequence inf k scale its sequence's rows of its head;
    scales past a length are never read. Kernel and reference agree on every pattern."""
    lens = [40, 0, 33]
    _, k, v, sl = make_inputs(lens, HQ, HKV, D, torch.bfloat16, seed=12)
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(3, 2, HQ, D, generator=gen).to(torch.bfloat16).to(DEVICE)
    kc, vc, kw = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn), {}
    if paged:
        kc, vc, table = to_paged(kc, vc, lens, 16, seed=14)
        kw["block_table"] = table

    def row(b: int, pos: int) -> tuple[int, int]:
        """Where the scales of sequence b's position pos are."""
        return (int(kw["block_table"][b, pos // 16]), pos % 16) if paged else (b, pos)

    ks = torch.rand(kc.shape[:3], generator=gen).to(DEVICE) + 0.5
    vs = torch.rand(kc.shape[:3], generator=gen).to(DEVICE) + 0.5
    nan_out = torch.zeros(3, 2, HQ, dtype=torch.bool, device=DEVICE)  # (batch, q_len, q_heads)
    nan_lse = torch.zeros(3, HQ, 2, dtype=torch.bool, device=DEVICE)
    if bad == "k_scale token NaN":
        ks[row(0, 39) + (1,)] = math.nan  # the newest key: only query token 1 sees it
        nan_out[0, 1, 2:], nan_lse[0, 2:, 1] = True, True
    elif bad == "v_scale token NaN":
        vs[row(0, 39) + (1,)] = math.nan
        nan_out[0, :, 2:] = True
    elif bad == "v_scale token inf":
        vs[row(2, 20) + (0,)] = math.inf
    elif bad == "k_scale seq inf":
        ks = torch.rand(3, HKV, generator=gen).to(DEVICE) + 0.5
        ks[2, 0] = math.inf
        nan_out[2, :, :2], nan_lse[2, :2, :] = True, True
    else:
        ks[row(2, 33)[0], row(2, 33)[1]:] = math.nan  # the rest of sequence 2's last page, or its rows past 33
        vs[row(2, 33)[0], row(2, 33)[1]:] = math.nan
    out, lse = leanattn.decode(q, kc, vc, sl, k_scale=ks, v_scale=vs, return_lse=True, num_programs=3, **kw)
    assert_same_as_reference(out, lse, *_ref(q, kc, vc, sl, k_scale=ks, v_scale=vs, **kw))
    if bad != "v_scale token inf":
        assert torch.equal(torch.isnan(out).all(dim=-1), nan_out) and not torch.isnan(out[~nan_out]).any()
        assert torch.equal(torch.isnan(lse), nan_lse)
    else:
        assert not torch.isfinite(out[2, :, :2]).all() and torch.isfinite(out[:2]).all()


def test_reference_bad_pages_match_the_kernel():
    """The reference poisons what the kernel poisons: the rows that see a key on a page outside
    the cache, and nothing else."""
    lens = [49, 30]
    q, k, v, sl = make_inputs(lens, HQ, HKV, D, torch.bfloat16, cache_len=64, seed=5)
    q = torch.randn(2, 2, HQ, D, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16).to(DEVICE)
    kp, vp, table = to_paged(k, v, lens, 16, seed=5)
    table[0, 3] = kp.shape[0] + 7  # holds key 48 alone: only the second query token (at 48) sees it
    table[1, 0] = -1  # before sequence 1's window: never read
    kw = dict(block_table=table, window_size=(12, 0))
    out, lse = leanattn.decode(q, kp, vp, sl, return_lse=True, num_programs=4, **kw)
    ref, ref_lse = _ref(q, kp, vp, sl, **kw)
    assert_same_as_reference(out, lse, ref, ref_lse)
    assert torch.isnan(ref[0, 1]).all() and torch.isfinite(ref[0, 0]).all() and torch.isfinite(ref[1]).all()


# -- merge_states: a broken part stays visible ----------------------------------------------------

@pytest.mark.parametrize("broken", ["LSE NaN", "LSE +inf", "output NaN", "output NaN, LSE -inf"])
def test_merge_states_keeps_broken_parts_visible(broken):
    gen = torch.Generator().manual_seed(7)
    outs = torch.randn(3, 2, 1, HQ, D, generator=gen).to(DEVICE)
    lses = torch.randn(3, 2, HQ, 1, generator=gen).to(DEVICE)
    if broken == "LSE NaN":
        lses[1, 0, 2, 0] = math.nan
    elif broken == "LSE +inf":
        lses[1, 0, 2, 0] = math.inf
    elif broken == "output NaN":
        outs[1, 0, 0, 2, 5] = math.nan
    else:
        outs[1, 0, 0, 2, 5] = math.nan
        lses[1, 0, 2, 0] = -math.inf
    out, lse = leanattn.merge_states(outs, lses)
    ref, ref_lse = leanattn.reference.merge_states(outs, lses)
    assert_same_as_reference(out, lse, ref, ref_lse)
    row_nan = broken != "output NaN, LSE -inf"
    assert bool(torch.isnan(lse[0, 2, 0])) == row_nan and bool(torch.isnan(out[0, 0, 2]).all()) == row_nan
    # A later merge with a healthy part cannot drop a broken row.
    again, again_lse = leanattn.merge_states([out, outs[0]], [lse, lses[0]])
    assert bool(torch.isnan(again_lse[0, 2, 0])) == row_nan and bool(torch.isnan(again[0, 0, 2]).all()) == row_nan
    assert torch.isfinite(again[1]).all() and torch.isfinite(again_lse[1]).all()


# -- CPU mode does not depend on import order -----------------------------------------------------

_FIRST_IMPORT = """
import sys
{first}
import torch, leanattn
q = torch.randn(2, 1, 4, 64, dtype=torch.bfloat16)
k, v = torch.randn(2, 50, 2, 64, dtype=torch.bfloat16), torch.randn(2, 50, 2, 64, dtype=torch.bfloat16)
sl = torch.tensor([50, 19], dtype=torch.int32)
try:
    out = leanattn.decode(q, k, v, sl, num_programs=3)
except RuntimeError as e:
    print("ERROR", e)
    sys.exit(0)
ref = leanattn.reference.decode(q.double(), k.double(), v.double(), sl)
print("OK", float((out.double() - ref).norm() / ref.norm()))
"""


@pytest.mark.skipif(ON_GPU, reason="CPU mode")
@pytest.mark.parametrize("first", ["import triton", "import torch._dynamo, torch._inductor.config", "broken"])
def test_cpu_mode_whatever_was_imported_first(first):
    """Triton imported before leanattn (directly, or by torch.compile's modules) without
    TRITON_INTERPRET: leanattn still runs its kernels on the CPU. If Triton's library can't be
    switched to the interpreter, the call raises one error that says what to do."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if first == "broken":  # a Triton whose interpreted functions are built differently
        first = ("import triton, triton.runtime.interpreter as i\n"
                 "class Other(i.InterpretedFunction):\n"
                 "    def __init__(self, fn, **kw):\n"
                 "        if 'debug' not in kw:\n"
                 "            raise TypeError('debug= is required')\n"
                 "        super().__init__(fn, **kw)\n"
                 "i.InterpretedFunction = Other")
    code = _FIRST_IMPORT.format(first=first)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    if "class Other" in first:
        assert res.stdout.startswith("ERROR") and "set TRITON_INTERPRET=1 in the environment" in res.stdout
    else:
        assert res.stdout.startswith("OK"), res.stdout + res.stderr[-2000:]
        assert float(res.stdout.split()[1]) < TOL[torch.bfloat16]


def test_wrapper_device_is_required():
    with pytest.raises(TypeError, match="device"):
        leanattn.DecodeWrapper(HQ, HKV, D, torch.float16)  # type: ignore[call-arg]


@pytest.mark.skipif(ON_GPU, reason="CPU mode")
def test_cpu_mode_names_the_triton_it_needs(monkeypatch):
    """Triton 3.6's interpreter can't run the kernels: a clear error, not the interpreter's."""
    import triton

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    q, k, v, sl = make_inputs([20, 7], HQ, HKV, D, torch.float16, seed=23)
    with pytest.raises(RuntimeError, match=r"needs Triton >= 3\.7; this is Triton 3\.6\.0"):
        leanattn.decode(q, k, v, sl)


def test_config_constexprs_may_set_only_the_probes():
    """KernelConfig.constexprs sets the kernel's probe parameters (TIMELINE); a
    parameter the launch derives from the call (TILE, HEAD_DIM, ...) is refused, never
    silently replaced (the host plans and sizes by config.tile)."""
    import dataclasses

    q = torch.randn(2, 1, 8, 64, dtype=torch.float16, device=DEVICE)
    k = torch.randn(2, 96, 2, 64, dtype=torch.float16, device=DEVICE)
    base = leanattn.choose_config(64, k.dtype, 4)
    for name, value in (("TILE", base.tile // 2), ("HEAD_DIM", 32), ("GROUP", 2)):
        with pytest.raises(ValueError, match=f"may set only TIMELINE: the launch sets {name}"):
            leanattn.decode(q, k, k, config=dataclasses.replace(base, constexprs=((name, value),)))


def test_a_plan_is_refused_by_runs_of_another_tile(monkeypatch):
    """A plan's shares are dealt in its launch config's tiles; where paged and contiguous caches
    take configs of different tiles, a plan made for one kind is refused by a run of the other
    (where they agree, as today, it runs on the other kind's grid, exactly)."""
    from leanattn import KernelConfig
    from leanattn.kernels import config as kernel_config

    real = kernel_config.choose_config

    def tiles(head_dim, kv_dtype, rows, paged=False, batch_invariant=False, large=False):
        c = real(head_dim, kv_dtype, rows, paged, batch_invariant, large)
        return KernelConfig(2 * c.tile if paged else c.tile, c.num_warps, c.num_stages, c.programs_per_sm)

    q = torch.randn(2, 1, 8, 64, dtype=torch.float16, device=DEVICE)
    k = torch.randn(2, 128, 2, 64, dtype=torch.float16, device=DEVICE)
    sl = torch.tensor([100, 7], dtype=torch.int32, device=DEVICE)
    plan = leanattn.plan_decode(sl, 128, q_heads=8, kv_heads=2, head_dim=64, kv_dtype=k.dtype)
    kp, vp, table = to_paged(k, k, [128, 128], 16)
    leanattn.decode(q, kp, vp, sl, block_table=table, plan=plan)  # same tiles: runs
    monkeypatch.setattr(kernel_config, "choose_config", tiles)
    with pytest.raises(ValueError, match="tile"):  # (return_lse: a layout not checked before)
        leanattn.decode(q, kp, vp, sl, block_table=table, plan=plan, return_lse=True)
