"""leanattn.merge_states against the float64 reference: parts, empty parts, dtypes, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import leanattn
from leanattn import reference

from _util import DEVICE, assert_close, make_inputs, reference as ref_decode

# The merged output is rounded to its dtype once; the LSE is fp32 arithmetic on fp32 inputs.
OUT_TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
INF = math.inf


def random_parts(parts: int, shape: tuple[int, int, int, int], dtype: torch.dtype, seed: int):
    """Outputs (B, T, H, D) and LSEs (B, H, T) spread over a wide range; part 0 of batch 0 and
    the last head of every part of batch 1 empty (-inf), their outputs NaN (never read)."""
    gen = torch.Generator().manual_seed(seed)
    b, t, h, d = shape
    outs = [torch.randn(shape, generator=gen).to(dtype).to(DEVICE) for _ in range(parts)]
    lses = [(torch.randn(b, h, t, generator=gen) * 20).to(DEVICE) for _ in range(parts)]
    lses[0][0] = -INF
    outs[0][0] = math.nan
    if b > 1:
        for o, s in zip(outs, lses):
            s[1, -1] = -INF
            o[1, :, -1] = math.nan
    return outs, lses


def check_against_reference(out, lse, outs, lses) -> None:
    ref, ref_lse = reference.merge_states([o.double() for o in outs], lses)
    assert out.dtype == outs[0].dtype and lse.dtype == torch.float32
    assert out.shape == outs[0].shape and lse.shape == lses[0].shape
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    err = ((out.double() - ref).abs() / ref.abs().clamp_min(1)).max().item()
    assert err <= OUT_TOL[out.dtype], f"output off by {err:.2e}"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
    lse_err = ((lse - ref_lse).abs() / ref_lse.abs().clamp_min(1))[~empty].max().item()
    assert lse_err <= 2e-6, f"LSE off by {lse_err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_matches_reference(parts, dtype):
    outs, lses = random_parts(parts, (3, 1, 8, 128), dtype, seed=parts)
    out, lse = leanattn.merge_states(outs, lses)
    check_against_reference(out, lse, outs, lses)
    # Rows with no mass in any part: zeros and -inf.
    assert torch.equal(out[1, :, -1], torch.zeros_like(out[1, :, -1]))
    assert torch.isneginf(lse[1, -1]).all()
    # Every call gives the same bits.
    again, again_lse = leanattn.merge_states(outs, lses)
    assert torch.equal(again, out) and torch.equal(again_lse, lse)


@pytest.mark.parametrize("shape", [(2, 3, 5, 80), (1, 1, 1, 64), (4, 2, 6, 256)])
def test_shapes_q_len_and_padded_head_dim(shape):
    outs, lses = random_parts(3, shape, torch.bfloat16, seed=7)
    check_against_reference(*leanattn.merge_states(outs, lses), outs, lses)


def test_many_parts():
    """More parts than the kernel unrolls (a loop over them instead)."""
    outs, lses = random_parts(11, (2, 1, 4, 64), torch.bfloat16, seed=9)
    check_against_reference(*leanattn.merge_states(outs, lses), outs, lses)


def test_one_part_is_itself():
    outs, lses = random_parts(1, (2, 1, 4, 64), torch.float32, seed=3)
    out, lse = leanattn.merge_states(outs, lses)
    live = torch.isfinite(lses[0])  # (B, H, T); the output is (B, T, H, D)
    assert torch.equal(out.transpose(1, 2)[live], outs[0].transpose(1, 2)[live])
    assert torch.equal(lse[live], lses[0][live])


def test_far_apart_lses_do_not_overflow():
    o = [torch.ones(1, 1, 2, 64, device=DEVICE), 2 * torch.ones(1, 1, 2, 64, device=DEVICE)]
    s = [torch.tensor([[[3000.0], [-3000.0]]], device=DEVICE), torch.tensor([[[2800.0], [-2999.0]]], device=DEVICE)]
    out, lse = leanattn.merge_states(o, s)
    check_against_reference(out, lse, o, s)
    assert torch.equal(out[0, 0, 0], o[0][0, 0, 0])  # exp(-200) vanishes in fp32


def test_stacked_views_equal_list():
    """A stacked input with strides (slices of a larger buffer) gives the list's bits."""
    outs, lses = random_parts(3, (2, 1, 4, 64), torch.float16, seed=5)
    big_o = torch.full((3, 2, 1, 6, 64), math.nan, dtype=torch.float16, device=DEVICE)
    big_o[:, :, :, 1:5] = torch.stack(outs)
    big_l = torch.full((3, 2, 4, 3), math.nan, device=DEVICE)
    big_l[:, :, :, 1] = torch.stack(lses)[..., 0]
    out, lse = leanattn.merge_states(big_o[:, :, :, 1:5], big_l[:, :, :, 1:2])
    want, want_lse = leanattn.merge_states(outs, lses)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    # Writing into given tensors, strided too.
    dest = torch.zeros(2, 1, 8, 64, dtype=torch.float16, device=DEVICE)
    dest_lse = torch.zeros(2, 4, 1, device=DEVICE)
    leanattn.merge_states(outs, lses, out=dest[:, :, ::2], out_lse=dest_lse)
    assert torch.equal(dest[:, :, ::2], want) and torch.equal(dest_lse, want_lse)
    assert torch.equal(dest[:, :, 1::2], torch.zeros_like(want))


@pytest.mark.parametrize("splits", [[0, 1, 40, 100], [0, 100, 100, 100], [0, 33, 66, 90, 100]])
def test_merging_decode_slices_is_exact(splits):
    """Attention over key slices, merged, equals attention over all keys (slices may be empty)."""
    lens = [100, 60, 0]
    q, k, v, sl = make_inputs(lens, 8, 2, 64, torch.bfloat16, cache_len=100, seed=11)
    outs, lses = [], []
    for lo, hi in zip(splits, splits[1:]):
        local = (sl - lo).clamp(0, hi - lo).to(torch.int32)
        o, s = leanattn.decode(q, k[:, lo:hi].contiguous(), v[:, lo:hi].contiguous(), local, return_lse=True)
        outs.append(o)
        lses.append(s)
    out, lse = leanattn.merge_states(outs, lses)
    assert_close(out, lse, *ref_decode(q, k, v, sl))


def _parts(n=2, shape=(2, 1, 4, 64), dtype=torch.float16):
    return [torch.zeros(shape, dtype=dtype, device=DEVICE) for _ in range(n)], [
        torch.zeros(shape[0], shape[2], shape[1], device=DEVICE) for _ in range(n)
    ]


def test_bad_inputs():
    outs, lses = _parts()
    with pytest.raises(ValueError, match="at least one part"):
        leanattn.merge_states([], [])
    with pytest.raises(ValueError, match="one entry per part"):
        leanattn.merge_states(outs, lses[:1])
    with pytest.raises(ValueError, match="shapes of part 0"):
        leanattn.merge_states([outs[0], outs[1][:1]], lses)
    with pytest.raises(ValueError, match=r"\(batch, q_heads, q_len\)"):
        leanattn.merge_states(outs, [s[..., 0] for s in lses])
    with pytest.raises(ValueError, match=r"lses must be \(parts, batch, q_heads, q_len\)"):
        leanattn.merge_states(torch.stack(outs), torch.stack(lses).transpose(2, 3))
    with pytest.raises(TypeError, match="float32"):
        leanattn.merge_states(outs, [s.half() for s in lses])
    with pytest.raises(TypeError, match="one dtype"):
        leanattn.merge_states([outs[0], outs[1].bfloat16()], lses)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        leanattn.merge_states([o.double() for o in outs], lses)
    with pytest.raises(TypeError, match="torch.Tensor"):
        leanattn.merge_states([outs[0], "x"], lses)
    with pytest.raises(TypeError, match="both"):
        leanattn.merge_states(torch.stack(outs), lses)
    with pytest.raises(ValueError, match="one device"):
        leanattn.merge_states(outs, [lses[0], lses[1].to("meta")])
    with pytest.raises(ValueError, match="out must be"):
        leanattn.merge_states(outs, lses, out=torch.empty(2, 1, 4, 32, device=DEVICE))
    with pytest.raises(ValueError, match="out_lse must be"):
        leanattn.merge_states(outs, lses, out_lse=torch.empty(2, 1, 4, device=DEVICE))
