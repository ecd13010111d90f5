"""Paged KV cache: shuffled pages, every page size, against the contiguous path and the reference."""

import pytest
import torch

import leanattn

from _util import DEVICE, ON_GPU, assert_close, make_inputs, poisoned_like, reference, tile_size, to_paged


@pytest.mark.parametrize("page_size", [1, 8, 16, 32, 64, 128, 256])
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
    bad_pages = torch.randn(4, 24, 2, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        leanattn.decode(q, bad_pages, bad_pages, sl, block_table=table)
    big_pages = torch.randn(2, 512, 2, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="power of two up to 256"):
        leanattn.decode(q, big_pages, big_pages, sl, block_table=table)
    other = torch.device("meta") if DEVICE.type != "cuda" else torch.device("cpu")
    with pytest.raises(ValueError, match="one device"):
        leanattn.decode(q, kp, vp, sl, block_table=table.to(other))
