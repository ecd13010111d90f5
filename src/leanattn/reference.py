"""Plain PyTorch decode attention, computed in float64 (or float32) for checking the kernel."""

from __future__ import annotations

import math

import torch

__all__ = ["decode", "gather_paged", "merge_states"]


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Gather a contiguous (length, kv_heads, head_dim) view of one sequence from a paged cache.

    Args:
        cache: (num_pages, page_size, kv_heads, head_dim).
        block_table: (max_pages,) page indices of this sequence.
        length: live tokens to gather.
    """
    page_size = cache.shape[1]
    pages = -(-length // page_size)
    idx = block_table[:pages].long()
    return cache[idx].reshape(-1, *cache.shape[2:])[:length]


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | None = None,
    *,
    block_table: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact decode attention, one sequence at a time, in ``compute_dtype``.

    Same arguments and meaning as :func:`leanattn.decode`: q (batch, q_len, q_heads, head_dim);
    k_cache, v_cache (batch, cache_len, kv_heads, head_dim), or (num_pages, page_size, kv_heads,
    head_dim) with ``block_table`` (batch, max_pages); the keys of sequence b are cache positions
    ``[cache_leftpad[b], cache_seqlens[b])``, clamped as there, and its queries the last q_len of
    them. Returns q's shape in q's dtype and, with ``return_lse``, the natural-log LSE as float32
    (batch, q_heads, q_len). A query that sees no key gives zeros and LSE ``-inf`` (the sink's
    logit with sinks).
    """
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    if block_table is None:
        capacity = k_cache.shape[1]
    else:
        capacity = block_table.shape[1] * k_cache.shape[1]
    firsts = [0] * batch if cache_leftpad is None else [min(max(int(n), 0), capacity) for n in cache_leftpad.tolist()]
    ends = [capacity] * batch if cache_seqlens is None else [int(n) for n in cache_seqlens.tolist()]
    ends = [min(max(e, f), capacity) for e, f in zip(ends, firsts)]
    left, right = window_size
    right = 0 if causal else right

    def per_head(x: float | torch.Tensor | None) -> torch.Tensor:
        x = 1.0 if x is None else x
        t = x if isinstance(x, torch.Tensor) else torch.tensor([float(x)] * kv_heads)
        return t.to(device=q.device, dtype=compute_dtype).view(kv_heads, 1, 1)

    ks, vs = per_head(k_scale), per_head(v_scale)
    o = torch.zeros(batch, q_len, q_heads, head_dim, dtype=compute_dtype, device=q.device)
    lse = torch.full((batch, q_heads, q_len), -math.inf, dtype=torch.float32, device=q.device)
    for b, (first, end) in enumerate(zip(firsts, ends)):
        n = end - first
        if block_table is None:
            k, v = k_cache[b, first:end], v_cache[b, first:end]
        else:
            k = gather_paged(k_cache, block_table[b], end)[first:]
            v = gather_paged(v_cache, block_table[b], end)[first:]
        # (kv_heads, group * q_len, head_dim) @ (kv_heads, head_dim, n) -> (kv_heads, group * q_len, n)
        qb = q[b].to(compute_dtype).view(q_len, kv_heads, group, head_dim).permute(1, 2, 0, 3)
        qb = qb.reshape(kv_heads, group * q_len, head_dim)
        kb = (k.to(compute_dtype).permute(1, 2, 0)) * ks
        vb = (v.to(compute_dtype).permute(1, 0, 2)) * vs
        s = (qb @ kb) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        query = torch.arange(q_len, device=q.device).repeat(group) + n - q_len  # row (g, i) -> position
        key = torch.arange(n, device=q.device)
        keep = torch.ones(group * q_len, n, dtype=torch.bool, device=q.device)
        if right >= 0:
            keep &= key[None, :] <= query[:, None] + right
        if left >= 0:
            keep &= key[None, :] >= query[:, None] - left
        s = s.masked_fill(~keep, -math.inf)
        if sinks is not None:
            sink = sinks.to(compute_dtype).view(kv_heads, group, 1).expand(kv_heads, group, q_len)
            s = torch.cat([s, sink.reshape(kv_heads, group * q_len, 1)], dim=-1)
            vb = torch.cat([vb, vb.new_zeros(kv_heads, 1, head_dim)], dim=1)
        lse_b = torch.logsumexp(s, dim=-1)  # (kv_heads, group * q_len)
        p = torch.exp(s - lse_b[..., None]).nan_to_num(0.0)  # rows with no key: exp(-inf + inf)
        ob = (p @ vb).view(kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3)
        o[b] = ob.reshape(q_len, q_heads, head_dim)
        lse[b] = lse_b.view(q_heads, q_len).float()
    result = o.to(q.dtype)
    if out is not None:
        out.copy_(result)
        result = out
    return (result, lse) if return_lse else result


def merge_states(
    outs: list[torch.Tensor] | torch.Tensor,
    lses: list[torch.Tensor] | torch.Tensor,
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of partial attention results, in ``compute_dtype``.

    Same shapes and meaning as :func:`leanattn.merge_states`: ``outs`` a list of
    (batch, q_len, q_heads, head_dim) or a stacked (parts, ...) tensor, ``lses`` the matching
    natural-log LSEs (batch, q_heads, q_len) or stacked. Returns the merged output in the parts'
    dtype and its LSE as float32 (batch, q_heads, q_len); rows with no mass give zeros and -inf.
    """
    o = torch.stack(list(outs)) if not isinstance(outs, torch.Tensor) else outs
    s = torch.stack(list(lses)) if not isinstance(lses, torch.Tensor) else lses
    s = s.to(compute_dtype).permute(0, 1, 3, 2)  # (parts, batch, q_len, q_heads), like o
    lse = torch.logsumexp(s, dim=0)  # -inf where every part is -inf
    # exp(-inf - -inf) is NaN: a row with no mass weighs every part 0.
    w = torch.where(torch.isinf(lse), torch.zeros_like(s), torch.exp(s - lse))
    # An empty part's output may hold anything: it is never read, not even multiplied by 0.
    parts = torch.where(w[..., None] > 0, o.to(compute_dtype), torch.zeros((), dtype=compute_dtype, device=o.device))
    merged = (w[..., None] * parts).sum(dim=0)
    return merged.to(o.dtype), lse.permute(0, 2, 1).float()
