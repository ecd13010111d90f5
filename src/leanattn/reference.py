"""Plain PyTorch decode attention, computed in float64 (or float32) for checking the kernel."""

from __future__ import annotations

import math

import torch

__all__ = ["decode", "gather_paged", "merge_states", "mla_decode"]


def gather_paged(
    cache: torch.Tensor, block_table: torch.Tensor, end: int, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``[start, end)`` of one sequence of a paged cache, contiguous.

    Args:
        cache: (num_pages, page_size, kv_heads, head_dim).
        block_table: (max_pages,) page indices of this sequence.
        end, start: the positions to gather.

    Returns:
        (end - start, kv_heads, head_dim), and a bool (end - start,) that marks positions on a
        page outside [0, num_pages) (gathered as zeros).
    """
    num_pages, page_size = cache.shape[:2]
    pos = torch.arange(start, end, device=block_table.device)
    page = block_table[pos // page_size].long()
    bad = (page < 0) | (page >= num_pages)
    rows = cache[page.clamp(0, max(num_pages - 1, 0)), (pos % page_size).to(cache.device)]
    return torch.where(bad.to(cache.device)[:, None, None], torch.zeros((), dtype=cache.dtype), rows), bad


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

    An fp8 cache's ``k_scale`` and ``v_scale`` (a float, or float32 (kv_heads,), (batch,
    kv_heads), or per token shaped like the cache without head_dim) multiply the scores and the
    output: a per-token k_scale each key's score column, a per-token v_scale each key's weight in
    the weighted sum of values (not in the softmax's sum).
    """
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads, head_dim_v = k_cache.shape[2], v_cache.shape[3]  # V may be narrower (MLA)
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
    # A side wider than the cache bounds nothing: as -1, without the position arithmetic
    # overflowing for huge values (INT_MAX is a common spelling of "unbounded").
    left = -1 if left > capacity else left
    right = -1 if right > capacity else right

    def per_head(x: float | torch.Tensor | None, b: int) -> torch.Tensor:
        """Sequence b's multiplier of each kv head's scores or output, (kv_heads, 1, 1)."""
        x = 1.0 if x is None else x
        if not isinstance(x, torch.Tensor):
            t = torch.tensor([float(x)] * kv_heads)
        elif x.dim() == 1:
            t = x
        elif x.dim() == 2:
            t = x[b]
        else:  # per token: per_key's
            t = torch.ones(kv_heads)
        return t.to(device=q.device, dtype=compute_dtype).view(kv_heads, 1, 1)

    def per_key(x: float | torch.Tensor | None, b: int, start: int, end: int) -> torch.Tensor | None:
        """The per-token scales of sequence b's cache positions [start, end), (kv_heads, 1,
        end - start) (zeros on pages outside the cache, like the keys); None for other kinds."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            return None
        t = x[b, start:end] if block_table is None else gather_paged(x[..., None], block_table[b], end, start)[0][..., 0]
        return t.to(device=q.device, dtype=compute_dtype).permute(1, 0)[:, None, :]

    o = torch.zeros(batch, q_len, q_heads, head_dim_v, dtype=compute_dtype, device=q.device)
    lse = torch.full((batch, q_heads, q_len), -math.inf, dtype=torch.float32, device=q.device)
    for b, (first, end) in enumerate(zip(firsts, ends)):
        n = end - first
        # Keys before every query's window are not part of the attention, whatever they hold.
        lo = min(max(n - q_len - left, 0), n) if left >= 0 else 0
        if block_table is None:
            k, v = k_cache[b, first + lo : end], v_cache[b, first + lo : end]
            bad = torch.zeros(n - lo, dtype=torch.bool, device=q.device)
        else:
            k, bad = gather_paged(k_cache, block_table[b], end, first + lo)
            v, _ = gather_paged(v_cache, block_table[b], end, first + lo)
        # (kv_heads, group * q_len, head_dim) @ (kv_heads, head_dim, n) -> (kv_heads, group * q_len, n)
        qb = q[b].to(compute_dtype).view(q_len, kv_heads, group, head_dim).permute(1, 2, 0, 3)
        qb = qb.reshape(kv_heads, group * q_len, head_dim)
        kb = k.to(compute_dtype).permute(1, 2, 0)
        vb = v.to(compute_dtype).permute(1, 0, 2)
        # The scales multiply the scores and the output, not the cache, as in the kernel: the same
        # numbers for finite scales, and the same NaN and inf for the others.
        s = (qb @ kb) * (scale * per_head(k_scale, b))
        ks_key, vs_key = per_key(k_scale, b, first + lo, end), per_key(v_scale, b, first + lo, end)
        if ks_key is not None:
            s = s * ks_key
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        query = torch.arange(q_len, device=q.device).repeat(group) + n - q_len  # row (g, i) -> position
        key = torch.arange(lo, n, device=q.device)
        keep = torch.ones(group * q_len, n - lo, dtype=torch.bool, device=q.device)
        if right >= 0:
            keep &= key[None, :] <= query[:, None] + right
        if left >= 0:
            keep &= key[None, :] >= query[:, None] - left
        s = s.masked_fill(~keep, -math.inf)
        # A key on a page outside the cache poisons exactly the rows that see it.
        s = s.masked_fill(keep & bad[None, :], math.nan)
        if sinks is not None:
            sink = sinks.to(compute_dtype).view(kv_heads, group, 1).expand(kv_heads, group, q_len)
            s = torch.cat([s, sink.reshape(kv_heads, group * q_len, 1)], dim=-1)
            vb = torch.cat([vb, vb.new_zeros(kv_heads, 1, head_dim_v)], dim=1)
        lse_b = torch.logsumexp(s, dim=-1)  # (kv_heads, group * q_len)
        # A row that sees no key (LSE -inf) gets zeros; NaN and +inf stay visible: a NaN or +inf
        # score makes the row's weights, output and LSE NaN.
        p = torch.where(lse_b[..., None] == -math.inf, 0.0, torch.exp(s - lse_b[..., None]))
        lse_b = torch.where(torch.isnan(p).any(dim=-1), math.nan, lse_b)
        if vs_key is not None:
            # A per-token v_scale weighs each value (the sink's column carries none): a NaN one
            # reaches every row that reads its key, as a NaN in V does (a weight of 0 times NaN).
            if sinks is not None:
                vs_key = torch.cat([vs_key, vs_key.new_ones(kv_heads, 1, 1)], dim=-1)
            pv = (p * vs_key) @ vb
        else:
            pv = p @ vb
        # An empty row: zeros, whatever the scales are.
        ob = torch.where(lse_b[..., None] == -math.inf, 0.0, pv * per_head(v_scale, b))
        ob = ob.view(kv_heads, group, q_len, head_dim_v).permute(2, 0, 1, 3)
        o[b] = ob.reshape(q_len, q_heads, head_dim_v)
        lse[b] = lse_b.view(q_heads, q_len).float()
    result = o.to(q.dtype)
    if out is not None:
        out.copy_(result)
        result = out
    return (result, lse) if return_lse else result


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | None = None,
    *,
    rope_cache: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    head_dim_v: int = 512,
    softmax_scale: float | None = None,
    causal: bool = True,
    kv_scale: float | torch.Tensor | None = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact MLA decode in ``compute_dtype``, as :func:`leanattn.mla_decode`: :func:`decode` with
    the one latent head as K and its first ``head_dim_v`` columns as V (a view, as the kernel
    reads them). q (batch, q_len, q_heads, head_dim); kv_cache (batch, cache_len, 1, head_dim) or
    pages with ``block_table`` (with ``rope_cache``, the keys' rope part apart and kv_cache the
    latent only); ``cache_leftpad`` as in :func:`decode`; ``kv_scale`` dequantises an fp8 cache's
    scores and values alike.
    Returns (batch, q_len, q_heads, head_dim_v) in q's dtype, and the float32 LSE (batch, q_heads,
    q_len) with ``return_lse``."""
    keys = kv_cache if rope_cache is None else torch.cat([kv_cache, rope_cache], dim=-1)
    return decode(q, keys, kv_cache[..., :head_dim_v], cache_seqlens, block_table=block_table,
                  cache_leftpad=cache_leftpad, softmax_scale=softmax_scale, causal=causal, k_scale=kv_scale,
                  v_scale=kv_scale, return_lse=return_lse, compute_dtype=compute_dtype)


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
    dtype and its LSE as float32 (batch, q_heads, q_len); rows with no mass give zeros and -inf,
    rows with a broken part (LSE NaN or +inf, or NaN in a non-empty output) NaN.
    """
    o = torch.stack(list(outs)) if not isinstance(outs, torch.Tensor) else outs
    s = torch.stack(list(lses)) if not isinstance(lses, torch.Tensor) else lses
    dtype = o.dtype
    s = s.to(compute_dtype).permute(0, 1, 3, 2)  # (parts, batch, q_len, q_heads), like o
    # A part whose LSE is -inf is empty: its output may hold anything and is never read. A part
    # whose LSE is NaN or +inf, or whose output holds a NaN where it is not empty, is broken and
    # makes its row NaN.
    empty = s == -math.inf
    o = torch.where(empty[..., None], torch.zeros((), dtype=compute_dtype, device=o.device), o.to(compute_dtype))
    broken = (torch.isnan(s) | (s == math.inf) | torch.isnan(o).any(dim=-1)).any(dim=0)
    s = torch.where(broken[None], -math.inf, s)
    lse = torch.logsumexp(s, dim=0)  # -inf where every part is -inf
    # exp(-inf - -inf) is NaN: a row with no mass weighs every part 0.
    w = torch.where(torch.isinf(lse), torch.zeros_like(s), torch.exp(s - lse))
    merged = (w[..., None] * torch.where(broken[None, ..., None], 0.0, o)).sum(dim=0)
    merged = torch.where(broken[..., None], math.nan, merged)
    lse = torch.where(broken, math.nan, lse)
    return merged.to(dtype), lse.permute(0, 2, 1).float()
