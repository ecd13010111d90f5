"""leanattn.decode against the float64 reference (interpreter on CPU, the real kernel on GPU)."""

from __future__ import annotations

import dataclasses
import random
import types

import pytest
import torch

import leanattn
from leanattn.schedule import plan

from _util import ON_GPU, assert_close, make_inputs, merge_config, poisoned_like, reference, tile_size

DTYPES = [torch.float16, torch.bfloat16]


def run(q, k, v, seqlens, **kw):
    out = poisoned_like(q)
    res, lse = leanattn.decode(q, k, v, seqlens, return_lse=True, out=out, **kw)
    assert res is out
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("programs", [1, 3, 13, 400])
def test_ragged_edges(dtype, programs):
    """Lengths 0, 1, tile-1, tile, tile+1 and a multi-tile one, across grids that keep heads
    whole (1 program), split them (3, 13; see test_schedule_cases_are_exercised) and leave programs idle (400)."""
    t = tile_size(64, dtype, 4)
    lens = [0, 1, t - 1, t, t + 1, 3 * t + 7]
    q, k, v, sl = make_inputs(lens, 8, 2, 64, dtype, cache_len=4 * t)
    out, lse = run(q, k, v, sl, num_programs=programs)
    ref, ref_lse = reference(q, k, v, sl)
    assert_close(out, lse, ref, ref_lse)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 192, 256, 512])
def test_head_dims(dtype, head_dim):
    t = tile_size(head_dim, dtype, 4)
    lens = [2 * t + 3, t // 2] if not ON_GPU else [5000, 77, 1]
    q, k, v, sl = make_inputs(lens, 4, 1, head_dim, dtype)
    out, lse = run(q, k, v, sl, num_programs=3)
    assert_close(out, lse, *reference(q, k, v, sl))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (8, 2), (10, 2), (16, 2), (7, 1), (8, 1)])
def test_gqa_groups(dtype, q_heads, kv_heads):
    """Groups 1, 4, 5, 8, 7 (MQA) and 8 (MQA); each K/V tile serves the whole group."""
    t = tile_size(64, dtype, q_heads // kv_heads)
    lens = [t + 5, 2 * t, 9] if not ON_GPU else [3000, 20000, 9]
    q, k, v, sl = make_inputs(lens, q_heads, kv_heads, 64, dtype)
    out, lse = run(q, k, v, sl, num_programs=4)
    assert_close(out, lse, *reference(q, k, v, sl))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_hf_layout_cache(dtype):
    """A (B, Hkv, N, D) cache passed as its transpose, without a copy."""
    t = tile_size(128, dtype, 2)
    q, k, v, sl = make_inputs([3 * t + 1, t], 4, 2, 128, dtype, hf_layout=True)
    assert not k.is_contiguous()
    out, lse = run(q, k, v, sl, num_programs=5)
    assert_close(out, lse, *reference(q, k, v, sl))
    # K, V and out each with strides of their own: every tensor is read through its own.
    v = v.contiguous()
    out = poisoned_like(q.transpose(1, 2).contiguous()).transpose(1, 2)
    _, lse = leanattn.decode(q, k, v, sl, out=out, return_lse=True, num_programs=5)
    assert_close(out, lse, *reference(q, k, v, sl))


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_cache_without_seqlens(dtype):
    t = tile_size(64, dtype, 2)
    q, k, v, _ = make_inputs([2 * t + 9] * 3, 4, 2, 64, dtype)
    out = leanattn.decode(q, k, v, num_programs=7)
    ref, _ = reference(q, k, v)
    assert_close(out, None, ref, None)
    out2, lse = leanattn.decode(q, k, v, return_lse=True, num_programs=7)
    assert torch.equal(out, out2) and lse.dtype == torch.float32 and lse.shape == (3, 4, 1)


def test_schedule_cases_are_exercised():
    """The grids used above really split heads and span heads and sequences."""
    t = tile_size(64, torch.float16, 4)
    lens = [0, 1, t - 1, t, t + 1, 3 * t + 7]
    assert plan(lens, 2, t, 3).split_heads()
    split = plan(lens, 2, t, 13)
    assert any(len(v) > 2 for v in split.split_heads().values()), "no head shared by 3+ programs"
    spans = {}
    for seg in plan(lens, 2, t, 3).segments:
        spans.setdefault(seg.program, set()).add(seg.batch)
    assert any(len(b) > 1 for b in spans.values()), "no share spans two sequences"
    assert plan(lens, 2, t, 400).num_programs < 400


def test_lengths_clamped_to_capacity():
    q, k, v, _ = make_inputs([40, 40], 2, 1, 64, torch.float16)
    sl = torch.tensor([1000, -3], dtype=torch.int32, device=q.device)
    out, lse = run(q, k, v, sl, num_programs=3)
    ref, ref_lse = reference(q, k, v, sl)
    assert_close(out, lse, ref, ref_lse)
    assert (out[1] == 0).all()


def test_softmax_scale_and_default_out():
    q, k, v, sl = make_inputs([50, 20], 4, 2, 64, torch.float16)
    out, lse = leanattn.decode(q, k, v, sl, softmax_scale=0.3, return_lse=True, num_programs=3)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, lse, *reference(q, k, v, sl, softmax_scale=0.3))


def test_lse_merges_two_halves_of_a_cache():
    """Attention over [0, n) equals the LSE-weighted merge of attention over two halves."""
    n, half = 90, 37
    q, k, v, _ = make_inputs([n], 4, 2, 64, torch.float16)
    o1, l1 = leanattn.decode(q, k[:, :half], v[:, :half], return_lse=True, num_programs=2)
    o2, l2 = leanattn.decode(q, k[:, half:], v[:, half:], return_lse=True, num_programs=2)
    lse = torch.logaddexp(l1, l2)  # (batch, q_heads, 1)
    merged = (torch.exp(l1 - lse)[..., 0, None] * o1[:, 0].float() + torch.exp(l2 - lse)[..., 0, None] * o2[:, 0].float())
    ref, ref_lse = reference(q, k, v)
    assert_close(merged.unsqueeze(1).to(q.dtype), lse, ref, ref_lse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_deterministic(dtype):
    rng = random.Random(7)
    lens = [rng.randint(0, 300) for _ in range(5)]
    q, k, v, sl = make_inputs(lens, 8, 2, 64, dtype)
    first, first_lse = leanattn.decode(q, k, v, sl, return_lse=True, num_programs=11)
    for _ in range(3):
        again, lse = leanattn.decode(q, k, v, sl, return_lse=True, num_programs=11)
        assert torch.equal(again, first) and torch.equal(lse, first_lse)


def test_random_ragged_batches():
    """Fresh random shapes and lengths; the workspace is reused across calls with no reset."""
    rng = random.Random()
    for _ in range(6 if not ON_GPU else 40):
        kv_heads = rng.choice([1, 2, 4])
        group = rng.choice([1, 3, 4, 8])
        lens = [rng.choice([0, 1, rng.randint(0, 200 if not ON_GPU else 20000)]) for _ in range(rng.randint(1, 5))]
        dtype = rng.choice(DTYPES)
        q, k, v, sl = make_inputs(lens, kv_heads * group, kv_heads, 64, dtype)
        out, lse = run(q, k, v, sl, num_programs=rng.randint(1, 40))
        assert_close(out, lse, *reference(q, k, v, sl))


@pytest.mark.parametrize("target_share", [2, 3, 50])
def test_target_share_shrinks_grid_correctly(target_share):
    """With a target share the kernel uses fewer programs, chosen on the device from live lengths."""
    t = tile_size(64, torch.float16, 4)
    lens = [0, 1, 2 * t + 1, 7 * t + 3]
    q, k, v, sl = make_inputs(lens, 8, 2, 64, torch.bfloat16)
    out = poisoned_like(q)
    lse = torch.empty(4, 8, 1, dtype=torch.float32, device=q.device)
    cfg = leanattn.KernelConfig(tile=t, num_warps=4, num_stages=1, programs_per_sm=1, target_share=target_share)
    leanattn.decode(q, k, v, sl, out=out, lse=lse, return_lse=True, num_programs=16, config=cfg)
    assert_close(out, lse, *reference(q, k, v, sl))
    assert plan(lens, 2, t, 16, target_share).num_programs < 16


# (Each merge with one dtype: the merges are fp32 whatever the cache; the two cost the CPU a minute.)
@pytest.mark.parametrize("dtype,merge_kernel", [(torch.float16, False), (torch.bfloat16, True)])
def test_head_shared_by_several_arrival_chunks(dtype, merge_kernel):
    """Heads over ~50 programs each: chunks of 16 merge first, then the chunks' sums per head (or
    the merge kernel)."""
    from leanattn._testing import ARRIVE_CHUNK

    t = tile_size(64, dtype, 1)
    lens = [70 * t - 5, 3]
    q, k, v, sl = make_inputs(lens, 2, 2, 64, dtype)
    split = plan(lens, 2, t, 100).split_heads()
    assert max(len(s) for s in split.values()) > 2 * ARRIVE_CHUNK
    for _ in range(2):  # the second call finds every ticket back at zero
        out, lse = run(q, k, v, sl, num_programs=100, config=merge_config(64, dtype, 1, merge_kernel))
        assert_close(out, lse, *reference(q, k, v, sl))


@pytest.mark.parametrize("merge_kernel", [False, True])
@pytest.mark.parametrize("extra", [0, 1])
@pytest.mark.parametrize("chunks", [1, 2])
def test_one_head_over_chunk_boundaries(chunks, extra, merge_kernel):
    """One head shared by exactly 16, 17, 32 or 33 programs: a whole head in one chunk, and a
    last chunk of one member (merge kernel: member counts past a power of two)."""
    from leanattn._testing import ARRIVE_CHUNK, workspace_for

    programs = chunks * ARRIVE_CHUNK + extra
    t = tile_size(64, torch.float16, 4)
    lens = [2 * programs * t - 7]
    q, k, v, sl = make_inputs(lens, 4, 1, 64, torch.float16)
    (segs,) = plan(lens, 1, t, programs).split_heads().values()
    assert len(segs) == programs
    out, lse = run(q, k, v, sl, num_programs=programs, config=merge_config(64, torch.float16, 4, merge_kernel))
    assert_close(out, lse, *reference(q, k, v, sl))
    assert (workspace_for(q.device).tickets == 0).all()


@pytest.mark.parametrize("q_len", [1, 2])
def test_merge_kernel_ragged_batch(q_len):
    """The merge kernel on a ragged batch (an empty sequence, one shorter than a tile, heads cut
    among several programs and whole ones), d=80 (its column ranges divide 80, not 128), with
    attention sinks and the LSE: output and LSE against the reference, and the same result as
    the ticket tree within fp32 rounding (the two sum the partials in different orders)."""
    from leanattn._testing import DECODE_CALLS

    t = tile_size(80, torch.bfloat16, 4 * q_len)
    lens = [9 * t + 5, 0, t - 3, 20 * t]
    q, k, v, sl = make_inputs(lens, 8, 2, 80, torch.bfloat16, seed=5)
    q = torch.randn(4, q_len, 8, 80, generator=torch.Generator().manual_seed(6)).to(q)
    sinks = torch.randn(8, generator=torch.Generator().manual_seed(7)).to(q.device)
    outs = []
    DECODE_CALLS.clear()
    for merge_kernel in (False, True):
        out, lse = run(q, k, v, sl, num_programs=12, sinks=sinks,
                       config=merge_config(80, torch.bfloat16, 4 * q_len, merge_kernel))
        assert_close(out, lse, *reference(q, k, v, sl, sinks=sinks))
        outs.append((out.float(), lse))
    assert sorted(call.merge_params is not None for call in DECODE_CALLS.values()) == [False, True]
    assert (outs[0][0] - outs[1][0]).abs().max().item() <= 1e-2
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("with_seqlens", [True, False])
@pytest.mark.parametrize("batch,kv_heads,programs", [(2, 4, 17), (4, 4, 9)])
def test_equal_heads_aligned_grid(batch, kv_heads, programs, with_seqlens):
    """Equal lengths, on grids where the schedule takes k * heads (16 of 17) or heads / m (8 of
    9) programs: the kernel's own choice is not observable from outside, so this checks that its
    aligned partition still covers every tile exactly (output and LSE against the reference)."""
    t = tile_size(64, torch.float16, 2)
    lens = [5 * t - 3] * batch
    q, k, v, sl = make_inputs(lens, 2 * kv_heads, kv_heads, 64, torch.float16, cache_len=lens[0])
    assert plan(lens, kv_heads, t, programs).num_programs in (16, 8)
    out, lse = run(q, k, v, sl if with_seqlens else None, num_programs=programs)
    assert_close(out, lse, *reference(q, k, v, sl))


def test_workspace_tickets_back_at_zero_and_old_buffers_kept():
    """After any call every ticket is zero again (no memset needed), and growing the workspace
    keeps the old buffers alive for CUDA graphs captured with them."""
    from leanattn._testing import workspace_for

    q, k, v, sl = make_inputs([300, 0, 77], 8, 2, 64, torch.bfloat16)
    leanattn.decode(q, k, v, sl, num_programs=9)
    ws = workspace_for(q.device)
    first = (ws.acc, ws.stats, ws.tickets)
    leanattn.reserve_workspace(q.device, 8, 2, 64, torch.bfloat16, num_programs=9 + first[2].numel())  # larger
    assert ws.tickets.numel() > first[2].numel()
    assert any(all(a is b for a, b in zip(old, first)) for old in ws.retired)
    for programs in (1, 4, 13, 60):
        leanattn.decode(q, k, v, sl, num_programs=programs)
        assert (ws.tickets == 0).all()


def test_workspace_views_follow_the_buffers_when_they_grow():
    """A size asked for before returns the same views (one lookup), and after the buffers are
    replaced by larger ones, views of the new buffers, never of the retired ones."""
    from leanattn._testing import Workspace

    ws = Workspace()
    small = ws.get(torch.device("cpu"), 8, 4, 64)
    assert ws.get(torch.device("cpu"), 8, 4, 64) is small
    ws.get(torch.device("cpu"), 64, 16, 128)  # grows every buffer
    again = ws.get(torch.device("cpu"), 8, 4, 64)
    assert again[0] is ws.acc and again[1] is ws.stats
    assert again[2].data_ptr() == ws.tickets.data_ptr() and again[2].numel() == 8
    assert again[3].data_ptr() == ws.tickets[8:].data_ptr()
    assert all(a is not b for a, b in zip(again, small))
    # A planned call's tickets: the upper half, from a 16-byte boundary, apart from any
    # unplanned call's that the buffer holds; a plan zeroes exactly that half.
    half = ws.tickets.numel() // 2
    for slots in (5, 8, 64):
        heads, chunks = ws.get(torch.device("cpu"), slots, 4, 64, True)[2:4]
        assert heads.data_ptr() == ws.tickets[half:].data_ptr() and heads.data_ptr() % 16 == 0
        assert chunks.data_ptr() % 16 == 0 and chunks.data_ptr() + 4 * slots <= ws.tickets[-1:].data_ptr() + 4
        lower = ws.get(torch.device("cpu"), slots, 4, 64)[3]
        assert lower.data_ptr() + 4 * slots <= heads.data_ptr()
    assert ws.planned_tickets().data_ptr() == ws.tickets[half:].data_ptr()


def test_merge_kernel_rule_and_shape():
    """Who merges in a second kernel (batch-invariant calls only when the config asks and a head
    can have two splits, whatever the batch; otherwise never more heads than programs, forced
    either way by the config, by default from ARRIVE_CHUNK members a head), and the merge
    programs' shape: columns
    that divide the head dim, at most ``merge_load(rows)`` values loaded at once (8192 up to 8
    rows, 4096 from 16: two steps are in flight), every member of an average head in one step
    where that fits, and in batch-invariant mode a shape that depends on the head dim and rows
    alone."""
    from leanattn import _call
    from leanattn._testing import ARRIVE_CHUNK

    base = dataclasses.replace(leanattn.choose_config(128, torch.bfloat16, 8), tile=64, target_share=4)
    rule = _call.merge_kernel_of
    assert rule(base, 0, 1, 132, 32768) and rule(base, 0, 8, 8 * ARRIVE_CHUNK, 4096)
    assert not rule(base, 0, 9, 8 * ARRIVE_CHUNK, 32768) and not rule(base, 0, 64, 132, 32768)
    # 8 heads of 1k tokens: 128 tiles, so 32 programs busy (target_share 4), 4 a head
    assert not rule(base, 0, 8, 132, 1024) and rule(base, 0, 1, 132, 4096) and not rule(base, 0, 1, 132, 2048)
    # batch-invariant: the tree by default; asked for, the merge kernel on any batch and grid once
    # a head can have two splits
    forced = dataclasses.replace(base, merge_kernel=True)
    assert not rule(base, 512, 1, 132, 32768) and not rule(dataclasses.replace(base, merge_kernel=False), 512, 1, 132, 32768)
    assert rule(forced, 512, 1, 132, 32768) and rule(forced, 512, 500, 132, 513) and rule(forced, 512, 9, 8, 4096)
    assert not rule(forced, 512, 1, 132, 512) and not rule(forced, 512, 0, 132, 4096)
    assert rule(forced, 0, 64, 132, 64) and not rule(forced, 0, 133, 132) and not rule(forced, 256, 1, 132)
    assert not rule(dataclasses.replace(base, merge_kernel=False), 0, 1, 132, 32768)
    for head_dim in (32, 64, 80, 96, 128, 192, 256, 512):
        for rows in (1, 2, 8, 16, 64):
            for programs, heads in ((132, 1), (264, 1), (132, 8), (264, 32), (16, 16), (1000, 3)):
                cols, members = _call.merge_shape(head_dim, rows, programs, heads)
                assert head_dim % cols == 0 and 4 <= cols <= 64 and members >= 1
                load = _call.merge_load(rows)
                assert load == (8192 if rows <= 8 else 4096)
                assert members & (members - 1) == 0 and members * rows * cols <= max(load, rows * 4)
                average = -(-programs // heads) + 1
                if average * rows * 4 <= load:
                    assert members >= min(programs, average)
    assert _call.merge_shape(128, 8, 132, 1) == (4, 256)  # 128-132 members in one step
    assert _call.merge_shape(128, 4, 132, 8) == (64, 32)  # two programs a head
    # 1 x 16k at d=256 keeps 64 programs busy (of 132): one step of 64 members, not 256
    config256 = dataclasses.replace(base, tile=32, target_share=8)
    assert _call.busy_programs(config256, 1, 132, 16384) == 64
    assert _call.merge_shape(256, 8, 64, 1) == (16, 64)
    assert _call.merge_shape(128, 16, 132, 1) == (4, 64)  # 16 rows: 4096 values, not 8192
    assert _call.merge_shape(128, 1, 4000, 1) == (16, 512)  # a grid of 4000: MERGE_MEMBERS a step
    features = types.SimpleNamespace(v_scale_kind=0)  # all merge_constexprs reads of a call's features
    for rows in (1, 4, 16, 128):
        shapes = set()
        for busy, heads in ((132, 1), (264, 64), (7, 3)):
            params = dict(MERGE_ROWS=rows, HEAD_DIM=128, SPLIT=512, GROUP=rows, Q_LEN=1, HEAD_DIM_PAD=128,
                          RETURN_LSE=False, HAS_SINKS=False, USE_PDL=False)
            mc = _call.merge_constexprs(params, busy, heads, features)
            assert mc["BY_SLOT"] and 128 % mc["COLS"] == 0 and mc["MEMBERS"] * rows * mc["COLS"] <= _call.merge_load(rows)
            shapes.add((mc["COLS"], mc["MEMBERS"]))
        assert len(shapes) == 1


def test_merge_kernel_jobs_rewritten_every_call():
    """The merge kernel's jobs live in the workspace across calls: a head cut in one call and
    whole in the next must not be merged again from the first call's partials."""
    t = tile_size(64, torch.float16, 4)
    config = merge_config(64, torch.float16, 4, True)
    for lens in ([30 * t, 3 * t + 1], [t - 3, 30 * t]):  # head 0 cut, then whole
        q, k, v, sl = make_inputs(lens, 8, 2, 64, torch.float16, cache_len=30 * t)
        out, lse = run(q, k, v, sl, num_programs=24, config=config)
        assert_close(out, lse, *reference(q, k, v, sl))


@pytest.mark.parametrize("rows", [4, 16])  # steps of 8192 values, and of 4096 (merge_load)
@pytest.mark.usefixtures("fresh_decode_calls")
def test_merge_kernel_rescales_across_load_steps(rows):
    """A head with more members than one merge-kernel step loads (MEMBERS, sized for the average
    head: the long head beside two short ones takes two steps or more), whose largest scores are
    all in its last keys, so the later step's max must rescale the earlier steps' sums."""
    from leanattn import _call
    from leanattn._testing import DECODE_CALLS

    config = merge_config(64, torch.float16, rows, True)
    programs = 48
    long = programs * config.target_share * config.tile - 100
    q, k, v, sl = make_inputs([long, 40, 40], rows, 1, 64, torch.float16, seed=9)
    k[0, -200:, 0] = (q[0, 0].float().mean(0) * 4).to(k.dtype)  # the long head's top scores, at its end
    (segs,) = [s for h, s in plan(sl.tolist(), 1, config.tile, programs, config.target_share).split_heads().items()
               if h == (0, 0)]
    cols, members = _call.merge_shape(64, rows, _call.busy_programs(config, 3, programs, k.shape[1]), 3)
    assert len(segs) > members and members * rows * cols == _call.merge_load(rows)
    DECODE_CALLS.clear()
    out, lse = run(q, k, v, sl, num_programs=programs, config=config)
    assert_close(out, lse, *reference(q, k, v, sl))
    (call,) = DECODE_CALLS.values()
    assert call.merge_params["MEMBERS"] == members


def test_a_call_is_large_past_four_tiles_a_program_over_two_heads_or_more():
    """kernels.config.large_call: tiles (heads x 64-token tiles of the capacity) past 4 a program
    of a one-program-an-SM grid, over two heads or more; a single head never (its merge would
    take twice the members)."""
    from leanattn.kernels.config import large_call

    sms = 132
    assert not large_call(1, 10**7, sms)
    assert not large_call(8, 4096, sms)  # 512 tiles: 1 x 4k 32/8
    assert not large_call(2, 64 * 264, sms) and large_call(2, 64 * 264 + 1, sms)  # 528 tiles, then 530
    assert large_call(8, 8192, sms)  # 1024 tiles: 1 x 8k 32/8
    assert large_call(529, 64, sms) and not large_call(528, 64, sms)  # one tile a head
    assert not large_call(8, 8192, 300)  # the same call on a GPU of 300 SMs


@pytest.mark.usefixtures("fresh_decode_calls")
def test_large_calls_take_two_programs_an_sm(monkeypatch):
    """On the GPU's heuristic, d=128 with a contiguous cache takes one program of 6 stages an SM,
    but two of 3 when the call is large (two kv heads or more whose tiles at full capacity pass 4
    a program of the one-program grid), with the same tile; nothing else depends on it. decode,
    plan_decode and DecodeWrapper.plan all ask with the call's own size, and a plan made so is
    run by decode."""
    from leanattn import _call
    from leanattn.kernels import config as kernel_config

    with monkeypatch.context() as m:
        m.setattr(kernel_config, "interpreting", lambda: False)  # the GPU's heuristic, on any machine
        small = kernel_config.choose_config(128, torch.bfloat16, 4)
        large = kernel_config.choose_config(128, torch.bfloat16, 4, large=True)
        assert (small.num_stages, small.programs_per_sm, large.num_stages, large.programs_per_sm) == (6, 1, 3, 2)
        # a plan's tiles and shares are the small config's (plan_decode): a large call's must match
        assert (large.tile, large.target_share) == (small.tile, small.target_share)
        for d in (64, 80, 96, 256, 512):
            for paged in (False, True):
                assert kernel_config.choose_config(d, torch.bfloat16, 4, paged, large=True) == \
                    kernel_config.choose_config(d, torch.bfloat16, 4, paged)
        assert kernel_config.choose_config(128, torch.bfloat16, 4, True, large=True) == \
            kernel_config.choose_config(128, torch.bfloat16, 4, True)
    assert not _call.large(torch.device("cpu"), 10**6, 10**6)

    asked = []
    real = _call.heuristic

    def recording(*args):
        asked.append(args[5])
        return real(*args)

    monkeypatch.setattr(_call, "heuristic", recording)
    monkeypatch.setattr(_call, "large", lambda device, heads, capacity: heads > 3)
    q, k, v, sl = make_inputs([70, 33], 8, 2, 64, torch.float16)  # 4 kv heads
    want = reference(q, k, v, sl)
    # decode asks for the call's own size first, then sizes the workspace for the other's grid.
    assert_close(*run(q, k, v, sl), *want)
    assert asked == [True, False]
    plan = leanattn.plan_decode(sl, k.shape[1], q_heads=8, kv_heads=2, head_dim=64, kv_dtype=k.dtype)
    asked.clear()
    assert_close(*run(q, k, v, sl, plan=plan), *want)
    assert asked == [True, False]
    w = leanattn.DecodeWrapper(8, 2, 64, torch.float16, q.device)  # sized for either config
    assert sorted(set(asked[2:])) == [False, True]
    asked.clear()
    w.plan(sl, k.shape[1])
    assert_close(*w.run(q, k, v, return_lse=True), *want)
    assert asked == [True]
    asked.clear()
    assert_close(*run(q[:1], k[:1], v[:1], sl[:1]), *reference(q[:1], k[:1], v[:1], sl[:1]))
    assert asked == [False, True]


def test_small_eager_calls_merge_in_one_launch(monkeypatch):
    """A call the rule gives the merge kernel (one head over many programs) launches, when it is
    small (at most EAGER_ONE_LAUNCH_BYTES) and not captured, only the decode kernel with the
    ticket tree; its first eager call also compiles and loads the graph's form (decode and merge
    kernels, not run) so that a capture finds them loaded, or runs it where they cannot be loaded
    apart. Under capture, with the merge kernel forced, or over the byte limit, the rule's two
    launches. (The interpreter takes the rule's form always: the switch is patched on here, and
    the launches recorded, not run.)"""
    from leanattn import _call, api
    from leanattn._testing import DECODE_CALLS

    def name(params):
        return "merge" if "MERGE_KERNEL" not in params else ("decode+merge" if params["MERGE_KERNEL"] else "decode")

    launched = []
    capturing = [False]
    loadable = [True]
    monkeypatch.setattr(_call, "interpreting", lambda: False)
    monkeypatch.setattr(_call, "launch", lambda kernel, grid, args, params, *rest: launched.append(name(params)))
    monkeypatch.setattr(_call, "prepare", lambda kernel, grid, args, params, *rest: (
        launched.append("load " + name(params)), ("hit",) if loadable[0] else None)[1])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    # 8192 tokens: the rule gives the merge kernel at every tile of the heuristic (32 under the
    # interpreter, 64 or 128 on a GPU) on this grid of 32.
    q, k, v, sl = make_inputs([8192], 4, 1, 64, torch.bfloat16, seed=2)

    def calls(config=None, k=k, v=v):
        DECODE_CALLS.clear()
        api._KNOWN.clear()  # (decode's known layouts keep their calls too)
        launched.clear()
        for capture in (False, False, True, False):
            capturing[0] = capture
            leanattn.decode(q, k, v, sl, num_programs=32, config=config)
        (call,) = DECODE_CALLS.values()
        return list(launched), call

    got, call = calls()
    assert call.params["MERGE_KERNEL"] and call.eager_params == {**call.params, "MERGE_KERNEL": False}
    assert got == ["load decode+merge", "load merge", "decode", "decode", "decode+merge", "merge", "decode"]
    loadable[0] = False  # (direct launches unavailable): the first eager call runs the graph's form
    got, call = calls()
    assert got == ["load decode+merge", "load merge", "decode+merge", "merge", "decode", "decode", "decode+merge",
                   "merge", "decode"]
    forced = dataclasses.replace(leanattn.choose_config(64, torch.bfloat16, 4), merge_kernel=True)
    got, call = calls(forced)
    assert call.eager_params is None and got == ["decode+merge", "merge"] * 4
    # Over the limit (the same values, a cache of 33 MiB of K and V): the rule's form eagerly too.
    tokens = (_call.EAGER_ONE_LAUNCH_BYTES // (2 * 64 * 2)) + 64
    big_k = k[:, :1].expand(1, tokens, 1, 64)
    got, call = calls(k=big_k, v=v[:, :1].expand(1, tokens, 1, 64))
    assert call.params["MERGE_KERNEL"] and call.eager_params is None and got == ["decode+merge", "merge"] * 4
