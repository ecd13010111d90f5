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
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact decode attention, one sequence at a time, in ``compute_dtype``.

    Same shapes and meaning as :func:`leanattn.decode`:
    q (batch, 1, q_heads, head_dim); k_cache, v_cache (batch, cache_len, kv_heads, head_dim), or
    (num_pages, page_size, kv_heads, head_dim) with ``block_table`` (batch, max_pages); the keys
    of sequence b are cache positions ``[cache_leftpad[b], cache_seqlens[b])``, clamped as there;
    returns (batch, 1, q_heads, head_dim) in q's dtype and, with ``return_lse``, the natural-log
    LSE as float32 (batch, q_heads). A sequence of length 0 gives zeros and LSE ``-inf``.
    """
    batch, _, q_heads, head_dim = q.shape
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
    o = torch.zeros(batch, q_heads, head_dim, dtype=compute_dtype, device=q.device)
    lse = torch.full((batch, q_heads), -math.inf, dtype=torch.float32, device=q.device)
    for b, (first, end) in enumerate(zip(firsts, ends)):
        if end == first:
            continue
        if block_table is None:
            k, v = k_cache[b, first:end], v_cache[b, first:end]
        else:
            k = gather_paged(k_cache, block_table[b], end)[first:]
            v = gather_paged(v_cache, block_table[b], end)[first:]
        # (kv_heads, group, head_dim) @ (kv_heads, head_dim, n) -> (kv_heads, group, n)
        qb = q[b, 0].to(compute_dtype).view(kv_heads, group, head_dim)
        kb = k.to(compute_dtype).permute(1, 2, 0)
        vb = v.to(compute_dtype).permute(1, 0, 2)
        s = (qb @ kb) * scale
        lse_b = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse_b[..., None])
        o[b] = (p @ vb).reshape(q_heads, head_dim)
        lse[b] = lse_b.reshape(q_heads).float()
    result = o.to(q.dtype).unsqueeze(1)
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
