"""Every rejected input raises a clear error naming the argument, and leaves ``out`` untouched."""

import pytest
import torch

import leanattn

from _util import DEVICE, make_inputs


def good(**over):
    q, k, v, sl = make_inputs([20, 7], 4, 2, 64, torch.float16)
    args = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=sl)
    args.update(over)
    return args


def call(args, **kw):
    a = dict(args)
    return leanattn.decode(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("cache_seqlens"), **a, **kw)


BASE = good()
q, k, v, sl = BASE["q"], BASE["k_cache"], BASE["v_cache"], BASE["cache_seqlens"]

CASES = [
    ("rank", dict(q=q[:, 0]), ValueError, "q must be 4-D"),
    ("k rank", dict(k_cache=k[0]), ValueError, "k_cache must be 4-D"),
    ("q_len 0", dict(q=q[:, :0]), ValueError, "q_len 0 with a group of 2 gives 0"),
    ("q_len over the maximum", dict(q=q.expand(2, 65, 4, 64)), ValueError, "q_len 65 with a group of 2 gives 130"),
    ("fp8 q", dict(q=q.to(torch.float8_e4m3fn)), TypeError, "q must be float16 or bfloat16"),
    ("fp8 k, fp16 v", dict(k_cache=k.to(torch.float8_e4m3fn)), TypeError, "k_cache and v_cache must share one dtype"),
    ("batch", dict(k_cache=k[:1], v_cache=v[:1]), ValueError, "batch 2"),
    ("k/v shapes", dict(v_cache=v[:, :10]), ValueError, "same shape"),
    ("head_dim mismatch", dict(k_cache=k[..., :32], v_cache=v[..., :32]), ValueError, "head_dim 64"),
    ("heads not multiple", dict(q=torch.randn(2, 1, 5, 64, dtype=torch.float16, device=DEVICE)), ValueError, "multiple of kv_heads"),
    ("head_dim unsupported", dict(q=q[..., :48], k_cache=k[..., :48], v_cache=v[..., :48]), ValueError, "head_dim must be one of"),
    ("dtype fp32", dict(q=q.float()), TypeError, "float16 or bfloat16"),
    ("dtype mix", dict(k_cache=k.bfloat16(), v_cache=v.bfloat16()), TypeError, "share one dtype"),
    ("last stride", dict(k_cache=k.transpose(-1, -2).contiguous().transpose(-1, -2)), ValueError, "unit stride"),
    ("seqlens dtype", dict(cache_seqlens=sl.long()), TypeError, "cache_seqlens must be int32"),
    ("seqlens shape", dict(cache_seqlens=sl[:1]), ValueError, "cache_seqlens must have shape (2,)"),
    ("not a tensor", dict(q=q.tolist()), TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("name,over,exc,msg", CASES, ids=[c[0] for c in CASES])
def test_bad_inputs(name, over, exc, msg):
    out = torch.full_like(q, 7.0)
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        call(good(**over), out=out)
    assert (out == 7.0).all(), "out written although the input was rejected"


def test_bad_out():
    for bad, msg in ((torch.empty(2, 1, 4, 32, dtype=torch.float16, device=DEVICE), "out must be"),
                     (torch.empty_like(q, dtype=torch.bfloat16), "out must be"),
                     (torch.empty(2, 1, 64, 4, dtype=torch.float16, device=DEVICE).transpose(-1, -2), "unit stride")):
        with pytest.raises(ValueError, match=msg):
            call(BASE, out=bad)


def test_bad_num_programs_and_scale():
    with pytest.raises(ValueError, match="num_programs"):
        call(BASE, num_programs=0)
    with pytest.raises(ValueError, match="at most 2\\^22"):  # past it the merge's fp64 divisions may round
        call(BASE, num_programs=2**22 + 1)
    with pytest.raises(ValueError, match="softmax_scale"):
        call(BASE, softmax_scale=float("nan"))


def test_tensor_softmax_scale_is_refused():
    """A tensor scale would be read once and kept by the cached call: a later in-place change
    would be silently ignored, so it is refused (by decode, after a float call of the same layout
    too, by mla_decode and by the wrappers)."""
    call(BASE, softmax_scale=0.05)
    scale = torch.tensor(0.05)
    with pytest.raises(TypeError, match="softmax_scale must be a Python float"):
        call(BASE, softmax_scale=scale)
    with pytest.raises(TypeError, match="softmax_scale must be a Python float"):
        leanattn.DecodeWrapper(4, 2, 64, torch.float16, DEVICE, softmax_scale=scale)
    with pytest.raises(TypeError, match="softmax_scale must be a Python float"):
        leanattn.MLAWrapper(4, 80, 64, torch.bfloat16, DEVICE, softmax_scale=scale)
    q = torch.randn(1, 1, 4, 80, dtype=torch.bfloat16, device=DEVICE)
    kv = torch.randn(1, 32, 1, 80, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(TypeError, match="softmax_scale must be a Python float"):
        leanattn.mla_decode(q, kv, None, head_dim_v=64, softmax_scale=scale)


def test_mixed_devices():
    if DEVICE.type != "cuda":
        other = torch.device("meta")
    else:
        other = torch.device("cpu")
    with pytest.raises(ValueError, match="one device"):
        call(good(cache_seqlens=sl.to(other)))


def test_empty_batch():
    q0, k0, v0, sl0 = q[:0], k[:0], v[:0], sl[:0]
    out, lse = leanattn.decode(q0, k0, v0, sl0, return_lse=True)
    assert out.shape == q0.shape and lse.shape == (0, 4, 1)


@pytest.mark.parametrize("paged", [False, True])
def test_head_offsets_past_int32_are_refused(paged):
    """A kv head's offset is int32 in the kernel: a heads-outermost cache whose last head starts
    2^31 elements or more after the first is refused, naming the cache and its stride; one element
    less of stride passes the check (meta tensors: no memory)."""
    meta = torch.device("meta")
    q = torch.empty(2, 1, 8, 64, dtype=torch.float16, device=meta)
    heads = 4
    stride = -(-(2**31) // (heads - 1))  # the least with (heads - 1) * stride >= 2^31
    table = torch.zeros(2, 1, dtype=torch.int32, device=meta) if paged else None

    def cache(head_stride: int) -> torch.Tensor:
        shape = (2, 16, heads, 64)  # (batch or pages, cache_len or page_size, kv_heads, head_dim)
        return torch.empty_strided(shape, (16 * 64, 64, head_stride, 1), dtype=torch.float16, device=meta)

    wide, narrow = cache(stride), cache(stride - 1)
    with pytest.raises(ValueError, match=rf"k_cache.stride\(2\) = {stride} puts kv head {heads - 1} "):
        leanattn.decode(q, wide, narrow, block_table=table)
    with pytest.raises(ValueError, match=rf"v_cache.stride\(2\) = {stride} puts kv head {heads - 1} "):
        leanattn.decode(q, narrow, wide, block_table=table)
    from leanattn._testing import check_head_strides

    check_head_strides(narrow, narrow)


def test_tile_counts_past_int32_are_refused_everywhere():
    """The kernels count a call's tiles in int32: 256 kv heads over a block table of 2**21 pages
    of 256 tokens (2**37 head-tokens, over 2**31 tiles of any config's tile) is refused by
    decode, plan_decode and DecodeWrapper.plan, naming the product, and decode leaves out alone."""
    heads, page, pages = 256, 256, 2**21
    q = torch.randn(1, 1, heads, 64, dtype=torch.float16, device=DEVICE)
    kp = torch.randn(1, page, heads, 64, dtype=torch.float16, device=DEVICE)
    table = torch.zeros(1, pages, dtype=torch.int32, device=DEVICE)
    sl = torch.tensor([100], dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, 7.0)
    match = r"batch 1 x kv_heads 256 x capacity 536870912 is over 2\^31 tiles"
    with pytest.raises(ValueError, match=match):
        leanattn.decode(q, kp, kp, sl, block_table=table, out=out)
    assert (out == 7.0).all()
    with pytest.raises(ValueError, match=match):
        leanattn.plan_decode(sl, page * pages, q_heads=heads, kv_heads=heads, head_dim=64, kv_dtype=torch.float16,
                             paged=True)
    w = leanattn.DecodeWrapper(heads, heads, 64, torch.float16, DEVICE, paged=True)
    with pytest.raises(ValueError, match=match):
        w.plan(sl, page * pages)
