"""``leanattn.decode`` skips the checks of an argument layout it has checked before: calls of a
known layout with other values, options or per-call problems still get their own answer."""

from __future__ import annotations

import pytest
import torch

import leanattn

from _util import DEVICE, assert_close, make_inputs, reference, to_paged

HQ, HKV, D = 4, 2, 64


def test_known_layout_with_new_values_and_options():
    """The same layouts again, with other lengths, values, causality, window and scale: each
    call is right."""
    for seed, lens, kw in [
        (1, [70, 33], {}),
        (2, [5, 90], {}),
        (3, [90, 90], {"causal": False}),
        (4, [90, 60], {"window_size": (20, 0)}),
        (5, [90, 60], {"softmax_scale": 0.3}),
        (6, [90, 60], {"softcap": 5.0}),
    ]:
        q, k, v, sl = make_inputs(lens, HQ, HKV, D, torch.bfloat16, cache_len=96, seed=seed)
        q = q.expand(-1, 2, -1, -1).contiguous()  # two query tokens: causality matters
        out, lse = leanattn.decode(q, k, v, sl, return_lse=True, **kw)
        assert_close(out, lse, *reference(q, k, v, sl, **kw))


def test_known_layout_keeps_the_per_call_checks():
    q, k, v, sl = make_inputs([40, 12], HQ, HKV, D, torch.bfloat16, cache_len=48, seed=7)
    leanattn.decode(q, k, v, sl)  # the layout is known from here on
    with pytest.raises(RuntimeError, match="grad"):
        with torch.enable_grad():
            leanattn.decode(q.clone().requires_grad_(), k, v, sl)
    with pytest.raises(ValueError, match="cache_seqlens"):
        leanattn.decode(q, k, v, torch.tensor([40, 99], dtype=torch.int32, device=DEVICE), check=True)
    plan = leanattn.plan_decode(sl, 48, q_heads=HQ, kv_heads=HKV, head_dim=D, num_programs=3)
    for _ in range(2):  # (the second call's plan check is the remembered one)
        leanattn.decode(q, k, v, sl, plan=plan)
    other = leanattn.plan_decode(sl, 48, q_heads=HQ, kv_heads=HKV, head_dim=D, num_programs=3, q_len=2)
    with pytest.raises(ValueError, match="plan was made for another call: q_len"):
        leanattn.decode(q, k, v, sl, plan=other)
    # A plan that passed is checked again when the call or the plan's own shape changes.
    leanattn.decode(q, k, v, sl, plan=plan)
    with pytest.raises(ValueError, match="num_programs 4 differs from the plan's grid of 3"):
        leanattn.decode(q, k, v, sl, plan=plan, num_programs=4)
    leanattn.decode(q, k, v, sl, plan=plan)
    plan.resize_(3, 4)
    with pytest.raises(ValueError, match="plan must be int32"):
        leanattn.decode(q, k, v, sl, plan=plan)


def test_known_paged_layout_with_new_pages():
    """A block table of the same layout with other page ids: the new pages are read."""
    lens = [60, 25]
    for seed in (8, 9):
        q, k, v, sl = make_inputs(lens, HQ, HKV, D, torch.bfloat16, cache_len=64, seed=seed)
        kp, vp, table = to_paged(k, v, lens, 16, seed=seed)
        out, lse = leanattn.decode(q, kp, vp, sl, block_table=table, return_lse=True)
        assert_close(out, lse, *reference(q, k, v, sl))


def test_known_layout_keeps_the_option_types():
    """A known layout's options are checked for their types too: True, not 1; an int split."""
    q, k, v, sl = make_inputs([40, 12], HQ, HKV, D, torch.bfloat16, cache_len=64, seed=11)
    tile = leanattn.choose_config(D, torch.bfloat16, HQ // HKV).tile
    leanattn.decode(q, k, v, sl, batch_invariant=True, split_size=tile)
    with pytest.raises(TypeError, match="batch_invariant must be a bool"):
        leanattn.decode(q, k, v, sl, batch_invariant=1, split_size=tile)
    with pytest.raises(ValueError, match="split_size must be a positive multiple"):
        leanattn.decode(q, k, v, sl, batch_invariant=True, split_size=float(tile))
