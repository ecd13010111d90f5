"""Context parallel's one-launch exchange: each rank pushes its partial into every rank's receive
buffer in symmetric memory and merges what it received (``merge.push_merge_kernel``), with no
collective between the local attention and the merge.

The buffers are allocated once per (batch, q_len) by the checked plan (a collective), through
:data:`RENDEZVOUS`: by default torch's symmetric memory (``torch.distributed._symmetric_memory``,
CUDA, no multicast). Anything that maps every rank's buffers into every process can stand in for
it (the tests map shared files on the CPU).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import triton

from ..kernels.config import interpreting, next_pow2
from ..merge import push_merge_kernel
from ._exchange import pack_views, padded_words

__all__ = ["MAX_EXCHANGE_PROGRAMS", "RENDEZVOUS", "SymmetricBuffers", "agree", "allocate", "push_merge", "torch_rendezvous"]

# The push-merge kernel's most programs. A constant, not the GPU's SM count: every rank must
# launch the same grid (a rank's flags are indexed by the peers' program ids), whatever GPUs the
# ranks have. Its programs are small (one or four warps, no shared memory), so 128 stay resident
# at once on any GPU of 64 SMs or more, which the kernel's waits need.
MAX_EXCHANGE_PROGRAMS = 128


def agree(error: Exception | None, group: dist.ProcessGroup | None, device: torch.device, what: str) -> None:
    """Raise on every rank of ``group`` if ``error`` is set on any (a collective): a rank that
    failed alone before a collective step would leave the others waiting in it."""
    ok = torch.tensor([error is None], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if error is not None:
        raise RuntimeError(f"exchange='symmetric': {what} failed on this rank: {error}") from error
    if not bool(ok.item()):
        raise RuntimeError(f"exchange='symmetric': {what} failed on another rank (see its error)")


def torch_rendezvous(group: dist.ProcessGroup | None, device: torch.device, recv_words: int,
                     flag_words: int) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int], object]:
    """This rank's receive buffer (fp32, ``recv_words``) and flags (int64, ``flag_words``, zeroed)
    in torch symmetric memory, every rank's addresses of both, and the handles that keep the
    mappings. A collective: every rank of ``group`` calls it with the same sizes. Only the
    unicast mappings are used (set TORCH_SYMM_MEM_DISABLE_MULTICAST=1 to keep torch from making
    multicast objects as well)."""
    if device.type != "cuda":
        raise ValueError(f"exchange='symmetric' needs CUDA tensors (torch symmetric memory), got device {device}")
    import torch.distributed._symmetric_memory as symm_mem

    if not hasattr(symm_mem, "empty"):
        raise RuntimeError(f"exchange='symmetric' needs torch symmetric memory (symm_mem.empty), which torch "
                           f"{torch.__version__} lacks")
    name = (group or dist.group.WORLD).group_name
    if hasattr(symm_mem, "enable_symm_mem_for_group"):  # older releases need it; later ones warn
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(name)
    # Allocate, then agree that every rank did before the rendezvous (out of memory, say).
    error: Exception | None = None
    try:
        recv = symm_mem.empty(recv_words, dtype=torch.float32, device=device)
        flags = symm_mem.empty(flag_words, dtype=torch.int64, device=device)
    except Exception as e:  # noqa: BLE001  (raised by agree, on every rank)
        error = e
    agree(error, group, device, "allocating the symmetric buffers")
    recv_handle = symm_mem.rendezvous(recv, name)
    flag_handle = symm_mem.rendezvous(flags, name)
    rank = dist.get_rank(group)
    if recv_handle.buffer_ptrs[rank] != recv.data_ptr() or flag_handle.buffer_ptrs[rank] != flags.data_ptr():
        error = RuntimeError("torch's symmetric buffer addresses are not the tensors' own, which the kernel's "
                             "address tables assume")
    agree(error, group, device, "mapping the symmetric buffers")
    flags.zero_()
    torch.cuda.synchronize(device)
    dist.barrier(group)  # no rank pushes before every rank's flags are zero
    return recv, flags, list(recv_handle.buffer_ptrs), list(flag_handle.buffer_ptrs), (recv_handle, flag_handle)


# How buffers are mapped across ranks: (group, device, recv_words, flag_words) -> (recv, flags,
# recv addresses, flag addresses, what keeps the mappings), every rank's flags zero before any
# rank returns.
RENDEZVOUS: Callable[..., tuple[torch.Tensor, torch.Tensor, list[int], list[int], object]] = torch_rendezvous


@dataclass
class SymmetricBuffers:
    """One (batch, q_len)'s receive buffer, flags and every rank's addresses of them."""

    recv: torch.Tensor  # fp32 (2 slots x world records)
    flags: torch.Tensor  # int64 (world, programs): the last call each rank's program j pushed here
    peer_recv: torch.Tensor  # int64 (world,) every rank's recv address, in this process
    peer_flags: torch.Tensor  # int64 (world,)
    o_parts: torch.Tensor  # (2, world, batch, q_len, heads_out, head_dim) view of recv, q's dtype
    lse_parts: torch.Tensor  # (2, world, batch, heads_out, q_len) fp32 view of recv
    programs: int
    block_r: int  # rows a block of the push-merge kernel
    lse_base: int  # fp32 word of recv where record (0, 0)'s LSEs start
    keep: object = None  # what keeps the mappings (the rendezvous' handles)


def programs_for(rows: int, head_dim: int, most: int) -> tuple[int, int]:
    """(rows a block, programs) for a merge of ``rows`` rows: about 1024 values a block (as
    ``merge_states_into``), at most ``most`` programs (the push_merge kernel needs every program
    resident)."""
    block_r = max(1, min(next_pow2(rows), 1024 // next_pow2(head_dim)))
    return block_r, max(1, min(triton.cdiv(rows, block_r), most))


def allocate(group: dist.ProcessGroup | None, device: torch.device, world: int, batch: int, q_len: int,
             heads_out: int, head_dim: int, dtype: torch.dtype) -> SymmetricBuffers:
    """The exchange buffers of one (batch, q_len): a collective (every rank, the same sizes)."""
    shape_o, shape_l = (batch, q_len, heads_out, head_dim), (batch, heads_out, q_len)
    words = padded_words(math.prod(shape_o), dtype) + padded_words(math.prod(shape_l), torch.float32)
    # The interpreter runs programs one by one: a few of them still test a program's several blocks.
    block_r, programs = programs_for(batch * q_len * heads_out, head_dim,
                                     4 if interpreting() else MAX_EXCHANGE_PROGRAMS)
    recv, flags, recv_ptrs, flag_ptrs, keep = RENDEZVOUS(group, device, 2 * world * words, world * programs)
    o_parts, lse_parts = pack_views(recv, 2 * world, words, shape_o, shape_l, dtype)
    if o_parts.data_ptr() != recv.data_ptr():  # the kernel takes the outputs' view as the buffer's start
        raise AssertionError("the outputs' view must start the receive buffer")
    as_ints = dict(dtype=torch.int64, device=device)
    return SymmetricBuffers(recv, flags.view(world, programs), torch.tensor(recv_ptrs, **as_ints),
                            torch.tensor(flag_ptrs, **as_ints), o_parts.unflatten(0, (2, world)),
                            lse_parts.unflatten(0, (2, world)), programs, block_r,
                            lse_parts.storage_offset() - recv.storage_offset(), keep)


def push_merge(sym: SymmetricBuffers, rank: int, src: torch.Tensor, src_lse: torch.Tensor, out: torch.Tensor,
               out_lse: torch.Tensor, *, scatter: bool, push: bool = True, merge: bool = True) -> None:
    """Push this rank's partial ``src`` (batch, q_len, heads, head_dim), ``src_lse`` (batch, heads,
    q_len) float32 to every rank, then merge the world's partials into ``out`` (batch, q_len,
    heads_out, head_dim) and ``out_lse`` (batch, heads_out, q_len) float32. Unchecked: the
    context-parallel plan checked the shapes. ``push``/``merge``: one half only (the interpreter,
    which runs programs one by one, pushes on every rank before any rank merges)."""
    o, lse = sym.o_parts, sym.lse_parts  # o: the buffer's start, in q's dtype
    _, world, batch, q_len, heads_out, head_dim = o.shape
    block_r, head_dim_pad = sym.block_r, next_pow2(head_dim)
    push_merge_kernel[(sym.programs,)](
        src, src_lse, o, sym.recv, sym.peer_recv, sym.flags, sym.peer_flags, out, out_lse,
        batch * q_len * heads_out, q_len, heads_out, rank,
        *src.stride()[:3], *src_lse.stride(),
        o.stride(0), o.stride(1), *o.stride()[2:5],
        sym.lse_base, lse.stride(0), lse.stride(1), *lse.stride()[2:5],
        *out.stride()[:3], *out_lse.stride(),
        WORLD=world, SCATTER=scatter, PUSH=push, MERGE=merge,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_R=block_r,
        num_warps=4 if block_r * head_dim_pad >= 512 else 1,
    )
