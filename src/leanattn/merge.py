"""Exact merge of partial attention results through their log-sum-exp.

Attention over a set of keys split into parts P_1..P_n is recovered exactly from each part's
normalised output o_i and log-sum-exp lse_i:

    lse = logsumexp_i(lse_i),    out = sum_i exp(lse_i - lse) * o_i

The kernel computes this as an online softmax over the parts, in the order given, one part at a
time: a running max m, a running sum of weights l and an unnormalised accumulator. That is the
same associativity stream-K uses inside one GPU, here applied to parts from anywhere (other
launches, other GPUs). ``_combine_part`` is the whole of the math. The decode kernel's in-GPU
merge of split heads does not use it: ``kernels/lean_decode.py`` has its own ``_combine4``, which
folds four fp32 partials a step (unnormalised accumulator, running max in log2 units, running
sum) where ``_combine_part`` folds one normalised output with its natural-log LSE.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._checks import check_no_broadcast
from .kernels.config import check_kernel_device, next_pow2

__all__ = ["merge_states", "merge_states_into", "MERGE_DTYPES"]

MERGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = tl.constexpr(1.4426950408889634)
# Up to this many parts the kernel unrolls its loop over them (one compile per part count).
_MAX_UNROLL = 8
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _combine_part(acc, m, l, o, lse):
    """Fold one part into the running state.

    acc (ROWS, D) unnormalised fp32 accumulator; m (ROWS,) running max of the parts' LSEs;
    l (ROWS,) running sum of exp(lse_i - m); o (ROWS, D) the part's normalised output (fp32);
    lse (ROWS,) its natural-log LSE. A part with lse = -inf adds nothing; while every part so
    far is empty m stays -inf, so the shift is 0 there to avoid inf - inf. Differences are taken
    before the conversion to log2 units: LSEs of magnitude 1e3 and more keep their precision.
    """
    m_new = tl.maximum(m, lse)
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2((m - m_shift) * LOG2E)
    w = tl.exp2((lse - m_shift) * LOG2E)
    l = l * alpha + w
    acc = acc * alpha[:, None] + o * w[:, None]
    return acc, m_new, l


@triton.jit
def _finish(acc, m, l):
    """Normalised output and natural-log LSE of the running state; zeros and -inf where empty."""
    has_mass = l > 0.0
    l_safe = tl.where(has_mass, l, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_mass, m + tl.log2(l_safe) * LN2, float("-inf"))
    return out, lse


@triton.jit
def _load_part(o_ptr, l_ptr, o_offs, l_rows, mask, row_ok, CACHE: tl.constexpr):
    """One part's rows: its output as fp32, its LSE, and whether the part is broken there.

    Where the LSE is -inf the part is empty and its output is replaced by zeros: it is never used
    and may hold anything, NaN included. A part is broken in a row whose LSE is NaN or +inf (no
    finite set of scores gives either) or whose output holds a NaN; it then takes no part in the
    math (zeros, LSE -inf), and the caller makes the merged row NaN. The output is loaded without
    waiting for the LSE, so both loads are in flight at once. ``CACHE``: the loads' cache
    modifier (".cg" for parts another GPU wrote: no stale L1 line is read)."""
    lse = tl.load(l_ptr + l_rows, mask=row_ok, other=float("-inf"), cache_modifier=CACHE)
    o = tl.load(o_ptr + o_offs, mask=mask, other=0.0, cache_modifier=CACHE).to(tl.float32)
    o = tl.where((lse > float("-inf"))[:, None], o, 0.0)  # NaN > -inf is False: NaN LSEs too
    broken = (lse != lse) | (lse == float("inf")) | (tl.sum((o != o).to(tl.int32), axis=1) > 0)
    return tl.where(broken[:, None], 0.0, o), tl.where(broken, float("-inf"), lse), broken


@triton.jit
def _rows_of(first, num_rows, q_len, q_heads, BLOCK_R: tl.constexpr):
    """BLOCK_R rows from row ``first``, a row being one (batch, query, head) in that order
    (64-bit): whether each exists, and its (b, t, h)."""
    rows = first + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < num_rows
    h = rows % q_heads
    t = (rows // q_heads) % q_len
    b = rows // (q_heads * q_len)
    return row_ok, b, t, h


@triton.jit
def _merge_rows(o_part, l_part, o_offs, l_rows, mask, row_ok, step_o, step_l, parts,
                BLOCK_R: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, UNROLL: tl.constexpr, CACHE: tl.constexpr):
    """Rows (BLOCK_R, HEAD_DIM_PAD) of ``parts`` parts merged in order, so the result is the
    same on every run and every rank: the output (fp32) and natural-log LSE, both NaN in rows
    where a part is broken. Part i's rows are at ``o_part + i * step_o + o_offs`` and
    ``l_part + i * step_l + l_rows`` (64-bit pointer arithmetic, whatever the part count).
    UNROLL > 0 (then equal to ``parts``) unrolls the loop: straight-line code, so no part's
    loads wait for the previous part's math."""
    acc = tl.zeros((BLOCK_R, HEAD_DIM_PAD), dtype=tl.float32)
    m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_R,), dtype=tl.float32)
    broken = l < 0.0  # rows where some part is broken (none yet)
    if UNROLL > 0:
        for _ in tl.static_range(UNROLL):
            o, lse, bad = _load_part(o_part, l_part, o_offs, l_rows, mask, row_ok, CACHE)
            acc, m, l = _combine_part(acc, m, l, o, lse)
            broken = broken | bad
            o_part += step_o
            l_part += step_l
    else:
        for _ in range(0, parts):
            o, lse, bad = _load_part(o_part, l_part, o_offs, l_rows, mask, row_ok, CACHE)
            acc, m, l = _combine_part(acc, m, l, o, lse)
            broken = broken | bad
            o_part += step_o
            l_part += step_l
    out, lse = _finish(acc, m, l)
    return tl.where(broken[:, None], float("nan"), out), tl.where(broken, float("nan"), lse)


@triton.jit
def merge_states_kernel(
    O, Lse, Out, OutLse,
    parts, num_rows, q_len, q_heads,
    stride_op, stride_ob, stride_ot, stride_oh,
    stride_lp, stride_lb, stride_lh, stride_lt,
    stride_xb, stride_xt, stride_xh,
    stride_yb, stride_yh, stride_yt,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_R: tl.constexpr, UNROLL: tl.constexpr,
):
    """Merge ``parts`` partial results, by strides.

    O (parts, batch, q_len, q_heads, HEAD_DIM), any float dtype; Lse (parts, batch, q_heads, q_len)
    float32; Out (batch, q_len, q_heads, HEAD_DIM); OutLse (batch, q_heads, q_len) float32. Each
    program takes BLOCK_R rows, a row being one (batch, query, head) in that order. UNROLL > 0
    unrolls the loop over the parts (then it equals ``parts``).
    """
    row_ok, b, t, h = _rows_of(tl.program_id(0).to(tl.int64) * BLOCK_R, num_rows, q_len, q_heads, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_rows = b * stride_ob + t * stride_ot + h * stride_oh
    l_rows = b * stride_lb + h * stride_lh + t * stride_lt

    o_offs = o_rows[:, None] + offs_d[None, :]
    out, lse = _merge_rows(O, Lse, o_offs, l_rows, mask, row_ok, stride_op, stride_lp, parts, BLOCK_R, HEAD_DIM_PAD,
                           UNROLL, "")
    x_rows = b * stride_xb + t * stride_xt + h * stride_xh
    tl.store(Out + x_rows[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty), mask=mask)
    tl.store(OutLse + b * stride_yb + h * stride_yh + t * stride_yt, lse, mask=row_ok)


@triton.jit
def push_merge_kernel(
    Src, SrcLse, RecvO, RecvLse, PeerRecv, Flags, PeerFlags, Out, OutLse,
    num_rows, q_len, heads_out, rank,
    stride_sb, stride_st, stride_sh, stride_zb, stride_zh, stride_zt,
    slot_o, part_o, stride_ob, stride_ot, stride_oh,
    lse_base, slot_l, part_l, stride_lb, stride_lh, stride_lt,
    stride_xb, stride_xt, stride_xh, stride_yb, stride_yh, stride_yt,
    WORLD: tl.constexpr, SCATTER: tl.constexpr, PUSH: tl.constexpr, MERGE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Context parallel's exchange and merge in one launch: push this rank's partial into every
    rank's receive buffer, wait for every rank's, merge them (``merge_states_kernel``'s math, in
    rank order).

    Src (batch, q_len, heads, HEAD_DIM) and SrcLse (batch, heads, q_len) float32: this rank's
    partial, by strides. Every rank holds a receive buffer of the same layout, two slots of WORLD
    records; record (slot, p) holds rank p's rows: outputs at element ``slot * slot_o + p * part_o``
    of the buffer read as Src's dtype (then strides ob, ot, oh), LSEs at fp32 word ``lse_base +
    slot * slot_l + p * part_l`` (then strides lb, lh, lt). RecvO/RecvLse are this rank's buffer
    (its two typings), PeerRecv int64 (WORLD,) every rank's buffer address as this process maps it.
    Rows are (batch, query, head) with ``heads_out`` heads; ``SCATTER``: rank p gets heads [p *
    heads_out, (p + 1) * heads_out) of the partial, else all of them.

    Flags int64 (WORLD, programs) of this rank, PeerFlags (WORLD,) every rank's flag addresses:
    flag (p, j) of a rank holds the last call whose rows program j of rank p pushed there. A call's
    number ``seq`` is the program's own flag plus one, so it needs no host counter and a CUDA
    graph replays it; its slot is ``seq % 2``. A rank starts call c + 2, which reuses call c's
    slot, only after its call c + 1 saw every rank's c + 1 rows, which each rank pushed after its
    call c ended: no rank still reads that slot. Program j pushes and merges the row blocks j, j +
    programs, ... and waits only for the programs j of the other ranks, which push before they
    wait: with every program resident at once (at most ``_symmetric.MAX_EXCHANGE_PROGRAMS`` small
    programs) no call deadlocks.

    PUSH and MERGE select the halves (both on a GPU). The interpreter runs one program after
    another, so its callers push on every rank before any rank merges.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    seq = tl.load(Flags + rank * programs + pid)
    if PUSH:
        seq += 1
    slot = seq % 2
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    blocks = tl.cdiv(num_rows, BLOCK_R)
    if PUSH:
        for blk in range(pid, blocks, programs):
            row_ok, b, t, hh = _rows_of(blk * BLOCK_R, num_rows, q_len, heads_out, BLOCK_R)
            mask = row_ok[:, None] & d_ok[None, :]
            o_rows = b * stride_ob + t * stride_ot + hh * stride_oh
            l_rows = b * stride_lb + hh * stride_lh + t * stride_lt
            for p in tl.static_range(WORLD):
                h = hh + p * heads_out if SCATTER else hh
                o = tl.load(Src + (b * stride_sb + t * stride_st + h * stride_sh)[:, None] + offs_d[None, :], mask=mask)
                lse = tl.load(SrcLse + b * stride_zb + h * stride_zh + t * stride_zt, mask=row_ok)
                base = tl.load(PeerRecv + p)
                dst_o = base.to(tl.pointer_type(Src.dtype.element_ty)) + slot * slot_o + rank * part_o
                dst_l = base.to(tl.pointer_type(tl.float32)) + lse_base + slot * slot_l + rank * part_l
                tl.store(dst_o + o_rows[:, None] + offs_d[None, :], o, mask=mask)
                tl.store(dst_l + l_rows, lse, mask=row_ok)
        # Every thread's stores before the flags: the release below orders what the barrier
        # ordered before it, for every rank that acquires the flag.
        tl.debug_barrier()
        for p in tl.static_range(WORLD):
            flags = tl.load(PeerFlags + p).to(tl.pointer_type(tl.int64))
            tl.atomic_xchg(flags + rank * programs + pid, seq, sem="release", scope="sys")
    if MERGE:
        for p in tl.static_range(WORLD):
            while tl.atomic_add(Flags + p * programs + pid, 0, sem="acquire", scope="sys") < seq:
                pass
        tl.debug_barrier()
        for blk in range(pid, blocks, programs):
            row_ok, b, t, hh = _rows_of(blk * BLOCK_R, num_rows, q_len, heads_out, BLOCK_R)
            mask = row_ok[:, None] & d_ok[None, :]
            o_offs = (b * stride_ob + t * stride_ot + hh * stride_oh)[:, None] + offs_d[None, :]
            l_rows = b * stride_lb + hh * stride_lh + t * stride_lt
            # Ranks in order, as merge_states_kernel: the same bits on every rank and as the
            # all-gather's merge.
            out, lse = _merge_rows(RecvO + slot * slot_o, RecvLse + lse_base + slot * slot_l, o_offs, l_rows, mask,
                                   row_ok, part_o, part_l, WORLD, BLOCK_R, HEAD_DIM_PAD, WORLD, ".cg")
            tl.store(Out + (b * stride_xb + t * stride_xt + hh * stride_xh)[:, None] + offs_d[None, :],
                     out.to(Out.dtype.element_ty), mask=mask)
            tl.store(OutLse + b * stride_yb + hh * stride_yh + t * stride_yt, lse, mask=row_ok)


def _fail(kind: type[Exception], msg: str) -> None:
    raise kind(msg)


def _check_stacked(outs: torch.Tensor, lses: torch.Tensor) -> None:
    """Shapes, dtypes and devices of stacked parts: outs (parts, B, T, H, D), lses (parts, B, H, T)."""
    for name, t in (("outs", outs), ("lses", lses)):
        if not isinstance(t, torch.Tensor):
            _fail(TypeError, f"{name} must be a torch.Tensor or a list of them, got {type(t).__name__}")
    if outs.dim() != 5:
        _fail(ValueError, f"stacked outs must be (parts, batch, q_len, q_heads, head_dim), got shape {tuple(outs.shape)}")
    parts, batch, q_len, q_heads, head_dim = outs.shape
    if parts < 1:
        _fail(ValueError, "merge_states needs at least one part")
    if outs.dtype not in MERGE_DTYPES:
        _fail(TypeError, f"outs must be float16, bfloat16 or float32, got {outs.dtype}")
    if lses.dtype != torch.float32:
        _fail(TypeError, f"lses must be float32, got {lses.dtype}")
    want = (parts, batch, q_heads, q_len)
    if tuple(lses.shape) != want:
        _fail(ValueError, f"lses must be (parts, batch, q_heads, q_len) = {want} to match outs {tuple(outs.shape)}, "
                          f"got {tuple(lses.shape)}")
    if outs.stride(-1) != 1 and outs.numel():
        _fail(ValueError, f"outs must have unit stride on head_dim, got strides {outs.stride()}")
    if lses.device != outs.device:
        _fail(ValueError, f"outs and lses must be on one device, got {outs.device} and {lses.device}")
    check_kernel_device("outs", outs.device)


def _stack(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a list of parts against its first member and stack it (one copy of each part)."""
    if len(outs) == 0:
        _fail(ValueError, "merge_states needs at least one part, got an empty list")
    if len(outs) != len(lses):
        _fail(ValueError, f"outs and lses must have one entry per part, got {len(outs)} and {len(lses)}")
    for i, (o, s) in enumerate(zip(outs, lses)):
        for name, t in ((f"outs[{i}]", o), (f"lses[{i}]", s)):
            if not isinstance(t, torch.Tensor):
                _fail(TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if o.dim() != 4:
            _fail(ValueError, f"outs[{i}] must be (batch, q_len, q_heads, head_dim), got shape {tuple(o.shape)}")
        if s.dim() != 3:
            _fail(ValueError, f"lses[{i}] must be (batch, q_heads, q_len), got shape {tuple(s.shape)}")
        o0, s0 = outs[0], lses[0]
        if o.shape != o0.shape or s.shape != s0.shape:
            _fail(ValueError, f"every part must have the shapes of part 0, outs {tuple(o0.shape)} and lses "
                              f"{tuple(s0.shape)}; part {i} has {tuple(o.shape)} and {tuple(s.shape)}")
        if o.dtype != o0.dtype:
            _fail(TypeError, f"every part's output must have one dtype, got {o0.dtype} (part 0) and {o.dtype} (part {i})")
        if s.dtype != torch.float32:
            _fail(TypeError, f"lses[{i}] must be float32, got {s.dtype}")
        if o.device != o0.device or s.device != o0.device:
            _fail(ValueError, f"every part must be on one device, got {o0.device} (outs[0]), {o.device} (outs[{i}]) "
                              f"and {s.device} (lses[{i}])")
    return torch.stack(list(outs)), torch.stack(list(lses))


def merge_states_into(
    outs: torch.Tensor, lses: torch.Tensor, out: torch.Tensor, out_lse: torch.Tensor, *, check: bool = True
) -> None:
    """Merge stacked parts into ``out`` (batch, q_len, q_heads, head_dim) and ``out_lse``
    (batch, q_heads, q_len) float32, by strides: no copies of the inputs.

    ``outs`` (parts, batch, q_len, q_heads, head_dim) and ``lses`` (parts, batch, q_heads, q_len)
    may be views with any strides but a unit head_dim stride (slices of a gathered buffer, say).
    ``check=False`` skips the checks, for callers that did them once already.
    """
    parts, batch, q_len, q_heads, head_dim = outs.shape
    if check:
        _check_stacked(outs, lses)
        if out.shape != outs.shape[1:] or out.device != outs.device or out.stride(-1) != 1:
            _fail(ValueError, f"out must be {tuple(outs.shape[1:])} on {outs.device} with unit last stride, "
                              f"got {tuple(out.shape)} on {out.device}, strides {out.stride()}")
        if out.dtype not in MERGE_DTYPES:
            _fail(TypeError, f"out must be float16, bfloat16 or float32, got {out.dtype}")
        if out_lse.shape != lses.shape[1:] or out_lse.dtype != torch.float32 or out_lse.device != outs.device:
            _fail(ValueError, f"out_lse must be float32 {tuple(lses.shape[1:])} on {outs.device}, "
                              f"got {out_lse.dtype} {tuple(out_lse.shape)} on {out_lse.device}")
        check_no_broadcast("out", out)
        check_no_broadcast("out_lse", out_lse)
    num_rows = batch * q_len * q_heads
    if num_rows == 0 or head_dim == 0:
        return
    head_dim_pad = next_pow2(head_dim)
    # About 1024 elements a program: 8 per thread of four warps, one 16-byte load per part for
    # 16-bit inputs; small merges still spread over several SMs.
    block_r = max(1, min(next_pow2(num_rows), 1024 // head_dim_pad))
    grid = (triton.cdiv(num_rows, block_r),)
    merge_states_kernel[grid](
        outs, lses, out, out_lse,
        parts, num_rows, q_len, q_heads,
        *outs.stride()[:4], *lses.stride(),
        *out.stride()[:3], *out_lse.stride(),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_R=block_r,
        UNROLL=parts if parts <= _MAX_UNROLL else 0,
        num_warps=4 if block_r * head_dim_pad >= 512 else 1,
    )


def merge_states(
    outs: Sequence[torch.Tensor] | torch.Tensor,
    lses: Sequence[torch.Tensor] | torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    out_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of partial attention results over disjoint key sets.

    Args:
        outs: a list of parts' outputs, each (batch, q_len, q_heads, head_dim), fp16, bf16 or
            fp32, all one dtype; or one stacked tensor (parts, batch, q_len, q_heads, head_dim)
            (then any strides with a unit head_dim stride, and no copy is made).
        lses: the matching natural-log log-sum-exps, float32, each (batch, q_heads, q_len); or
            stacked (parts, batch, q_heads, q_len). A part whose LSE is -inf (it saw no key)
            contributes nothing, whatever its output holds. A part whose LSE is NaN or +inf (no
            finite scores give either: a broken part), or whose output holds a NaN where its
            LSE is finite, makes that row's merged output and LSE NaN, so that a later merge
            cannot drop it.
        out, out_lse: optional tensors to write the result into, shaped like one part.

    Returns:
        ``(out, lse)``: out (batch, q_len, q_heads, head_dim) in the parts' dtype (or ``out``'s),
        lse float32 (batch, q_heads, q_len). Rows where every part is empty give zeros and LSE
        -inf; rows with a broken part NaN. Parts are merged in the order given, with fp32 arithmetic; the result is bitwise
        the same on every call.
    """
    if isinstance(outs, torch.Tensor) != isinstance(lses, torch.Tensor):
        _fail(TypeError, "outs and lses must both be lists of tensors or both be stacked tensors, "
                         f"got {type(outs).__name__} and {type(lses).__name__}")
    if isinstance(outs, torch.Tensor):
        stacked_o, stacked_l = outs, lses
    elif isinstance(outs, (list, tuple)) and isinstance(lses, (list, tuple)):
        stacked_o, stacked_l = _stack(outs, lses)
    else:
        _fail(TypeError, f"outs and lses must be lists of tensors, got {type(outs).__name__} and {type(lses).__name__}")
    _check_stacked(stacked_o, stacked_l)
    part_o, part_l = stacked_o.shape[1:], stacked_l.shape[1:]
    if out is None:
        out = torch.empty(part_o, dtype=stacked_o.dtype, device=stacked_o.device)
    if out_lse is None:
        out_lse = torch.empty(part_l, dtype=torch.float32, device=stacked_o.device)
    merge_states_into(stacked_o, stacked_l, out, out_lse)
    return out, out_lse
