"""The append pattern of serving mode: before each layer's attention, a small kernel writes that
layer's newest K/V token(s) into its cache and a fresh q, as an engine's rotary/cache-write kernel
does, and every method's output is checked to include them.

The kernel triggers programmatic dependent launch at its start (``gdc_launch_dependents``), so a
PDL-aware attention kernel after it may launch early, and waits (``gdc_wait``) before it writes,
as a kernel reading the previous kernel's output must. An attention kernel that reads q or the
newest token before that wait is over reads stale data; the check below catches it.

The newest key of each sequence leans toward its queries (its logit about ln(1.65 sqrt(n)) over
``n`` random keys), so the newest token moves the output by about as much as all the others
together: an output computed without it is off by far more than the tolerance, and one computed
with it still shows errors in the rest of the attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._launch import use_pdl
from .peers import Inputs
from .shapes import Shape

__all__ = ["TOLERANCE", "Appends", "AppendNotSeen", "check_seen", "launch_append", "make_appends",
           "token_rows"]

_BLOCK = 1024


@triton.jit
def _append_kernel(
    Q, K, V, NewQ, NewK, NewV, SeqLens, Table,
    stride_qb, stride_qt, stride_c0, stride_c1, stride_tb,
    QN: tl.constexpr, KN: tl.constexpr, Q_LEN: tl.constexpr, PAGE: tl.constexpr, BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (b, t) writes query token t of sequence b: NewQ[b, t] (QN = q_heads * head_dim
    elements) to Q[b, t], and NewK[b, t], NewV[b, t] (KN = kv_heads * head_dim) to cache row
    SeqLens[b] - Q_LEN + t, skipped when negative. The cache is (batch, cache_len, kv_heads,
    head_dim) with PAGE = 0, else pages (num_pages, PAGE, kv_heads, head_dim) through Table
    (batch, max_pages); (kv_heads, head_dim) and the New* tensors are contiguous."""
    if USE_PDL:
        # Let the next kernel launch now; it must itself wait before reading what this writes.
        tl.extra.cuda.gdc_launch_dependents()
        # The new token comes from the kernel before (in a model, the QKV projection).
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    t = tl.program_id(1)
    src = b.to(tl.int64) * Q_LEN + t
    for i in range(0, QN, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        m = offs < QN
        val = tl.load(NewQ + src * QN + offs, mask=m)
        tl.store(Q + b.to(tl.int64) * stride_qb + t * stride_qt + offs, val.to(Q.dtype.element_ty), mask=m)
    row = tl.load(SeqLens + b) - Q_LEN + t
    n = tl.where(row >= 0, KN, 0)  # elements to write: none for a row before the cache's start
    row = tl.maximum(row, 0)
    if PAGE > 0:
        page = tl.load(Table + b.to(tl.int64) * stride_tb + row // PAGE)
        base = page.to(tl.int64) * stride_c0 + (row % PAGE) * stride_c1
    else:
        base = b.to(tl.int64) * stride_c0 + row.to(tl.int64) * stride_c1
    for i in range(0, KN, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        m = offs < n
        k = tl.load(NewK + src * KN + offs, mask=m)
        v = tl.load(NewV + src * KN + offs, mask=m)
        tl.store(K + base + offs, k.to(K.dtype.element_ty), mask=m)
        tl.store(V + base + offs, v.to(V.dtype.element_ty), mask=m)


@dataclass
class Appends:
    """Per layer, the token(s) the append kernel writes: ``fresh`` q (batch, q_len, q_heads,
    head_dim), k and v (batch, q_len, kv_heads, head_dim), in q's dtype; and ``stale``, what q and
    those cache rows held before the first append (to put back before a checked replay)."""

    fresh: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    stale: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def token_rows(shape: Shape, x: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the cache of ``x`` holds at each sequence's newest ``q_len`` rows: K and V (batch,
    q_len, kv_heads, head_dim), and which of those rows exist (bool (batch, q_len); a row before
    the cache's start, which the kernel skips, reads row 0)."""
    rows = x.seqlens.long()[:, None] - shape.q_len + torch.arange(shape.q_len, device=x.k.device)
    live = rows >= 0
    rows = rows.clamp_min(0)
    batch = torch.arange(shape.batch, device=x.k.device)[:, None]
    if x.block_table is not None:
        page, slot = x.block_table.long()[batch, rows // shape.page_size], rows % shape.page_size
        return x.k[page, slot], x.v[page, slot], live
    return x.k[batch, rows], x.v[batch, rows], live


def make_appends(shape: Shape, xs: list[Inputs], seed: int = 1000) -> Appends:
    """Fresh random q, K and V for the newest token(s) of every layer of ``xs``, drawn apart from
    the inputs (so they differ from what the cache held), the keys leaning toward their queries
    (see the module docstring); and the stale values they replace."""
    dev = xs[0].q.device
    gen = torch.Generator(device=dev)
    group = shape.q_heads // shape.kv_heads
    seen = torch.tensor([max(shape.seen(n), 1) for n in shape.lens], dtype=torch.float32, device=dev)
    # The logit a key along u (unit) gets from a query q of a group: scale * lean * q.u, with
    # q.u about sqrt(head_dim / group) for N(0, 1) queries summed into u.
    lean = (0.5 * seen.log() + math.log(1.65)) * math.sqrt(group)
    fresh, stale = [], []
    for layer, x in enumerate(xs):
        gen.manual_seed(seed + layer)
        lead = (shape.batch, shape.q_len)

        def rnd(heads: int) -> torch.Tensor:
            return torch.randn(*lead, heads, shape.head_dim, device=dev, generator=gen, dtype=torch.float32)

        q = rnd(shape.q_heads)
        toward = q.view(*lead, shape.kv_heads, group, shape.head_dim).sum(3)
        toward = toward / toward.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        k = rnd(shape.kv_heads) + lean[:, None, None, None] * toward
        v = rnd(shape.kv_heads)
        fresh.append((q.to(shape.dtype), k.to(shape.dtype), v.to(shape.dtype)))
        old_k, old_v, _ = token_rows(shape, x)
        stale.append((x.q.clone(), old_k.to(shape.dtype), old_v.to(shape.dtype)))
    return Appends(fresh, stale)


def launch_append(shape: Shape, x: Inputs, token: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """Write ``token`` (q, k, v as in :class:`Appends`) into ``x``: q into x.q, k and v into each
    sequence's newest q_len cache rows (through the block table when paged). On Hopper and newer
    GPUs the kernel is launched with programmatic dependent launch allowed (Triton's
    ``launch_pdl`` launch option) and triggers its dependents at its start."""
    q, k, v = token
    assert x.k.stride()[-2:] == (shape.head_dim, 1) and x.q.stride()[-2:] == (shape.head_dim, 1)
    pdl = use_pdl(x.q.device, forced=True)
    table = x.block_table if x.block_table is not None else x.seqlens
    _append_kernel[(shape.batch, shape.q_len)](
        x.q, x.k, x.v, q, k, v, x.seqlens, table,
        x.q.stride(0), x.q.stride(1), x.k.stride(0), x.k.stride(1), table.stride(0),
        QN=shape.q_heads * shape.head_dim, KN=shape.kv_heads * shape.head_dim, Q_LEN=shape.q_len,
        PAGE=shape.page_size, BLOCK=_BLOCK, USE_PDL=pdl, num_warps=4, **({"launch_pdl": True} if pdl else {}),
    )


class AppendNotSeen(Exception):
    """A method's output does not include the token the append kernel wrote."""


# Relative error allowed against the reference with the appended token: the test suite's bf16
# tolerance, for every dtype (the methods' errors in serving mode are 2-4e-3, fp8 caches included).
TOLERANCE = 1.5e-2


def check_seen(method: str, out: torch.Tensor, with_token: torch.Tensor, without_token: torch.Tensor,
               tolerance: float = TOLERANCE) -> tuple[float, float]:
    """Relative errors of ``out`` against the references with and without the appended token
    (same shape). Raises :class:`AppendNotSeen`, naming ``method`` and both errors, when the
    first is over ``tolerance`` or when the references are too close for the check to tell."""
    out = out.reshape(with_token.shape).float()
    err = _rel(out, with_token)
    err_without = _rel(out, without_token)
    if not err <= tolerance:
        raise AppendNotSeen(f"{method}: off the reference with the appended token by {err:.2e} (tolerance "
                            f"{tolerance:.1e}; {err_without:.2e} from the one without it)")
    if not _rel(without_token, with_token) > 4 * tolerance:
        raise AppendNotSeen(f"{method}: the references with and without the appended token differ by only "
                            f"{_rel(without_token, with_token):.2e}: the check cannot tell them apart")
    return err, err_without


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
