"""A split-KV Triton MLA decode, the kind serving engines carry (vLLM's and SGLang's Triton MLA
backends: query heads grouped per program, a fixed number of uniform splits per sequence, then a
separate reduce), written here from that description as a peer for ``benchmarks/mla.py``.

    out = split_mla_decode(q, kv_cache, seqlens, block_table, head_dim_v=512, softmax_scale=s)

q (batch, q_heads, head_dim) one query token per sequence; kv_cache pages (num_pages, page_size,
1, head_dim), 16-bit, V its first head_dim_v columns; seqlens int32 (batch,); block_table int32
(batch, max_pages). Stage 1 runs a program per (sequence, group of BLOCK_H heads, split): online
softmax over its split's keys, writing a normalised partial and its log-sum-exp. Stage 2 runs a
program per (sequence, head) and merges the splits. Two launches, a workspace of batch x heads x
splits x (head_dim_v + 1) floats.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _split_stage(
    Q, KV, Table, SeqLens, MidO, MidL, stride_qb, stride_qh, stride_kp, stride_ks, stride_tb, stride_mb, stride_mh,
    stride_ms, q_heads, scale,
    DV: tl.constexpr, DR: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, DOT: tl.constexpr,
):
    b = tl.program_id(0)
    hb = tl.program_id(1)
    sp = tl.program_id(2)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    live_h = heads < q_heads
    offs_v = tl.arange(0, DV)
    offs_r = tl.arange(0, DR)
    q_base = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    q_l = tl.load(q_base + offs_v[None, :], mask=live_h[:, None], other=0.0).to(DOT)
    q_r = tl.load(q_base + DV + offs_r[None, :], mask=live_h[:, None], other=0.0).to(DOT)
    n = tl.load(SeqLens + b)
    per = tl.cdiv(n, SPLITS)
    lo = sp * per
    hi = tl.minimum(lo + per, n)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, DV), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        tok = start + tl.arange(0, BLOCK_N)
        ok = tok < hi
        page = tl.load(Table + b.to(tl.int64) * stride_tb + tok // PAGE, mask=ok, other=0)
        rows = page.to(tl.int64) * stride_kp + (tok % PAGE) * stride_ks
        kv = tl.load(KV + rows[:, None] + offs_v[None, :], mask=ok[:, None], other=0.0).to(DOT)
        kr = tl.load(KV + rows[:, None] + DV + offs_r[None, :], mask=ok[:, None], other=0.0).to(DOT)
        s = (tl.dot(q_l, tl.trans(kv)) + tl.dot(q_r, tl.trans(kr))) * scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), kv)
        m_i = m_new
    out = b.to(tl.int64) * stride_mb + heads * stride_mh + sp * stride_ms
    has = l_i > 0
    tl.store(MidO + out[:, None] + offs_v[None, :], acc / tl.where(has, l_i, 1.0)[:, None], mask=live_h[:, None])
    # Each partial's log2-sum-exp sits in its row's last column.
    tl.store(MidL + out + DV, tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf")), mask=live_h)


@triton.jit
def _reduce_stage(MidO, MidL, Out, stride_mb, stride_mh, stride_ms, stride_ob, stride_oh,
                  DV: tl.constexpr, SPLITS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_v = tl.arange(0, DV)
    base = b.to(tl.int64) * stride_mb + h * stride_mh
    m = float("-inf")
    total = 0.0
    acc = tl.zeros((DV,), tl.float32)
    for sp in range(SPLITS):
        lse = tl.load(MidL + base + sp * stride_ms + DV)
        if lse > float("-inf"):
            o = tl.load(MidO + base + sp * stride_ms + offs_v)
            m_new = tl.maximum(m, lse)
            scale_old = tl.exp2(m - m_new)
            w = tl.exp2(lse - m_new)
            acc = acc * scale_old + o * w
            total = total * scale_old + w
            m = m_new
    tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_v,
             (acc / tl.where(total > 0, total, 1.0)).to(Out.dtype.element_ty))


def split_mla_decode(
    q: torch.Tensor, kv_cache: torch.Tensor, seqlens: torch.Tensor, block_table: torch.Tensor, *,
    head_dim_v: int = 512, softmax_scale: float, splits: int = 8, block_h: int = 16, block_n: int = 32,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """(batch, q_heads, head_dim_v) in q's dtype; see the module docstring. ``workspace``: float32
    of at least batch x q_heads x splits x (head_dim_v + 1) elements (made when None)."""
    batch, q_heads, head_dim = q.shape
    dv, dr = head_dim_v, head_dim - head_dim_v
    need = batch * q_heads * splits * (dv + 1)
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.float32, device=q.device)
    mid = workspace[:need].view(batch, q_heads, splits, dv + 1)
    out = torch.empty(batch, q_heads, dv, dtype=q.dtype, device=q.device)
    interp = q.device.type == "cpu"
    dot = tl.float32 if interp else (tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16)
    grid = (batch, triton.cdiv(q_heads, block_h), splits)
    _split_stage[grid](
        q, kv_cache, block_table, seqlens, mid, mid, q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1),
        block_table.stride(0), mid.stride(0), mid.stride(1), mid.stride(2), q_heads, softmax_scale * LOG2E,
        DV=dv, DR=dr, PAGE=kv_cache.shape[1], BLOCK_H=block_h, BLOCK_N=block_n, SPLITS=splits, DOT=dot,
        num_warps=4, num_stages=2,
    )
    _reduce_stage[(batch, q_heads)](mid, mid, out, mid.stride(0), mid.stride(1), mid.stride(2), out.stride(0),
                                    out.stride(1), DV=dv, SPLITS=splits, num_warps=4)
    return out
