"""Head dims 32, 192 and 512 (and 96, padded like 80) through every entry point, for 16-bit and fp8
caches, against the float64 reference; the per-head-dim row limit and its errors; the launch
heuristic's shared-memory arithmetic."""

from __future__ import annotations

import pytest
import torch

import leanattn
from leanattn.kernels import config as kernel_config

from _util import DEVICE, assert_close, make_inputs, poisoned_like, reference, tile_size, to_paged

NEW_DIMS = [32, 96, 192, 512]
CACHES = {"bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def inputs(head_dim: int, cache: str, lens: list[int], q_len: int = 2, q_heads: int = 4, kv_heads: int = 2,
           seed: int = 0) -> tuple[torch.Tensor, ...]:
    """bf16 q (batch, q_len, q_heads, head_dim), the cache in ``cache``'s dtype, int32 lengths."""
    _, k, v, sl = make_inputs(lens, q_heads, kv_heads, head_dim, torch.bfloat16, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(lens), q_len, q_heads, head_dim, generator=gen).to(torch.bfloat16).to(DEVICE)
    return q, k.to(CACHES[cache]), v.to(CACHES[cache]), sl


def scales(cache: str) -> dict:
    """Per-kv-head dequantisation scales for an fp8 cache (kv_heads 2), nothing for bf16."""
    if cache == "bf16":
        return {}
    return dict(k_scale=torch.tensor([1.5, 0.5], device=DEVICE), v_scale=torch.tensor([0.25, 2.0], device=DEVICE))


@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("head_dim", NEW_DIMS)
def test_two_query_tokens_group_of_two(head_dim, cache):
    """q_len 2, group 2: empty, shorter-than-q_len and multi-tile sequences, heads split over
    programs (5 programs), causal; fp8 with per-head scales."""
    t = tile_size(head_dim, CACHES[cache], 4)
    lens = [0, 1, t + 5, 2 * t + 3]
    q, k, v, sl = inputs(head_dim, cache, lens)
    out = poisoned_like(q)
    _, lse = leanattn.decode(q, k, v, sl, out=out, return_lse=True, num_programs=5, **scales(cache))
    assert_close(out, lse, *reference(q, k, v, sl, **scales(cache)))
    assert torch.isneginf(lse[0]).all() and torch.isneginf(lse[1, :, 0]).all()  # empty; one key, first query


@pytest.mark.parametrize("cache", ["bf16", "e4m3"])
@pytest.mark.parametrize("head_dim", [32, 192, 512])
def test_paged_cache(head_dim, cache):
    """Pages of 16 tokens, shuffled, with garbage ids in the unused slots; a window."""
    t = tile_size(head_dim, CACHES[cache], 4)
    lens = [t + 9, 17, 2 * t]
    q, k, v, sl = inputs(head_dim, cache, lens, seed=3)
    kp, vp, table = to_paged(k, v, lens, 16, seed=4)
    kw = dict(window_size=(t, -1), **scales(cache))
    out, lse = leanattn.decode(q, kp, vp, sl, block_table=table, return_lse=True, num_programs=4, **kw)
    assert_close(out, lse, *reference(q, k, v, sl, **kw))


@pytest.mark.parametrize("cache", ["bf16", "e4m3"])
@pytest.mark.parametrize("head_dim", [32, 192, 512])
def test_wrapper_and_plan_decode(head_dim, cache):
    """DecodeWrapper.plan/run and decode(plan=plan_decode(...)) give decode's bits, and the
    reference's values."""
    kv_dtype = CACHES[cache]
    t = tile_size(head_dim, kv_dtype, 4)
    lens, cap = [2 * t + 1, 0, t - 1], 2 * t + 1
    q, k, v, sl = inputs(head_dim, cache, lens, seed=5)
    w = leanattn.DecodeWrapper(4, 2, head_dim, torch.bfloat16, DEVICE, kv_dtype=kv_dtype, max_q_len=2, num_programs=3)
    w.plan(sl, cap, q_len=2)
    out = w.run(q, k, v, **scales(cache))
    plan = leanattn.plan_decode(sl, cap, q_heads=4, kv_heads=2, head_dim=head_dim, kv_dtype=kv_dtype, q_len=2,
                                num_programs=3)
    assert torch.equal(out, leanattn.decode(q, k, v, sl, plan=plan, **scales(cache)))
    direct, lse = leanattn.decode(q, k, v, sl, num_programs=3, return_lse=True, **scales(cache))
    assert torch.equal(out, direct)
    assert_close(out, lse, *reference(q, k, v, sl, **scales(cache)))


def test_custom_op_at_512_with_fp8():
    """The custom op (what torch.compile calls) with an fp8 cache and float scales."""
    q, k, v, sl = inputs(512, "e4m3", [40, 7], q_len=1, seed=6)
    out = poisoned_like(q)
    lse = torch.empty(2, 4, 1, dtype=torch.float32, device=DEVICE)
    torch.ops.leanattn.decode_into(q, k, v, out, lse, sl, None, 512**-0.5, 3, k_scale_value=0.5, v_scale_value=2.0)
    assert_close(out, lse, *reference(q, k, v, sl, k_scale=0.5, v_scale=2.0))


def test_sixteen_rows_at_512():
    """The row limit at d=512, on the accepted side: one token of a group of 16, and 8 tokens
    of a group of 2."""
    for q_len, q_heads, kv_heads in ((1, 16, 1), (8, 4, 2)):
        q, k, v, sl = inputs(512, "bf16", [35, 9], q_len=q_len, q_heads=q_heads, kv_heads=kv_heads, seed=7)
        out, lse = leanattn.decode(q, k, v, sl, return_lse=True, num_programs=3)
        assert_close(out, lse, *reference(q, k, v, sl))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_merge_states_at_512(dtype):
    """Attention over a cache split in two parts, merged, equals attention over the whole cache;
    and merge_states of random parts at 512 matches the reference merge."""
    q, k, v, sl = inputs(512, "bf16", [50, 50], q_len=1, seed=8)
    cut = 21
    parts = [leanattn.decode(q, k[:, :cut], v[:, :cut], return_lse=True),
             leanattn.decode(q, k[:, cut:], v[:, cut:], return_lse=True)]
    out, lse = leanattn.merge_states([o.to(dtype) for o, _ in parts], [s for _, s in parts])
    ref, ref_lse = reference(q, k, v, sl)
    assert out.dtype == dtype
    assert_close(out.to(torch.bfloat16), lse, ref, ref_lse)
    gen = torch.Generator().manual_seed(9)
    outs = [torch.randn(2, 2, 3, 512, generator=gen).to(dtype).to(DEVICE) for _ in range(3)]
    lses = [(torch.randn(2, 3, 2, generator=gen) * 10).to(DEVICE) for _ in range(3)]
    got, got_lse = leanattn.merge_states(outs, lses)
    want, want_lse = leanattn.reference.merge_states([o.double() for o in outs], lses)
    assert ((got.double() - want).abs() / want.abs().clamp_min(1)).max().item() <= {torch.float32: 2e-6}.get(dtype, 8e-3)
    assert ((got_lse - want_lse).abs() / want_lse.abs().clamp_min(1)).max().item() <= 2e-6


@pytest.mark.parametrize("head_dim", [16, 48, 200, 1024])
def test_unsupported_head_dims_are_refused(head_dim):
    q, k, v, sl = make_inputs([5], 4, 2, head_dim, torch.bfloat16)
    dims = r"\(32, 64, 80, 96, 128, 192, 256, 512\)"
    with pytest.raises(ValueError, match=f"head_dim must be one of {dims}, got {head_dim}"):
        leanattn.decode(q, k, v, sl)
    with pytest.raises(ValueError, match=f"head_dim must be one of {dims}"):
        leanattn.DecodeWrapper(4, 2, head_dim, torch.bfloat16, DEVICE)
    with pytest.raises(ValueError, match=f"head_dim must be one of {dims}"):
        leanattn.plan_decode(sl, 5, q_heads=4, kv_heads=2, head_dim=head_dim)


def test_row_limit_by_head_dim():
    """16 query rows a kv head at d=512, 128 elsewhere; over it, every entry point names the limit,
    the head dim and the rows asked for."""
    assert leanattn.max_query_rows(512) == 16
    assert all(leanattn.max_query_rows(d) == leanattn.MAX_QUERY_ROWS == 128 for d in leanattn.SUPPORTED_HEAD_DIMS[:-1])
    msg = r"q_len x \(q_heads / kv_heads\) must be in \[1, 16\] at head_dim 512 .*q_len 2 with a group of 16 gives 32"
    q, k, v, sl = inputs(512, "bf16", [5], q_len=2, q_heads=16, kv_heads=1)
    with pytest.raises(ValueError, match=msg):
        leanattn.decode(q, k, v, sl)
    with pytest.raises(ValueError, match=msg):
        leanattn.DecodeWrapper(16, 1, 512, torch.bfloat16, DEVICE, max_q_len=2)
    with pytest.raises(ValueError, match=msg):
        leanattn.plan_decode(sl, 5, q_heads=16, kv_heads=1, head_dim=512, q_len=2)
    with pytest.raises(ValueError, match=r"must be in \[1, 16\] at head_dim 512 .*: q_len 1 with a group of 32"):
        leanattn.DecodeWrapper(32, 1, 512, torch.bfloat16, DEVICE, kv_dtype=torch.float8_e4m3fn)
    # The other head dims keep 128 rows, without the head-dim clause.
    leanattn.DecodeWrapper(128, 8, 256, torch.bfloat16, DEVICE, max_q_len=8)
    with pytest.raises(ValueError, match=r"must be in \[1, 128\]: q_len 9 with a group of 16 gives 144"):
        leanattn.DecodeWrapper(128, 8, 256, torch.bfloat16, DEVICE, max_q_len=9)


def _stage_bytes(cfg: kernel_config.KernelConfig, head_dim: int, itemsize: int) -> int:
    """Bytes of one K/V pipeline stage: a K and a V tile, the head dim padded."""
    return 2 * cfg.tile * kernel_config.next_pow2(head_dim) * itemsize


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_gpu_configs_fit_shared_memory(monkeypatch, kv_dtype):
    """On the GPU path of the heuristic, every head dim and row count the checks accept gets a
    config whose program fits 227 KiB (and the programs of an SM 228 KiB) with num_stages whole
    K/V stages and q's dot operand (its padded rows x padded head dim, 16-bit) in shared memory
    (d=192 at 128 rows asked for 256 KiB with 3 stages and failed to compile on an H200); at
    d=512 also with fp8 tiles counted at 2 bytes."""
    monkeypatch.setattr(kernel_config, "_INTERPRET", False)
    for head_dim in leanattn.SUPPORTED_HEAD_DIMS:
        most = leanattn.max_query_rows(head_dim)
        for rows in sorted({r for r in (1, 8, 16, 32, 33, 64, most) if r <= most}):
            cfg = kernel_config.choose_config(head_dim, kv_dtype, rows)
            q_bytes = max(16, kernel_config.next_pow2(rows)) * kernel_config.next_pow2(head_dim) * 2
            one = cfg.num_stages * _stage_bytes(cfg, head_dim, kv_dtype.itemsize) + q_bytes
            assert one <= 227 * 1024 and one * cfg.programs_per_sm <= 228 * 1024, (head_dim, rows, cfg, one)
    cfg = kernel_config.choose_config(512, kv_dtype, 16)
    assert (cfg.tile, cfg.num_warps, cfg.num_stages, cfg.programs_per_sm) == (32, 8, 3, 1)
    assert cfg.num_stages * _stage_bytes(cfg, 512, 2) + 16 * 512 * 2 <= 227 * 1024
    # d=32 16-bit tiles hold the bytes of d=64's; the other head dims keep their configs.
    want = {32: 128, 64: 64 if kv_dtype.itemsize == 2 else 128, 192: 64, 256: 64}
    assert {d: kernel_config.choose_config(d, kv_dtype, 4).tile for d in want} == want
