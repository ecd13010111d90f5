"""Paged KV cache: shuffled pages, every page size (powers of two or not, smaller than a tile or
not dividing it), against the contiguous path and the reference."""

import pytest
import torch

import leanattn
from leanattn._testing import check_page_strides

from _util import DEVICE, ON_GPU, assert_close, make_inputs, poisoned_like, reference, tile_size, to_paged


# Interpreter tiles are 32 keys: 3 and 24 split them unevenly, 100 and 129 span several.
@pytest.mark.parametrize("page_size", [1, 3, 8, 16, 24, 32, 64, 100, 128, 129, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_matches_contiguous_and_reference(page_size, dtype):
    t = tile_size(64, dtype, 4)
    lens = [0, 1, t - 1, t + 1, 5 * t + 3] if not ON_GPU else [0, 1, 63, 65, 20000, 70001]
    q, k, v, sl = make_inputs(lens, 8, 2, 64, dtype)
    kp, vp, table = to_paged(k, v, lens, page_size)
    for programs in (3, 11):
        out = poisoned_like(q)
        _, lse = leanattn.decode(q, kp, vp, sl, block_table=table, return_lse=True, out=out, num_programs=programs)
        contiguous, c_lse = leanattn.decode(q, k, v, sl, return_lse=True, num_programs=programs)
        assert_close(out, lse, *reference(q, k, v, sl))
        # Same tiles, same partition, same arithmetic: the two paths agree bitwise.
        assert torch.equal(out, contiguous) and torch.equal(lse, c_lse)


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (10, 2), (8, 1)])
def test_paged_gqa_without_seqlens(q_heads, kv_heads):
    """No cache_seqlens: every sequence fills its block table's capacity."""
    ps = 16
    q, k, v, _ = make_inputs([3 * ps] * 2, q_heads, kv_heads, 128, torch.bfloat16)
    lens = [3 * ps] * 2
    kp, vp, table = to_paged(k, v, lens, ps)
    out = leanattn.decode(q, kp, vp, block_table=table, num_programs=4)
    ref, _ = reference(q, k, v)
    assert_close(out, None, ref, None)


def test_paged_bad_inputs():
    q, k, v, sl = make_inputs([20, 7], 4, 2, 64, torch.float16)
    kp, vp, table = to_paged(k, v, [20, 7], 16)
    cases = [
        (dict(block_table=table.long()), TypeError, "block_table must be int32"),
        (dict(block_table=table[:1]), ValueError, r"block_table must be \(batch=2"),
        (dict(block_table=table[0]), ValueError, r"block_table must be \(batch=2"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            leanattn.decode(q, kp, vp, sl, **kw)
    for size in (0, 257, 512):
        pages = torch.randn(4, size, 2, 64, dtype=torch.float16, device=DEVICE)
        with pytest.raises(ValueError, match=rf"page_size \(k_cache.shape\[1\]\) must be 1 to 256, got {size}"):
            leanattn.decode(q, pages, pages, sl, block_table=table)
    other = torch.device("meta") if DEVICE.type != "cuda" else torch.device("cpu")
    with pytest.raises(ValueError, match="one device"):
        leanattn.decode(q, kp, vp, sl, block_table=table.to(other))


def _queries(batch: int, q_len: int, q_heads: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, q_len, q_heads, 64, generator=gen).to(torch.float16).to(DEVICE)


@pytest.mark.parametrize("page_size", [3, 24, 100])
def test_odd_pages_with_query_tokens_window_and_leftpad(page_size):
    """Three query tokens of a group of 4, left padding and a sliding window (or none) on pages
    that split the tiles unevenly: the reference's output, bitwise the contiguous cache's with
    the same values on the same launch config (the heuristic deals paged caches smaller shares
    on the GPU), and bitwise ``DecodeWrapper(paged=True).run``'s."""
    t = tile_size(64, torch.float16, 12)
    lens = [0, 5, t + 7, 3 * t + 11]
    q, k, v, sl = make_inputs(lens, 8, 2, 64, torch.float16, cache_len=3 * t + 11, seed=page_size)
    q = _queries(len(lens), 3, 8, seed=page_size)
    pad = torch.tensor([0, 2, 9, t + 3], dtype=torch.int32, device=DEVICE)
    kp, vp, table = to_paged(k, v, lens, page_size, seed=page_size)
    for window in ((-1, -1), (t // 2 + 5, 0)):
        kw = dict(cache_leftpad=pad, window_size=window)
        out = poisoned_like(q)
        _, lse = leanattn.decode(q, kp, vp, sl, block_table=table, out=out, return_lse=True, num_programs=5, **kw)
        assert_close(out, lse, *reference(q, k, v, sl, **kw))
        paged_config = leanattn.choose_config(64, torch.float16, 12, paged=True)
        contiguous, c_lse = leanattn.decode(q, k, v, sl, return_lse=True, num_programs=5, config=paged_config, **kw)
        assert torch.equal(out, contiguous) and torch.equal(lse, c_lse)
        w = leanattn.DecodeWrapper(8, 2, 64, torch.float16, DEVICE, max_q_len=3, num_programs=5, paged=True)
        w.plan(sl, table.shape[1] * page_size, cache_leftpad=pad, q_len=3, window_size=window)
        w_out, w_lse = w.run(q, kp, vp, block_table=table, return_lse=True)
        assert torch.equal(w_out, out) and torch.equal(w_lse, lse)


@pytest.mark.parametrize("page_size", [5, 24, 100])
def test_odd_page_out_of_range_id_poisons_only_the_rows_that_attend_to_it(page_size):
    """Sequence 0 is one key past a page boundary, so its last slot holds the newest key alone.
    A bad id there makes NaN only the second of two causal query tokens (the first does not see
    that key); in slot 0, with a window of 20 that starts past slot 0, or left padding that skips
    it, it changes nothing; with left padding one short of skipping it, every row is NaN. The
    clean sequence 1 stays bitwise as it was."""
    n = page_size * (1 + -(-22 // page_size)) + 1  # slot 0 ends before the window of 20 starts
    lens = [n, n - 3]
    q, k, v, sl = make_inputs(lens, 8, 2, 64, torch.float16, cache_len=n, seed=page_size)
    q = _queries(2, 2, 8, seed=page_size + 1)
    kp, vp, table = to_paged(k, v, lens, page_size, seed=page_size)
    last = (n - 1) // page_size

    def call(slot: int, **kw):
        tab = table.clone()
        if slot >= 0:
            tab[0, slot] = kp.shape[0] + 2 if slot else -1
        out = poisoned_like(q)
        _, lse = leanattn.decode(q, kp, vp, sl, block_table=tab, out=out, return_lse=True, num_programs=3, **kw)
        return out, lse

    good_out, good_lse = call(-1)
    assert_close(good_out, good_lse, *reference(q, k, v, sl))
    out, lse = call(last)
    assert torch.isnan(out[0, 1]).all() and torch.isnan(lse[0, :, 1]).all()
    assert torch.equal(out[0, 0], good_out[0, 0]) and torch.equal(lse[0, :, 0], good_lse[0, :, 0])
    assert torch.equal(out[1], good_out[1]) and torch.equal(lse[1], good_lse[1])
    for kw in (dict(window_size=(20, 0)), dict(cache_leftpad=torch.tensor([page_size, 0], dtype=torch.int32,
                                                                            device=DEVICE))):
        good = call(-1, **kw)
        assert_close(*good, *reference(q, k, v, sl, **kw))
        bad = call(0, **kw)
        assert torch.equal(bad[0], good[0]) and torch.equal(bad[1], good[1])
    pad = torch.tensor([page_size - 1, 0], dtype=torch.int32, device=DEVICE)
    good_out, good_lse = call(-1, cache_leftpad=pad)  # the padding moves the shares: a baseline of its own
    out, lse = call(0, cache_leftpad=pad)
    assert torch.isnan(out[0]).all() and torch.isnan(lse[0]).all() and torch.isfinite(good_out[0]).all()
    assert torch.equal(out[1], good_out[1]) and torch.equal(lse[1], good_lse[1])


def test_page_row_stride_past_int32_is_refused():
    """A slot's offset within its page is int32 in the kernel: pages whose last slot starts 2^31
    elements or more into the page are refused, naming the cache and its stride; one element
    less of stride passes (meta tensors: no memory)."""
    meta = torch.device("meta")
    q = torch.empty(1, 1, 4, 64, dtype=torch.float16, device=meta)
    table = torch.zeros(1, 1, dtype=torch.int32, device=meta)
    for page_size in (3, 256):
        stride = -(-(2**31) // (page_size - 1))  # the least with (page_size - 1) * stride >= 2^31

        def pages(row_stride: int) -> torch.Tensor:
            return torch.empty_strided((2, page_size, 2, 64), (page_size * row_stride, row_stride, 64, 1),
                                       dtype=torch.float16, device=meta)

        wide, narrow = pages(stride), pages(stride - 1)
        with pytest.raises(ValueError, match=rf"k_cache.stride\(1\) = {stride} puts slot {page_size - 1} "):
            leanattn.decode(q, wide, narrow, block_table=table)
        with pytest.raises(ValueError, match=rf"v_cache.stride\(1\) = {stride} puts slot {page_size - 1} "):
            leanattn.decode(q, narrow, wide, block_table=table)
        check_page_strides(narrow, narrow)


def test_gpu_heuristic_deals_small_shares_to_paged_calls(monkeypatch):
    """On the GPU's heuristic, paged caches of 16-bit values at d=64-128 take shares of 2 tiles
    (contiguous ones 4) with the same tile, whatever the call's size (a plan's shares are the
    small config's); batch-invariant calls keep one config for both kinds, and fp8 keeps 4."""
    from leanattn.kernels import config as kernel_config

    monkeypatch.setattr(kernel_config, "interpreting", lambda: False)  # the GPU's heuristic, on any machine
    for d in (64, 80, 96, 128):
        for dtype in (torch.float16, torch.bfloat16):
            for large in (False, True):
                paged = kernel_config.choose_config(d, dtype, 4, True, large=large)
                contiguous = kernel_config.choose_config(d, dtype, 4, False, large=large)
                assert (paged.target_share, contiguous.target_share) == (2, 4) and paged.tile == contiguous.tile
            invariant = [kernel_config.choose_config(d, dtype, 4, paged, True) for paged in (True, False)]
            assert invariant[0] == invariant[1]
        fp8 = kernel_config.choose_config(d, torch.float8_e4m3fn, 4, True)
        assert fp8.target_share == 4


def test_block_table_of_more_than_2_31_positions():
    """A block table of 2**23 pages of 256 tokens holds 2**31 positions: a GPU launch then types
    the capacity as a 64-bit int (tests/test_wide_ints.py compiles every kernel so), and only the
    live pages are read (the rest of the table is out-of-range garbage). Few heads on a large
    capacity take the merge kernel on the GPU; decode with and without a plan."""
    page, lens = 256, [300, 37]
    q, k, v, sl = make_inputs(lens, 4, 1, 64, torch.float16, cache_len=512, seed=31)
    kp, vp, table = to_paged(k, v, lens, page, seed=31)
    wide = torch.full((2, 2**23), 10**6, dtype=torch.int32, device=DEVICE)  # 64 MiB
    wide[:, : table.shape[1]] = table
    want = reference(q, k, v, sl)
    out, lse = leanattn.decode(q, kp, vp, sl, block_table=wide, return_lse=True)
    assert_close(out, lse, *want)
    plan = leanattn.plan_decode(sl, 2**31, q_heads=4, kv_heads=1, head_dim=64, kv_dtype=torch.float16, paged=True)
    planned = leanattn.decode(q, kp, vp, sl, block_table=wide, plan=plan)
    assert torch.equal(planned, out)
