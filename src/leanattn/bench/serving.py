"""Serving mode: every method as an engine runs it, one CUDA graph replaying a decode step.

A decode step calls attention once per layer with the same lengths (and block table), each layer
on its own KV cache. Here a step is ``layers`` such calls, each layer with its own q, K and V
(together at least 512 MiB, so the cache cannot stay in L2), captured in one CUDA graph the way
an engine captures it: leanattn plans inside the graph and runs every layer from the plan;
FlashInfer plans on the host before capture (its plan is a host function) and runs inside; SDPA
is called per layer. A plain-read floor (a Triton kernel that only streams each layer's K and V
bytes) is captured the same way. Times are per call: replay time over ``layers``; the methods take
turns over rounds and each reports its median round (``leanattn.bench.rounds``).

Two patterns: ``append`` (the default), where before each layer's attention a small kernel writes
that layer's newest K/V token and a fresh q (``leanattn.bench.append``) and every method's output
is checked to include them, as in a model step; and ``plain``, the layers' attention back to back.
Under ``append`` the per-call time includes the append kernel's (each row also has ``append_us``,
the appends alone replayed the same way).

Host cost per call is the wall time of back-to-back eager calls of one layer, no sync, over
their number: what a call costs the CPU when nothing is captured.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
import triton
import triton.language as tl

import leanattn

from .append import AppendNotSeen, check_seen, launch_append, make_appends, token_rows
from .peers import Inputs, Unsupported, _reason, capture_cuda_graph, flashinfer_pages, make_inputs, refuse_flashinfer_head_dim
from .rounds import bench_round, host_us, median_round, take_turns
from .shapes import Shape

__all__ = ["PATTERNS", "SERVING_METHODS", "Prepared", "layer_count", "make_step", "run_serving_shape"]

PATTERNS = ("append", "plain")

# Bytes a replay touches at least (K+V of all its layers), so nothing stays in L2.
_MIN_STEP_BYTES = 512 * 2**20

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


@dataclass
class Prepared:
    """A method ready to run a decode step: ``layer(i)`` runs layer i's attention and returns its
    output (batch, q_len, q_heads, head_dim; the floor returns its sums); ``begin()``, if any,
    runs once per step before the layers (leanattn's plan); ``one_call()`` runs layer 0 eagerly,
    for the host cost, inside ``context()`` if given; ``wrapper``: leanattn's DecodeWrapper;
    ``keep``: what must live as long as the graph."""

    layer: Callable[[int], torch.Tensor]
    one_call: Callable[[], object]
    begin: Callable[[], object] | None = None
    context: Callable[[], object] | None = None
    wrapper: leanattn.DecodeWrapper | None = None
    keep: tuple = field(default_factory=tuple)


def make_step(prepared: Prepared, layers: int, append: Callable[[int], None] | None = None) -> Callable[[], torch.Tensor]:
    """One decode step of ``layers`` layers (what is captured): ``begin``, then per layer
    ``append(i)`` (if given) and the layer's attention. Returns the last layer's output."""

    def step() -> torch.Tensor:
        if prepared.begin is not None:
            prepared.begin()
        for i in range(layers):
            if append is not None:
                append(i)
            out = prepared.layer(i)
        return out

    return step


def invariance(shape: Shape) -> dict:
    """leanattn's batch-invariant arguments for ``shape`` (none without ``split=``)."""
    return {"batch_invariant": True, "split_size": shape.split} if shape.split else {}


def leanattn_step(shape: Shape, ls: Layers, config: leanattn.KernelConfig | None = None,
                  num_programs: int | None = None) -> Prepared:
    """``DecodeWrapper`` planned once per step and run per layer (with ``config`` and
    ``num_programs``, if given)."""
    x0 = ls.first
    w = leanattn.DecodeWrapper(shape.q_heads, shape.kv_heads, shape.head_dim, shape.dtype, x0.q.device,
                               kv_dtype=x0.k.dtype, max_q_len=shape.q_len, config=config, num_programs=num_programs,
                               paged=x0.block_table is not None, **invariance(shape))
    capacity = x0.k.shape[1] * (x0.block_table.shape[1] if x0.block_table is not None else 1)
    outs = [torch.empty_like(x.q) for x in ls.xs]
    features = [ls.features(shape, i) for i in range(len(ls.xs))]
    window = (-1, -1)
    for f in features:
        window = f.pop("window_size", window)

    def begin() -> None:
        w.plan(x0.seqlens, capacity, q_len=shape.q_len, window_size=window)

    def layer(i: int) -> torch.Tensor:
        x = ls.xs[i]
        w.run(x.q, x.k, x.v, block_table=x.block_table, out=outs[i], **features[i])
        return outs[i]

    return Prepared(layer, lambda: layer(0), begin=begin, wrapper=w)


def _leanattn_decode(shape: Shape, ls: Layers) -> Prepared:
    """The one-shot ``leanattn.decode`` per layer (each call locates its own share)."""
    outs = [torch.empty_like(x.q) for x in ls.xs]
    features = [ls.features(shape, i) | invariance(shape) for i in range(len(ls.xs))]

    def layer(i: int) -> torch.Tensor:
        x = ls.xs[i]
        leanattn.decode(x.q, x.k, x.v, x.seqlens, block_table=x.block_table, out=outs[i], **features[i])
        return outs[i]

    return Prepared(layer, lambda: layer(0))


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

        def call(i: int) -> torch.Tensor:
            q, k, v = views[i]
            return sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa).transpose(1, 2)

        def layer(i: int) -> torch.Tensor:
            with sdpa_kernel(backend):
                return call(i)

        try:
            layer(0)
        except RuntimeError as e:
            raise Unsupported(_reason("refused", e, 80)) from e
        # The backend is chosen once around the timed eager loop, as an engine would configure it.
        return Prepared(layer, lambda: call(0), context=lambda: sdpa_kernel(backend))

    return prepare


def _flashinfer(tensor_cores: bool):
    def prepare(shape: Shape, ls: Layers) -> Prepared:
        try:
            import flashinfer
        except ImportError as e:
            raise Unsupported("flashinfer not installed") from e
        if shape.sinks or shape.scales:
            raise Unsupported("no attention sinks or fp8 scale tensors")
        refuse_flashinfer_head_dim(shape, tensor_cores)
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

            def layer(i: int) -> torch.Tensor:
                wrapper.run(qs[i], kvs[i], out=outs[i])
                return outs[i].view(shape.batch, shape.q_len, shape.q_heads, shape.head_dim)

            layer(0)
        except Unsupported:
            raise
        except Exception as e:  # JIT or shape errors
            raise Unsupported(_reason(f"error: {type(e).__name__}", e, 60)) from e
        return Prepared(layer, lambda: layer(0), keep=(workspace, indices, indptr, last, table))

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

    def layer(i: int) -> torch.Tensor:
        k, v = flats[i]
        _read_kernel[(programs,)](k, y, n_per, half, BLOCK=block, num_warps=8)
        _read_kernel[(programs,)](v, y[programs:], n_per, half, BLOCK=block, num_warps=8)
        return y

    return Prepared(layer, lambda: layer(0))


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


def run_serving_shape(shape: Shape, methods: list[str], device: torch.device, pattern: str = "append",
                      rounds: int = 5, bench: Callable[[Callable[[], object]], float] = bench_round) -> list[dict]:
    """Rows for one shape: per-call µs in graph replay (each method's median of ``rounds`` rounds
    in which the methods take turns; ``bench(fn)`` times ``fn`` in milliseconds), host µs, and the
    error of the last layer's output. With ``pattern`` "append", each row's ``status`` says
    "FAILED: ..." (and it has no time) when its output misses the appended token."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
    layers = layer_count(shape)
    ls = make_layers(shape, device, layers)
    appends = make_appends(shape, ls.xs) if pattern == "append" else None
    append = None if appends is None else (lambda i: launch_append(shape, ls.xs[i], appends.fresh[i]))
    refs = _references(shape, ls, appends)
    rows, ready = {}, {}
    for method in methods:
        row = {"shape": shape.name, "family": shape.family, "ctx": max(shape.lens), "method": method,
               "kv_bytes": shape.kv_bytes, "layers": layers, "mode": "graph", "pattern": pattern}
        rows[method] = row
        try:
            prepared = SERVING_METHODS[method](shape, ls)
            graph, result = capture_cuda_graph(make_step(prepared, layers, append))
            if appends is not None:  # the checked replay must write the new tokens itself
                for x, stale in zip(ls.xs, appends.stale):
                    launch_append(shape, x, stale)
            graph.replay()
            torch.cuda.synchronize()
            if method != "read_floor":
                if appends is None:
                    row["rel_err"] = _rel_err(result, refs[0])
                else:
                    row["rel_err"], row["rel_err_without_append"] = check_seen(method, result, *refs)
            if method == "leanattn":
                row["direct_launch"] = bool(prepared.wrapper.compiled_kernels)
            ready[method] = (graph, result, prepared)
        except Unsupported as e:
            row["status"] = str(e)
        except AppendNotSeen as e:
            row["status"] = f"FAILED: {e}"
            print(f"{shape.name}: {row['status']}", file=sys.stderr)
    names = list(ready)
    times = take_turns(names, rounds, lambda m: bench(ready[m][0].replay) / layers)
    hosts = take_turns(names, rounds, lambda m: host_us(ready[m][2].one_call, context=ready[m][2].context))
    append_us = _append_us(shape, ls, appends, bench) if appends is not None and names else None
    for m in names:
        row = rows[m]
        row["ms"] = median_round(times[m])
        row["round_ms"] = times[m]
        row["gbs"] = shape.kv_bytes / (row["ms"] * 1e-3) / 1e9
        row["host_us"] = median_round(hosts[m])
        if append_us is not None:
            row["append_us"] = append_us
    del ready, ls, refs
    torch.cuda.empty_cache()
    return list(rows.values())


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.reshape(ref.shape).float()
    return ((out - ref).norm() / ref.norm()).item() if torch.isfinite(out).all() else math.inf


def _reference(shape: Shape, ls: Layers, layer: int, q: torch.Tensor) -> torch.Tensor:
    """float32 attention of ``q`` over layer ``layer``'s cache as it is now."""
    x = ls.xs[layer]
    kw = {"block_table": x.block_table} if x.block_table is not None else {}
    return leanattn.reference.decode(q.float(), x.k, x.v, x.seqlens, compute_dtype=torch.float32, **kw,
                                     **ls.features(shape, layer))


def _references(shape: Shape, ls: Layers, appends) -> tuple[torch.Tensor, ...]:
    """The last layer's reference outputs: (as the inputs are,) for the plain pattern; (with the
    appended token, with the fresh q but the stale token) for the append pattern, which leaves
    the last layer as the replays will (the fresh token in place). Raises RuntimeError when the
    append kernel did not write the token."""
    last = len(ls.xs) - 1
    x = ls.xs[last]
    if appends is None:
        return (_reference(shape, ls, last, x.q),)
    q, k, v = appends.fresh[last]
    _, stale_k, stale_v = appends.stale[last]
    launch_append(shape, x, (q, stale_k, stale_v))
    without = _reference(shape, ls, last, q)
    launch_append(shape, x, (q, k, v))
    got_k, got_v, live = token_rows(shape, x)
    written = [torch.equal(got[live].float(), want.to(x.k.dtype)[live].float()) for got, want in ((got_k, k), (got_v, v))]
    if not all(written) or not torch.equal(x.q, q):
        raise RuntimeError(f"{shape.name}: the append kernel did not write the new token into the cache and q")
    return _reference(shape, ls, last, q), without


def _append_us(shape: Shape, ls: Layers, appends, bench: Callable) -> float:
    """Microseconds per layer of the append kernels alone, replayed from a graph as in a step."""
    def step() -> None:
        for x, token in zip(ls.xs, appends.fresh):
            launch_append(shape, x, token)

    graph, _ = capture_cuda_graph(step)
    return median_round([bench(graph.replay) for _ in range(3)]) / len(ls.xs) * 1e3
