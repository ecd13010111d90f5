"""Batch-invariant mode: a sequence's output and LSE bits depend on its own inputs and the split
size only, never on the sequences that ride with it, the grid, a plan, the cache's layout or
left padding; and they are right (against the float64 reference)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import leanattn

from _util import DEVICE, assert_close, merge_config, reference, tile_size, to_paged

HQ, HKV, D = 4, 2, 64
DTYPE = torch.bfloat16
PAGE = 16


def rnd(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(DTYPE).to(DEVICE)


def run(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], pads: list[int], *, split: int,
    grid: int, how: str, paged: bool, config: leanattn.KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's (out, lse) in batch-invariant mode, through ``how``: decode, decode with a plan,
    or a DecodeWrapper (``config``: the launch config, else the heuristic's)."""
    batch, q_len = q.shape[:2]
    seqlens = torch.tensor([p + n for p, n in zip(pads, lens)], dtype=torch.int32, device=DEVICE)
    leftpad = torch.tensor(pads, dtype=torch.int32, device=DEVICE)
    table = None
    if paged:
        k, v, table = to_paged(k, v, seqlens.tolist(), PAGE, seed=grid)
    capacity = k.shape[1] if table is None else table.shape[1] * k.shape[1]
    kw = dict(batch_invariant=True, split_size=split, config=config)
    if how == "wrapper":
        w = leanattn.DecodeWrapper(HQ, HKV, D, DTYPE, DEVICE, max_q_len=q_len, num_programs=grid, **kw)
        w.plan(seqlens, capacity, cache_leftpad=leftpad, q_len=q_len)
        return w.run(q, k, v, block_table=table, return_lse=True)
    plan = None
    if how == "plan":
        plan = leanattn.plan_decode(seqlens, capacity, q_heads=HQ, kv_heads=HKV, head_dim=D, kv_dtype=DTYPE,
                                    cache_leftpad=leftpad, q_len=q_len, num_programs=grid, **kw)
    return leanattn.decode(q, k, v, seqlens, cache_leftpad=leftpad, block_table=table, num_programs=grid, plan=plan,
                           return_lse=True, **kw)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    length=st.integers(0, 700),
    q_len=st.sampled_from([1, 3]),
    splits_per=st.sampled_from([1, 3]),
    companions=st.lists(st.integers(0, 400), max_size=3),
    at=st.integers(0, 3),
    pad=st.integers(0, 40),
    grid=st.sampled_from([1, 5, 16, 40]),
    how=st.sampled_from(["decode", "plan", "wrapper"]),
    paged=st.booleans(),
    merge_kernel=st.booleans(),
    seed=st.integers(0, 2**16),
)
# Over 16 splits of one head under the interpreter (32-token tiles): the two-level merge.
@example(length=690, q_len=1, splits_per=1, companions=[5, 300], at=1, pad=7, grid=40, how="decode",
         paged=False, merge_kernel=False, seed=1)
@example(length=690, q_len=1, splits_per=1, companions=[5, 300], at=1, pad=7, grid=40, how="wrapper",
         paged=True, merge_kernel=True, seed=2)
def test_a_sequence_has_the_same_bits_in_any_batch(length, q_len, splits_per, companions, at, pad, grid, how,
                                                    paged, merge_kernel, seed):
    split = tile_size(D, DTYPE, q_len * HQ // HKV) * splits_per
    gen = torch.Generator().manual_seed(seed)
    length = max(length, q_len)
    cap = max([length + pad] + companions) + 5
    q0, k0, v0 = rnd(gen, 1, q_len, HQ, D), rnd(gen, 1, length, HKV, D), rnd(gen, 1, length, HKV, D)

    # Alone, on one program, unpadded and contiguous.
    config = invariant_config(q_len * HQ // HKV, merge_kernel)
    alone, alone_lse = run(q0, k0, v0, [length], [0], split=split, grid=1, how="decode", paged=False, config=config)
    ref, ref_lse = reference(q0, k0, v0, torch.tensor([length], dtype=torch.int32, device=DEVICE))
    assert_close(alone, alone_lse, ref, ref_lse)

    # In a batch: companions before and after it, the sequence left-padded by `pad`.
    at = min(at, len(companions))
    lens = companions[:at] + [length] + companions[at:]
    pads = [0] * at + [pad] + [0] * (len(companions) - at)
    batch = len(lens)
    q = rnd(gen, batch, q_len, HQ, D)
    k, v = rnd(gen, batch, cap, HKV, D), rnd(gen, batch, cap, HKV, D)
    q[at] = q0[0]
    k[at, pad : pad + length] = k0[0]
    v[at, pad : pad + length] = v0[0]
    out, lse = run(q, k, v, lens, pads, split=split, grid=grid, how=how, paged=paged, config=config)
    assert torch.equal(out[at], alone[0]), "the output's bits depend on the batch"
    assert torch.equal(lse[at], alone_lse[0]), "the LSE's bits depend on the batch"


def invariant_config(rows: int, merge_kernel: bool) -> leanattn.KernelConfig:
    """This file's batch-invariant config, split heads merged by the merge kernel or the tree."""
    return merge_config(D, DTYPE, rows, merge_kernel, batch_invariant=True)


@pytest.mark.parametrize("merge_kernel", [True, False])
def test_every_sequence_is_right(merge_kernel):
    """Ragged lengths, one head over 16 splits (the tree's two levels, on any device's tile), with
    a window and sinks; the long sequence's bits alone equal its bits in the batch, with either
    merge."""
    gen = torch.Generator().manual_seed(3)
    split = tile_size(D, DTYPE, 2 * HQ // HKV)
    lens = [20 * split + 5, 0, 33, 257]
    cap = lens[0] + 3
    q, k, v = rnd(gen, 4, 2, HQ, D), rnd(gen, 4, cap, HKV, D), rnd(gen, 4, cap, HKV, D)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    sinks = torch.randn(HQ, generator=gen).to(DEVICE)
    config = invariant_config(2 * HQ // HKV, merge_kernel)
    for window in [(-1, -1), (8 * split, 0)]:
        kw = dict(window_size=window, sinks=sinks, batch_invariant=True, split_size=split, return_lse=True,
                  config=config)
        out, lse = leanattn.decode(q, k, v, seqlens, num_programs=7, **kw)
        ref, ref_lse = reference(q, k, v, seqlens, window_size=window, sinks=sinks)
        assert_close(out, lse, ref, ref_lse)
        alone, alone_lse = leanattn.decode(q[:1], k[:1], v[:1], seqlens[:1], num_programs=40, **kw)
        assert torch.equal(alone[0], out[0]) and torch.equal(alone_lse[0], lse[0])


def test_split_size_errors():
    gen = torch.Generator().manual_seed(0)
    q, k, v = rnd(gen, 1, 1, HQ, D), rnd(gen, 1, 64, HKV, D), rnd(gen, 1, 64, HKV, D)
    tile = tile_size(D, DTYPE, HQ // HKV)
    with pytest.raises(ValueError, match="split_size is the split of batch_invariant=True"):
        leanattn.decode(q, k, v, split_size=tile)
    for bad in (tile + tile // 2, 0, -tile):
        with pytest.raises(ValueError, match=rf"split_size must be a positive multiple of .*tile \({tile} tokens\)"):
            leanattn.decode(q, k, v, batch_invariant=True, split_size=bad)
    with pytest.raises(TypeError, match="batch_invariant must be a bool"):
        leanattn.decode(q, k, v, batch_invariant=1)
    with pytest.raises(ValueError, match=f"split_size must be .*tile \\({tile} tokens\\)"):
        leanattn.DecodeWrapper(HQ, HKV, D, DTYPE, DEVICE, batch_invariant=True, split_size=tile + 1)
    # A plan dealt in tiles is not a plan dealt in splits.
    plan = leanattn.plan_decode(None, 64, batch=1, q_heads=HQ, kv_heads=HKV, head_dim=D, kv_dtype=DTYPE,
                                device=DEVICE)
    with pytest.raises(ValueError, match="plan was made for another call: split_size"):
        leanattn.decode(q, k, v, plan=plan, batch_invariant=True, split_size=tile)


def test_custom_op_takes_the_split():
    """The op torch.compile traces carries the split: its result is the eager call's bits."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = rnd(gen, 2, 1, HQ, D), rnd(gen, 2, 300, HKV, D), rnd(gen, 2, 300, HKV, D)
    seqlens = torch.tensor([300, 120], dtype=torch.int32, device=DEVICE)
    split = tile_size(D, DTYPE, HQ // HKV) * 2
    want = leanattn.decode(q, k, v, seqlens, num_programs=3, batch_invariant=True, split_size=split)
    out = torch.full_like(q, float("nan"))
    torch.ops.leanattn.decode_into(q, k, v, out, None, seqlens, None, D**-0.5, 3, split=split)
    assert torch.equal(out, want)


def test_batch_invariant_calls_take_their_own_launch_config(monkeypatch):
    """On the GPU, d=128 with a contiguous cache takes one program of 6 stages an SM by default
    and two of 3 in batch-invariant mode (whose programs all restart their pipelines at the same
    split boundaries), with the same tile, so the mode does not change the partition's tiles;
    decode, plan_decode and DecodeWrapper all ask the heuristic for the batch-invariant one."""
    from leanattn.kernels import config as kernel_config

    monkeypatch.setattr(kernel_config, "interpreting", lambda: False)  # the GPU's heuristic, on any machine
    default = kernel_config.choose_config(128, torch.bfloat16, 4)
    invariant = kernel_config.choose_config(128, torch.bfloat16, 4, batch_invariant=True)
    assert (default.num_stages, default.programs_per_sm) == (6, 1)
    assert (invariant.num_stages, invariant.programs_per_sm) == (3, 2) and invariant.tile == default.tile
    for paged in (False, True):
        for d in (64, 80, 96, 128, 256):
            assert kernel_config.choose_config(d, torch.bfloat16, 4, paged, True).tile == \
                kernel_config.choose_config(d, torch.bfloat16, 4, paged).tile
    monkeypatch.undo()

    split = 2 * tile_size()
    asked = []
    real = leanattn._call.heuristic

    def recording(*args):
        asked.append(args[4])  # batch_invariant
        return real(*args)

    real_choose = kernel_config.choose_config
    monkeypatch.setattr(leanattn._call, "heuristic", recording)
    monkeypatch.setattr(kernel_config, "choose_config", lambda *args: asked.append(args[4]) or real_choose(*args))
    gen = torch.Generator().manual_seed(5)
    q, k, v = rnd(gen, 2, 1, HQ, D), rnd(gen, 2, 96, HKV, D), rnd(gen, 2, 96, HKV, D)
    sl = torch.tensor([96, 40], dtype=torch.int32, device=DEVICE)
    leanattn.decode(q, k, v, sl, batch_invariant=True, split_size=split)
    plan = leanattn.plan_decode(sl, 96, q_heads=HQ, kv_heads=HKV, head_dim=D, kv_dtype=DTYPE, batch_invariant=True,
                                split_size=split)
    leanattn.decode(q, k, v, sl, plan=plan, batch_invariant=True, split_size=split)
    w = leanattn.DecodeWrapper(HQ, HKV, D, DTYPE, DEVICE, batch_invariant=True, split_size=split)
    w.plan(sl, 96)
    w.run(q, k, v)
    assert asked and all(flag is True for flag in asked)


@pytest.mark.parametrize("merge_kernel", [True, False])
def test_multi_tile_splits_across_chunks_on_any_grid(merge_kernel):
    """One tile loop runs through a program's splits: splits of three tiles (the last one
    partial), 18 of them (two chunks of the tree), behind a companion that shifts their slots, on
    grids whose shares start inside a chunk and cross its end; every grid gives the bits of the
    sequence decoded alone, which match the reference, with either merge."""
    tile = tile_size(D, DTYPE, HQ // HKV)
    split = 3 * tile
    n = 17 * split + tile + 5
    gen = torch.Generator().manual_seed(7)
    q, k, v = rnd(gen, 2, 1, HQ, D), rnd(gen, 2, n + 3, HKV, D), rnd(gen, 2, n + 3, HKV, D)
    sl = torch.tensor([40, n], dtype=torch.int32, device=DEVICE)
    kw = dict(batch_invariant=True, split_size=split, return_lse=True, config=invariant_config(HQ // HKV, merge_kernel))
    alone, alone_lse = leanattn.decode(q[1:], k[1:], v[1:], sl[1:], num_programs=1, **kw)
    assert_close(alone, alone_lse, *reference(q[1:], k[1:], v[1:], sl[1:]))
    for grid in (2, 3, 5, 11):
        out, lse = leanattn.decode(q, k, v, sl, num_programs=grid, **kw)
        assert torch.equal(out[1], alone[0]) and torch.equal(lse[1], alone_lse[0]), grid


def test_wrapper_refuses_a_batch_invariant_that_is_not_a_bool():
    with pytest.raises(TypeError, match="batch_invariant must be a bool, got list"):
        leanattn.DecodeWrapper(HQ, HKV, D, DTYPE, DEVICE, batch_invariant=[True])


@pytest.mark.usefixtures("fresh_decode_calls")
def test_merge_kernel_steps_of_sixteen_rows_keep_the_bits():
    """16 query rows a kv head (the merge kernel's steps then hold 4096 values: 16 splits of 16
    columns), a head of 21 splits taking two steps, its largest scores in its last split: the
    same bits alone on one program and in a batch on several grids, right against the
    reference."""
    from leanattn import _call
    from leanattn._testing import DECODE_CALLS

    hq, hkv = 16, 1
    split = tile_size(D, DTYPE, hq // hkv)
    n = 20 * split + 3
    gen = torch.Generator().manual_seed(21)
    q, k, v = rnd(gen, 2, 1, hq, D), rnd(gen, 2, n, hkv, D), rnd(gen, 2, n, hkv, D)
    k[0, -3:] = (q[0, 0].float().mean(0) * 3).to(DTYPE)  # top scores in the last split
    sl = torch.tensor([n, 5 * split], dtype=torch.int32, device=DEVICE)
    kw = dict(batch_invariant=True, split_size=split, return_lse=True,
              config=merge_config(D, DTYPE, hq // hkv, True, batch_invariant=True))
    alone, alone_lse = leanattn.decode(q[:1], k[:1], v[:1], sl[:1], num_programs=1, **kw)
    assert_close(alone, alone_lse, *reference(q[:1], k[:1], v[:1], sl[:1]))
    for grid in (3, 8):
        out, lse = leanattn.decode(q, k, v, sl, num_programs=grid, **kw)
        assert torch.equal(out[0], alone[0]) and torch.equal(lse[0], alone_lse[0]), grid
        assert_close(out, lse, *reference(q, k, v, sl))
    members = _call.merge_load(16) // (16 * _call.INVARIANT_MERGE_COLS)
    assert 21 > members == 16
    assert {(c.merge_params["MEMBERS"], c.merge_params["BY_SLOT"]) for c in DECODE_CALLS.values()} == {(members, True)}


@pytest.mark.usefixtures("fresh_decode_calls")
def test_merge_kernel_steps_keep_the_bits(monkeypatch):
    """Batch-invariant calls asked to merge split heads in the merge kernel do so by slot, in a
    shape that is fixed (here 4 members a load step, so 18 splits take five steps): a head whose largest scores are
    in its last split (the last step's max rescales the earlier steps' sums) has the bits of the
    sequence decoded alone on every grid and batch, right against the reference; the shape does
    not follow the batch."""
    from leanattn import _call
    from leanattn._testing import DECODE_CALLS

    monkeypatch.setattr(_call, "INVARIANT_MERGE_MEMBERS", 4)
    split = tile_size(D, DTYPE, HQ // HKV)
    n = 17 * split + 9
    gen = torch.Generator().manual_seed(11)
    q, k, v = rnd(gen, 3, 1, HQ, D), rnd(gen, 3, n, HKV, D), rnd(gen, 3, n, HKV, D)
    k[1, -5:] = (q[1, 0].float().reshape(HKV, HQ // HKV, D).mean(1) * 3).to(DTYPE)  # top scores at the end
    sl = torch.tensor([7, n, 2 * split + 1], dtype=torch.int32, device=DEVICE)
    kw = dict(batch_invariant=True, split_size=split, return_lse=True, config=invariant_config(HQ // HKV, True))
    alone, alone_lse = leanattn.decode(q[1:2], k[1:2], v[1:2], sl[1:2], num_programs=1, **kw)
    assert_close(alone, alone_lse, *reference(q[1:2], k[1:2], v[1:2], sl[1:2]))
    for grid in (3, 8):
        out, lse = leanattn.decode(q, k, v, sl, num_programs=grid, **kw)
        assert torch.equal(out[1], alone[0]) and torch.equal(lse[1], alone_lse[0]), grid
        assert_close(out, lse, *reference(q, k, v, sl))
    shapes = {(c.merge_params["MEMBERS"], c.merge_params["COLS"], c.merge_params["BY_SLOT"]) for c in DECODE_CALLS.values()}
    assert shapes == {(4, _call.INVARIANT_MERGE_COLS, True)}


def test_merge_kernel_jobs_rewritten_every_call():
    """Batch-invariant calls through the merge kernel: a head of several splits in one call and of
    one split in the next (written by its program) must not be merged again from the first
    call's partials."""
    split = tile_size(D, DTYPE, HQ // HKV)
    gen = torch.Generator().manual_seed(13)
    kw = dict(batch_invariant=True, split_size=split, return_lse=True, num_programs=4,
              config=invariant_config(HQ // HKV, True))
    q, k, v = rnd(gen, 2, 1, HQ, D), rnd(gen, 2, 5 * split, HKV, D), rnd(gen, 2, 5 * split, HKV, D)
    for lens in ([5 * split, 2 * split + 3], [split - 3, 5 * split]):  # sequence 0 split, then whole
        sl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        out, lse = leanattn.decode(q, k, v, sl, **kw)
        assert_close(out, lse, *reference(q, k, v, sl))
