"""Serving mode: every method as an engine runs it, one CUDA graph replaying a decode step.

A decode step calls attention once per layer with the same lengths (and block table), each layer
on its own KV cache. Here a step is ``layers`` such calls, each layer with its own q, K and V
(together at least 512 MiB, so the cache cannot stay in L2), captured in one CUDA graph the way
an engine captures it: leanattn plans inside the graph and runs every layer from the plan;
FlashInfer plans on the host before capture (its plan is a host function) and runs inside; SDPA
is called per layer. A plain-read floor (a Triton kernel that only streams each layer's K and V
bytes) is captured the same way. Times are per call: replay time over ``layers``.

Host cost per call is the wall time of back-to-back eager calls of one layer, no sync, over
their number: what a call costs the CPU when nothing is captured.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import triton
import triton.language as tl

import leanattn

from .peers import Inputs, Unsupported, _reason, capture_cuda_graph, flashinfer_pages, make_inputs
from .shapes import Shape, parse_shape

__all__ = ["SERVING_METHODS", "layer_count", "run_serving_shape", "serving_suite"]

# Bytes a replay touches at least (K+V of all its layers), so nothing stays in L2.
_MIN_STEP_BYTES = 512 * 2**20

# Tensor-parallel shards, as an engine sees them per GPU: 8/1 or 32/8 heads, batch 1-64,
# contexts 2k-128k, 16-256 MiB of KV per call; each also paged (page 16).
_SERVING = """
1x32k@8/1 1x4k@32/8 4x8k@8/1 1x128k@8/1 64x2k@8/1 1x32k@32/8 8x8k@32/8 16x4k@64/8
"""


def serving_suite(paged: bool = True) -> list[Shape]:
    """The TP-shard shapes, contiguous and (with ``paged``) with pages of 16 tokens."""
    shapes = [parse_shape(s) for s in _SERVING.split()]
    return shapes + ([replace(s, page_size=16) for s in shapes] if paged else [])


def layer_count(shape: Shape) -> int:
    """Layers per captured step: enough that a replay reads >= 512 MiB, 4 to 32."""
    return max(4, min(32, math.ceil(_MIN_STEP_BYTES / shape.kv_bytes)))


@dataclass
class Layers:
    """Per-layer inputs of one step: layer 0's lengths and block table are every layer's.
    q is (batch, q_len, q_heads, head_dim); K and V are fp8 for ``:fp8`` shapes (scale 1)."""

    xs: list[Inputs]
    sinks: torch.Tensor | None = None
    scales: list[dict] | None = None  # each layer's k_scale and v_scale tensors (``scales=``)

    @property
    def first(self) -> Inputs:
        return self.xs[0]

    def features(self, shape: Shape, layer: int = 0) -> dict:
        """The feature arguments of ``leanattn.decode`` (and the reference) for ``shape``'s
        ``layer``."""
        kw: dict = dict(self.scales[layer]) if self.scales else {}
        if shape.window >= 0:
            kw["window_size"] = (shape.window, -1)
        if shape.softcap:
            kw["softcap"] = shape.softcap
        if self.sinks is not None:
            kw["sinks"] = self.sinks
        return kw


def make_layers(shape: Shape, device: torch.device, layers: int) -> Layers:
    """``layers`` layers of random q, K and V sharing one set of lengths and one block table."""
    x0 = make_inputs(shape, device, seed=0)
    gen = torch.Generator(device=device)
    kv_dtype = torch.float8_e4m3fn if shape.fp8 else shape.dtype
    xs = []
    for layer in range(layers):
        gen.manual_seed(layer)

        def rnd(t: torch.Tensor, *lead: int) -> torch.Tensor:
            return torch.randn(*(lead or t.shape), device=device, dtype=shape.dtype, generator=gen)

        q = rnd(x0.q, shape.batch, shape.q_len, shape.q_heads, shape.head_dim)
        k, v = (x0.k, x0.v) if layer == 0 else (rnd(x0.k), rnd(x0.v))
        xs.append(Inputs(q, k.to(kv_dtype), v.to(kv_dtype), x0.seqlens, x0.block_table, x0.scale))
    sinks = None
    if shape.sinks:
        sinks = torch.randn(shape.q_heads, device=device, generator=gen, dtype=torch.float32)
    scales = None
    if shape.scales:
        lead = {"head": (), "seq": (shape.batch,), "token": tuple(x0.k.shape[:2])}[shape.scales]

        def draw() -> torch.Tensor:  # scales around 1 (the cache holds N(0, 1) values)
            return torch.rand(*lead, shape.kv_heads, device=device, generator=gen) + 0.5

        scales = [{"k_scale": draw(), "v_scale": draw()} for _ in xs]
    return Layers(xs, sinks, scales)


# A method builds, from the shape and its layers, (step, one_call): ``step`` runs the whole step
# (what is captured) and returns the last layer's output (batch, q_heads, head_dim); ``one_call``
# runs one layer eagerly, for the host cost.
Prepared = tuple[Callable[[], torch.Tensor], Callable[[], object]]


def invariance(shape: Shape) -> dict:
    """leanattn's batch-invariant arguments for ``shape`` (none without ``split=``)."""
    return {"batch_invariant": True, "split_size": shape.split} if shape.split else {}


def leanattn_step(shape: Shape, ls: Layers, config: leanattn.KernelConfig | None = None) -> Prepared:
    """``DecodeWrapper`` planned once per step and run per layer (with ``config``, if given);
    ``step.wrapper`` is the wrapper."""
    x0 = ls.first
    w = leanattn.DecodeWrapper(shape.q_heads, shape.kv_heads, shape.head_dim, shape.dtype, x0.q.device,
                               kv_dtype=x0.k.dtype, max_q_len=shape.q_len, config=config, **invariance(shape))
    capacity = x0.k.shape[1] * (x0.block_table.shape[1] if x0.block_table is not None else 1)
    outs = [torch.empty_like(x.q) for x in ls.xs]
    features = [ls.features(shape, i) for i in range(len(ls.xs))]
    window = (-1, -1)
    for f in features:
        window = f.pop("window_size", window)

    def step() -> torch.Tensor:
        w.plan(x0.seqlens, capacity, q_len=shape.q_len, window_size=window)
        for x, out, f in zip(ls.xs, outs, features):
            w.run(x.q, x.k, x.v, block_table=x.block_table, out=out, **f)
        return outs[-1]

    def one_call() -> None:
        w.run(x0.q, x0.k, x0.v, block_table=x0.block_table, out=outs[0], **features[0])

    step.wrapper = w  # type: ignore[attr-defined]
    return step, one_call


def _leanattn_decode(shape: Shape, ls: Layers) -> Prepared:
    """The one-shot ``leanattn.decode`` per layer (each call locates its own share)."""
    outs = [torch.empty_like(x.q) for x in ls.xs]
    features = [ls.features(shape, i) | invariance(shape) for i in range(len(ls.xs))]

    def call(x: Inputs, out: torch.Tensor, f: dict) -> None:
        leanattn.decode(x.q, x.k, x.v, x.seqlens, block_table=x.block_table, out=out, **f)

    def step() -> torch.Tensor:
        for x, out, f in zip(ls.xs, outs, features):
            call(x, out, f)
        return outs[-1]

    return step, lambda: call(ls.first, outs[0], features[0])


def _sdpa(backend_name: str):
    def prepare(shape: Shape, ls: Layers) -> Prepared:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if shape.page_size:
            raise Unsupported("contiguous cache only")
        if shape.ragged:
            raise Unsupported("no per-sequence lengths")
        if shape.fp8 or shape.softcap or shape.sinks:  # (fp8 covers scales=)
            raise Unsupported("no fp8 cache, softcap or sinks")
        backend = getattr(SDPBackend, backend_name)
        gqa = shape.q_heads != shape.kv_heads
        views = [(x.q.transpose(1, 2), x.k.transpose(1, 2), x.v.transpose(1, 2)) for x in ls.xs]
        scale = ls.first.scale
        sdpa = torch.nn.functional.scaled_dot_product_attention
        mask = None
        if shape.q_len > 1 or shape.window >= 0:
            # An explicit bottom-right causal (and window) mask: SDPA's is_causal aligns top-left.
            n = ls.first.k.shape[1]
            query = torch.arange(shape.q_len, device=ls.first.q.device)[:, None] + n - shape.q_len
            key = torch.arange(n, device=ls.first.q.device)[None, :]
            keep = key <= query
            if shape.window >= 0:
                keep &= key >= query - shape.window
            mask = keep[None, None]

        def step() -> torch.Tensor:
            with sdpa_kernel(backend):
                for q, k, v in views:
                    o = sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
            return o.transpose(1, 2)

        def one_call() -> None:
            q, k, v = views[0]
            sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)

        try:
            step()
        except RuntimeError as e:
            raise Unsupported(_reason("refused", e, 80)) from e
        # The backend is chosen once around the timed loop, as an engine would configure it.
        one_call.context = lambda: sdpa_kernel(backend)  # type: ignore[attr-defined]
        return step, one_call

    return prepare


def _flashinfer(tensor_cores: bool):
    def prepare(shape: Shape, ls: Layers) -> Prepared:
        try:
            import flashinfer
        except ImportError as e:
            raise Unsupported("flashinfer not installed") from e
        if shape.sinks or shape.scales:
            raise Unsupported("no attention sinks or fp8 scale tensors")
        x0 = ls.first
        dev = x0.q.device
        ps, kvs, table, indices, indptr, last = flashinfer_pages(shape, ls.xs)
        workspace = torch.zeros(128 * 2**20, dtype=torch.uint8, device=dev)
        opts = dict(q_data_type=shape.dtype, kv_data_type=x0.k.dtype, sm_scale=x0.scale,
                    window_left=shape.window, logits_soft_cap=shape.softcap or None)
        if shape.split:
            if not tensor_cores or shape.q_len > 1 or shape.split % ps:
                raise Unsupported("fixed split: tensor-core decode of one query token, whole pages")
            opts["fixed_split_size"] = shape.split // ps  # in pages
        try:
            if shape.q_len == 1:
                wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    workspace, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
                    paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices,
                    paged_kv_last_page_len_buffer=last)
                wrapper.plan(indptr, indices, last, shape.q_heads, shape.kv_heads, shape.head_dim, ps, **opts)
            else:  # several query tokens: the prefill (append) kernel, bottom-right causal
                if not tensor_cores:
                    raise Unsupported("q_len > 1: prefill wrapper (tensor cores) only")
                qo = torch.arange(0, shape.batch + 1, device=dev, dtype=torch.int32) * shape.q_len
                wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
                wrapper.plan(qo, indptr, indices, last, shape.q_heads, shape.kv_heads, shape.head_dim, ps,
                             causal=True, **opts)
            qs = [x.q.reshape(-1, shape.q_heads, shape.head_dim) for x in ls.xs]
            outs = [torch.empty_like(q) for q in qs]

            def step() -> torch.Tensor:
                for q, kv, out in zip(qs, kvs, outs):
                    wrapper.run(q, kv, out=out)
                return outs[-1].view(shape.batch, shape.q_len, shape.q_heads, shape.head_dim)

            def one_call() -> None:
                wrapper.run(qs[0], kvs[0], out=outs[0])

            step()
        except Unsupported:
            raise
        except Exception as e:  # JIT or shape errors
            raise Unsupported(_reason(f"error: {type(e).__name__}", e, 60)) from e
        step.keep = (workspace, indices, indptr, last, table)  # type: ignore[attr-defined]
        return step, one_call

    return prepare


@triton.jit
def _read_kernel(X, Y, n_per, n, BLOCK: tl.constexpr):
    """Program p sums elements [p * n_per, (p + 1) * n_per) of X (bounded by n), BLOCK at a time."""
    pid = tl.program_id(0)
    lo = pid.to(tl.int64) * n_per
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, n_per, BLOCK):
        offs = lo + i + tl.arange(0, BLOCK)
        acc += tl.load(X + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(Y + pid, tl.sum(acc, 0))


def _floor(shape: Shape, ls: Layers) -> Prepared:
    """A plain streaming read of each layer's K and V bytes (kv_bytes per call, nothing else)."""
    dev = ls.first.q.device
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    programs, block = 4 * sms, 4096
    half = shape.kv_bytes // 2 // ls.first.k.element_size()  # elements of K (and of V) to read
    y = torch.empty(2 * programs, dtype=torch.float32, device=dev)
    flats = [(x.k.reshape(-1)[:half], x.v.reshape(-1)[:half]) for x in ls.xs]
    n_per = -(-half // programs // block) * block

    def call(k: torch.Tensor, v: torch.Tensor) -> None:
        _read_kernel[(programs,)](k, y, n_per, half, BLOCK=block, num_warps=8)
        _read_kernel[(programs,)](v, y[programs:], n_per, half, BLOCK=block, num_warps=8)

    def step() -> torch.Tensor:
        for k, v in flats:
            call(k, v)
        return y

    return step, lambda: call(*flats[0])


SERVING_METHODS: dict[str, Callable[[Shape, Layers], Prepared]] = {
    "leanattn": leanattn_step,
    "leanattn_decode": _leanattn_decode,
    "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa_flash": _sdpa("FLASH_ATTENTION"),
    "flashinfer": _flashinfer(False),
    "flashinfer_tc": _flashinfer(True),
    "read_floor": _floor,
}
# Not peers: leanattn itself and the floor.
NOT_PEERS = ("leanattn", "leanattn_decode", "read_floor")


def host_us(one_call: Callable[[], object], calls: int = 200) -> float:
    """Wall microseconds per call of ``calls`` back-to-back eager calls, no sync between them."""
    ctx = getattr(one_call, "context", None)
    with ctx() if ctx else contextlib.nullcontext():
        for _ in range(10):
            one_call()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            one_call()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def run_serving_shape(shape: Shape, methods: list[str], device: torch.device, bench: Callable) -> list[dict]:
    """Rows for one shape: per-call µs in graph replay, host µs, error of the last layer.
    ``bench(fn)`` times ``fn`` in milliseconds."""
    layers = layer_count(shape)
    ls = make_layers(shape, device, layers)
    last = ls.xs[-1]
    kw = {"block_table": last.block_table} if last.block_table is not None else {}
    ref = leanattn.reference.decode(last.q.float(), last.k, last.v, last.seqlens, compute_dtype=torch.float32,
                                    **kw, **ls.features(shape, layers - 1))
    rows = []
    for method in methods:
        row = {"shape": shape.name, "family": shape.family, "ctx": max(shape.lens), "method": method,
               "kv_bytes": shape.kv_bytes, "layers": layers, "mode": "graph"}
        try:
            step, one_call = SERVING_METHODS[method](shape, ls)
            graph, result = capture_cuda_graph(step)
            graph.replay()
            torch.cuda.synchronize()
            if method != "read_floor":
                out = result.reshape(ref.shape).float()
                row["rel_err"] = ((out - ref).norm() / ref.norm()).item() if torch.isfinite(out).all() else math.inf
            row["ms"] = bench(graph.replay) / layers
            row["gbs"] = shape.kv_bytes / (row["ms"] * 1e-3) / 1e9
            row["host_us"] = host_us(one_call)
            if method == "leanattn":
                row["direct_launch"] = bool(step.wrapper.compiled_kernels)  # type: ignore[attr-defined]
            del graph, result, step, one_call
        except Unsupported as e:
            row["status"] = str(e)
        rows.append(row)
    del ls, ref
    torch.cuda.empty_cache()
    return rows


def serving_markdown(record: dict) -> str:
    """The serving table: µs per call in graph replay for every method, speedup over the best
    peer, the floor, and host µs per eager call."""
    by_shape: dict[str, dict[str, dict]] = {}
    for row in record["rows"]:
        by_shape.setdefault(row["shape"], {})[row["method"]] = row
    methods = list(dict.fromkeys(r["method"] for r in record["rows"]))
    cols = ["shape", "KV MiB", "layers"] + [f"{m} µs" for m in methods] + ["vs best peer", "host µs: " + ", ".join(methods)]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    speedups = []
    for shape, rows in by_shape.items():
        first = next(iter(rows.values()))
        cells = [f"`{shape}`", f"{first['kv_bytes'] / 2**20:.0f}", str(first["layers"])]
        for m in methods:
            r = rows.get(m, {})
            cells.append(f"{r['ms'] * 1e3:.1f}" if "ms" in r else f"({r.get('status', 'not run')})")
        own = rows.get("leanattn", {}).get("ms")
        peers = [r["ms"] for m, r in rows.items() if m not in NOT_PEERS and "ms" in r]
        speed = min(peers) / own if own and peers else None
        if speed:
            speedups.append(speed)
        cells.append(f"{speed:.2f}" if speed else "–")
        cells.append(" / ".join(f"{rows[m]['host_us']:.1f}" if "host_us" in rows.get(m, {}) else "–" for m in methods))
        out.append("| " + " | ".join(cells) + " |")
    if speedups:
        gm = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        out.append(f"\nGeometric mean over the best peer: {gm:.2f}x over {len(speedups)} shapes; minimum {min(speedups):.2f}x.")
    return "\n".join(out) + "\n"
