"""The decode-attention methods the benchmark times, leanattn and the peers a user would pick.

Each ``prepare_*`` takes the shape and its inputs and returns a no-argument callable that runs one
decode step and returns (batch, q_heads, head_dim), or raises :class:`Unsupported` with the
reason a method can't take the shape. Setup work (plans, packing, compilation) happens in
``prepare``, never inside the timed callable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import leanattn

from .shapes import Shape

__all__ = ["Inputs", "Unsupported", "METHODS", "capture_cuda_graph", "make_inputs"]


class Unsupported(Exception):
    """The method is missing or refuses this shape; the message says which."""


def _reason(prefix: str, e: Exception, width: int) -> str:
    """A one-line reason from an exception: its first line, cut to ``width`` characters."""
    return f"{prefix}: {str(e).splitlines()[0][:width] if str(e) else ''}"


@dataclass
class Inputs:
    """q (B,1,Hq,D); k, v (B,N,Hkv,D) contiguous, or pages (P,page,Hkv,D) with block_table (B,maxp);
    seqlens int32 (B,)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    seqlens: torch.Tensor
    block_table: torch.Tensor | None
    scale: float


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> Inputs:
    """Random inputs for ``shape``; a paged cache gets its pages in shuffled order."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    b, n = shape.batch, max(shape.lens)
    d, dt = shape.head_dim, shape.dtype

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, device=device, dtype=dt, generator=gen)

    q = rnd(b, 1, shape.q_heads, d)
    seqlens = torch.tensor(shape.lens, dtype=torch.int32, device=device)
    if not shape.page_size:
        return Inputs(q, rnd(b, n, shape.kv_heads, d), rnd(b, n, shape.kv_heads, d), seqlens, None, d**-0.5)
    ps = shape.page_size
    max_pages = -(-n // ps)
    pages = [-(-length // ps) for length in shape.lens]
    perm = torch.randperm(sum(pages), device=device, generator=gen).to(torch.int32)
    table = torch.zeros(b, max_pages, dtype=torch.int32, device=device)
    start = 0
    for i, np_ in enumerate(pages):
        table[i, :np_] = perm[start : start + np_]
        start += np_
    k = rnd(sum(pages), ps, shape.kv_heads, d)
    v = rnd(sum(pages), ps, shape.kv_heads, d)
    return Inputs(q, k, v, seqlens, table, d**-0.5)


def prepare_leanattn(shape: Shape, x: Inputs) -> Callable[[], torch.Tensor]:
    out = torch.empty_like(x.q)

    def run() -> torch.Tensor:
        leanattn.decode(x.q, x.k, x.v, x.seqlens, block_table=x.block_table, out=out)
        return out[:, 0]

    return run


def capture_cuda_graph(step: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm ``step`` up (compile, workspace) on the current and a side stream, then capture it.
    Returns the graph and what the captured call returned (its output tensors, refreshed by
    every replay)."""
    step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = step()
    return graph, result


def prepare_leanattn_graph(shape: Shape, x: Inputs) -> Callable[[], torch.Tensor]:
    """leanattn captured in a CUDA graph; timing the replay leaves out host launch overhead."""
    if shape.kv_bytes > 256 * 2**20:
        raise Unsupported("graph rows only for KV <= 256 MiB")
    graph, res = capture_cuda_graph(prepare_leanattn(shape, x))

    def replay() -> torch.Tensor:
        graph.replay()
        return res

    return replay


def _contiguous_only(shape: Shape) -> None:
    if shape.page_size:
        raise Unsupported("contiguous cache only")


def _sdpa(backend_name: str):
    def prepare(shape: Shape, x: Inputs) -> Callable[[], torch.Tensor]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        _contiguous_only(shape)
        if shape.ragged:
            raise Unsupported("no per-sequence lengths")
        backend = getattr(SDPBackend, backend_name)
        q, k, v = x.q.transpose(1, 2), x.k.transpose(1, 2), x.v.transpose(1, 2)
        gqa = shape.q_heads != shape.kv_heads

        def run() -> torch.Tensor:
            with sdpa_kernel(backend):
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=x.scale, enable_gqa=gqa)
            return o[:, :, 0]

        try:
            run()
        except RuntimeError as e:
            raise Unsupported(_reason("refused", e, 80)) from e
        return run

    return prepare


_FLEX: dict = {}


def prepare_flex(shape: Shape, x: Inputs) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    _contiguous_only(shape)
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    q, k, v = x.q.transpose(1, 2), x.k.transpose(1, 2), x.v.transpose(1, 2)
    block_mask = None
    if shape.ragged:
        lens = x.seqlens

        def live(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]

        block_mask = create_block_mask(live, shape.batch, None, 1, k.shape[2], device=q.device)

    def run() -> torch.Tensor:
        o = _FLEX["fn"](q, k, v, block_mask=block_mask, scale=x.scale, enable_gqa=shape.q_heads != shape.kv_heads)
        return o[:, :, 0]

    try:
        run()
    except Exception as e:  # compile and lowering errors come in many types
        raise Unsupported(_reason(f"error: {type(e).__name__}", e, 60)) from e
    return run


def flashinfer_pages(shape: Shape, xs: list[Inputs]) -> tuple:
    """FlashInfer's paged view of the caches of ``xs`` (which share lengths and block table):
    (page_size, [(k_pages, v_pages) per input], block table, indices, indptr, last_page_len).
    A contiguous cache is seen as pages of 16 tokens: a view, no copy."""
    x0 = xs[0]
    dev = x0.q.device
    if shape.page_size:
        ps, table = shape.page_size, x0.block_table
        kvs = [(x.k, x.v) for x in xs]
    else:
        ps = 16
        n = x0.k.shape[1]
        if n % ps:
            raise Unsupported("cache_len not a multiple of 16")
        kvs = [(x.k.view(-1, ps, shape.kv_heads, shape.head_dim), x.v.view(-1, ps, shape.kv_heads, shape.head_dim))
               for x in xs]
        table = torch.arange(shape.batch * n // ps, device=dev, dtype=torch.int32).view(shape.batch, -1)
    pages = [-(-length // ps) for length in shape.lens]
    indices = torch.cat([table[i, :p] for i, p in enumerate(pages)])
    indptr = torch.tensor([0] + pages, device=dev, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    last = torch.tensor([length - (p - 1) * ps for length, p in zip(shape.lens, pages)], dtype=torch.int32, device=dev)
    return ps, kvs, table, indices, indptr, last


# FlashInfer 0.5.0's tensor-core decode ran into an illegal memory access at head dim 80 on an
# H200 (which leaves the process's CUDA context unusable, so every later row would fail), and
# refused 32, 192 and 512 with an error: it is run only at the head dims where it gave results.
FLASHINFER_TC_HEAD_DIMS = (64, 128, 256)


def refuse_flashinfer_head_dim(shape: Shape, tensor_cores: bool) -> None:
    """Raise Unsupported for a head dim FlashInfer's tensor-core decode must not be run at."""
    if tensor_cores and shape.head_dim not in FLASHINFER_TC_HEAD_DIMS:
        raise Unsupported(f"tensor-core decode at head dim {shape.head_dim} (runs at {FLASHINFER_TC_HEAD_DIMS} only)")


def _flashinfer(tensor_cores: bool):
    def prepare(shape: Shape, x: Inputs) -> Callable[[], torch.Tensor]:
        try:
            import flashinfer
        except ImportError as e:
            raise Unsupported("flashinfer not installed") from e
        refuse_flashinfer_head_dim(shape, tensor_cores)
        ps, ((k, v),), table, indices, indptr, last = flashinfer_pages(shape, [x])
        workspace = torch.zeros(256 * 2**20, dtype=torch.uint8, device=x.q.device)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=tensor_cores)
        try:
            wrapper.plan(indptr, indices, last, shape.q_heads, shape.kv_heads, shape.head_dim, ps,
                         q_data_type=shape.dtype, kv_data_type=shape.dtype, sm_scale=x.scale)
            q = x.q[:, 0]
            out = torch.empty_like(q)

            def run() -> torch.Tensor:
                wrapper.run(q, (k, v), out=out)
                return out

            run()
        except Exception as e:  # JIT or shape errors
            raise Unsupported(_reason(f"error: {type(e).__name__}", e, 60)) from e
        run.keep = (workspace, k, v, indices, indptr, last)  # type: ignore[attr-defined]
        return run

    return prepare


def prepare_fa2_varlen(shape: Shape, x: Inputs) -> Callable[[], torch.Tensor]:
    """FlashAttention-2 varlen through aten, on K/V packed end to end (packing not timed)."""
    _contiguous_only(shape)
    if not shape.ragged:
        raise Unsupported("ragged batches only")
    k = torch.cat([x.k[i, :n] for i, n in enumerate(shape.lens)])
    v = torch.cat([x.v[i, :n] for i, n in enumerate(shape.lens)])
    dev = x.q.device
    cu_q = torch.arange(shape.batch + 1, dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, *shape.lens], dtype=torch.int64, device=dev).cumsum(0).to(torch.int32)
    q = x.q[:, 0]

    def run() -> torch.Tensor:
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, 1, max(shape.lens), 0.0, False, False, scale=x.scale
        )[0]

    try:
        run()
    except RuntimeError as e:
        raise Unsupported(_reason("refused", e, 80)) from e
    return run


METHODS: dict[str, Callable[[Shape, Inputs], Callable[[], torch.Tensor]]] = {
    "leanattn": prepare_leanattn,
    "leanattn_graph": prepare_leanattn_graph,
    "sdpa_flash": _sdpa("FLASH_ATTENTION"),
    "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"),
    "flex": prepare_flex,
    "flashinfer": _flashinfer(False),
    "flashinfer_tc": _flashinfer(True),
    "fa2_varlen": prepare_fa2_varlen,
}
# Methods that are leanattn itself, not peers.
OWN = ("leanattn", "leanattn_graph")
