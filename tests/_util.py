"""Shared helpers: random inputs, poisoned outputs, the float64 reference and error measures."""

from __future__ import annotations

import dataclasses
import math

import torch

import leanattn

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# Relative-error bounds against the float64 reference. The output is rounded to the input dtype
# once, and on the GPU the softmax weights meet V in that dtype: a few ulps of it.
TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
LSE_TOL = 1e-3


def merge_config(head_dim: int, dtype: torch.dtype, rows: int, merge_kernel: bool | None,
                 batch_invariant: bool = False) -> leanattn.KernelConfig:
    """The heuristic's config (of the default or the batch-invariant mode), with the cut heads
    merged by the last arrivers' ticket tree (False), by the merge kernel (True) or as the
    heuristic picks (None)."""
    return dataclasses.replace(leanattn.choose_config(head_dim, dtype, rows, batch_invariant=batch_invariant),
                               merge_kernel=merge_kernel)


def tile_size(head_dim: int = 128, dtype: torch.dtype = torch.float16, group: int = 1) -> int:
    return leanattn.choose_config(head_dim, dtype, group).tile


def make_inputs(
    lens: list[int],
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    *,
    cache_len: int | None = None,
    hf_layout: bool = False,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q (B,1,Hq,D), k/v (B,N,Hkv,D) and int32 lengths. ``hf_layout`` stores the cache as
    (B,Hkv,N,D) and returns its transpose, a strided view."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else torch.seed() % (2**31))
    batch = len(lens)
    n = cache_len if cache_len is not None else max(max(lens), 1)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    q = rnd(batch, 1, q_heads, head_dim)
    if hf_layout:
        k = rnd(batch, kv_heads, n, head_dim).transpose(1, 2)
        v = rnd(batch, kv_heads, n, head_dim).transpose(1, 2)
    else:
        k = rnd(batch, n, kv_heads, head_dim)
        v = rnd(batch, n, kv_heads, head_dim)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return q, k, v, seqlens


def poisoned_like(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, math.nan)


def reference(q, k, v, seqlens=None, **kw):
    """float64 reference output (not rounded to the input dtype) and float32 LSE."""
    return leanattn.reference.decode(q.double(), k.double(), v.double(), seqlens, return_lse=True, **kw)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(out: torch.Tensor, lse: torch.Tensor | None, ref: torch.Tensor, ref_lse: torch.Tensor) -> None:
    """Every element written and finite, relative error in bound, LSE equal (both -inf where empty)."""
    assert torch.isfinite(out).all(), "output has NaN/inf: unwritten or broken elements"
    err = rel_err(out, ref)
    assert err < TOL[out.dtype], f"relative error {err:.3e} over {TOL[out.dtype]:.1e}"
    if lse is not None:
        empty = torch.isinf(ref_lse)
        assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all(), "LSE -inf pattern differs"
        diff = (lse[~empty] - ref_lse[~empty]).abs()
        assert diff.numel() == 0 or diff.max().item() < LSE_TOL, f"LSE off by {diff.max().item():.3e}"


def to_paged(
    k: torch.Tensor, v: torch.Tensor, lens: list[int], page_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy a contiguous (B,N,Hkv,D) cache into shuffled pages (P,page,Hkv,D) with a block table
    (B, max_pages) whose unused entries hold garbage (out-of-range page numbers)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    batch, n = k.shape[:2]
    max_pages = -(-n // page_size)
    need = [-(-max(x, 0) // page_size) for x in lens]
    total = sum(need) + 3  # a few pages nobody owns
    perm = torch.randperm(total, generator=gen)
    table = torch.randint(10**6, 2 * 10**6, (batch, max_pages), generator=gen, dtype=torch.int32)
    kp = torch.randn(total, page_size, *k.shape[2:], generator=gen).to(k.dtype).to(k.device)
    vp = torch.randn(kp.shape, generator=gen).to(k.dtype).to(k.device)
    at = 0
    for b, pages in enumerate(need):
        for i in range(pages):
            page = int(perm[at])
            at += 1
            table[b, i] = page
            lo, hi = i * page_size, min((i + 1) * page_size, n)
            kp[page, : hi - lo] = k[b, lo:hi]
            vp[page, : hi - lo] = v[b, lo:hi]
    return kp, vp, table.to(k.device)
