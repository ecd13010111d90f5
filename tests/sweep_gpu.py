#!/usr/bin/env python3
"""Randomized sweep of ``leanattn.decode`` and ``DecodeWrapper`` against the reference.

From the repository root, on a GPU::

    PYTHONPATH=$PWD/src python tests/sweep_gpu.py --cases 10000 --seed 0 --out sweep.json
    PYTHONPATH=$PWD/src python tests/sweep_gpu.py --seed 0 --case 1234   # re-run one case

Triton compiles one kernel per combination of compile-time parameters (head_dim, group, dtype,
page size, lengths/leftpad given, return_lse, planned or not) and of the classes it specialises
integer arguments and pointers on (an int equal to 1, or divisible by 16; a pointer 16-byte
aligned), which costs seconds each on the GPU. So the seed first draws a fixed pool of kernel
*variants* (every value of every such axis in at least one), and each case takes one of them and
draws only runtime parameters within it: batch, lengths, kv heads, grid size, cache strides, views,
check mode, CUDA-graph capture, window sizes, soft-cap values, sink logits, fp8 scales. Case
``i`` of seed ``S`` is drawn from ``(S, i)`` alone, so ``--case i`` reproduces it without running
the others. The model features are compile-time axes too: q_len (1 to 16), an fp8 cache (e4m3,
e5m2) and the kinds of its K and V scales (per kv head, per sequence and kv head, per token), a
sliding window, causal or not, soft-capping and attention sinks; and who merges the heads that
shares cut (the heuristic's choice, or the merge kernel or the last arrivers' tree forced through
``KernelConfig.merge_kernel``). Per-token scales span 1e-3..10
(engines' amax / 448 scales are small), and their rows that no call reads hold NaN.

Every case writes into a NaN-poisoned output (a view inside a larger NaN buffer whose margins must
stay NaN) and is checked per sequence against ``leanattn.reference.decode`` in float32: rows of
empty sequences exactly zero, every other row finite and within the tolerances of
``tests/_util.py``, the LSE's ``-inf`` pattern equal and its values close. A few paged cases put an
out-of-range page id in a live slot: the rows that attend to it must be NaN (output and LSE), the
others right.

Prints progress every 1000 cases and a one-line summary; writes the summary and every failure
(its parameters and the command that re-runs it) to ``--out``; exits 1 on any failure. Without a
GPU it runs under the Triton interpreter (slow: use ``--max-len``/``--max-batch`` and few cases;
no CUDA graphs there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for _util when run as a script

import leanattn  # noqa: E402  (sets TRITON_INTERPRET=1 without a GPU, before Triton loads)
from leanattn import choose_config  # noqa: E402

from _util import LSE_TOL, TOL  # noqa: E402

ON_GPU = torch.cuda.is_available()
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
KV_DTYPES = {"same": None, "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# fp8 scale kinds of K and V ("K/V"): per kv head, per (sequence, kv head), per token and kv head.
SCALE_KINDS = ("head/head", "head/head", "seq/token", "token/seq", "token/token", "head/token", "token/head",
               "seq/seq")
# Who merges cut heads (Variant.merge): the heuristic most often, each merge forced in some.
MERGES = ("auto", "auto", "kernel", "tree")
# q_len x group stays within the kernel's 128 rows (groups <= 8); at d=512 (16 rows) a variant's
# q_len is cut to fit its group (draw_pool).
Q_LENS = (1, 1, 1, 2, 4, 16)
HEAD_DIMS = (32, 64, 80, 96, 128, 192, 256, 512)
GROUPS = (1, 2, 4, 5, 7, 8)
# 0: a dense cache (contiguous or strided, drawn per case). Pages of powers of two and not: 3 and
# 24 split the GPU's 64/128-key tiles unevenly, 100 and 129 span more than one.
PAGE_SIZES = (0, 0, 0, 1, 3, 16, 24, 64, 100, 129, 256)
KV_HEADS = (1, 2, 4, 8)
GRIDS = (None, 1, 7, 97, 1000)
# Elements (batch x capacity x kv_heads x head_dim) of one K cache: 64 MiB in 16-bit floats, so K,
# V, their pages and the reference's float32 copies of one sequence stay within a few hundred MiB.
CACHE_ELEMENTS = 2**25
# Page ids written into slots: dead slots hold such garbage (never read); a "bad page" case puts
# one in a live slot. ``None`` stands for num_pages itself, the first id past the cache.
GARBAGE_IDS = (None, -1, 10**6, -(2**31), 2**31 - 1)


@dataclass(frozen=True)
class Variant:
    """What one compiled kernel depends on: its compile-time parameters (the API picks the
    planned kernel or not) and the specialisation classes of the arguments that vary by case."""

    head_dim: int
    group: int
    dtype: str
    page_size: int  # 0: dense cache
    has_seqlens: bool
    leftpad: bool
    return_lse: bool
    api: str  # "decode" or "wrapper"
    # The grid: the workspace's chunk tickets start 4 * num_programs bytes into its ticket
    # buffer, 16-byte aligned for grids that are multiples of 4 ("mult4"; the default grid is one
    # on current GPUs) only.
    grid_class: str  # "mult4" or "odd"
    lse_class: str  # the LSE's row stride q_heads = group * kv_heads: "1", "16" (divisible) or "n"; "-" without LSE
    table_class: str  # the block table's row stride, likewise; "-" for a dense cache
    q_len: int = 1
    kv: str = "same"  # the cache dtype: q's, or an fp8 format (KV_DTYPES)
    window: bool = False  # a sliding window (its sizes drawn per case)
    causal: bool = True
    softcap: bool = False
    sinks: bool = False
    scale_kinds: str = "-"  # fp8: the kinds of K's and V's scales (SCALE_KINDS); "-" otherwise
    # Who merges cut heads: the heuristic ("auto"), the merge kernel or the last arrivers' tree
    # (KernelConfig.merge_kernel).
    merge: str = "auto"

    @property
    def config(self) -> leanattn.KernelConfig | None:
        """The launch config the calls pass: None for the heuristic's, else it with the merge forced."""
        if self.merge == "auto":
            return None
        base = choose_config(self.head_dim, self.kv_dtype, self.q_len * self.group, paged=self.page_size > 0)
        return dataclasses.replace(base, merge_kernel=self.merge == "kernel")

    @property
    def kv_dtype(self) -> torch.dtype:
        return KV_DTYPES[self.kv] or DTYPES[self.dtype]

    @property
    def tile(self) -> int:
        return choose_config(self.head_dim, self.kv_dtype, self.q_len * self.group).tile


def int_class(x: int) -> str:
    """How Triton specialises an int argument: equal to 1, divisible by 16, or neither."""
    return "1" if x == 1 else "16" if x % 16 == 0 else "n"


def grid_class(grid: int | None) -> str:
    return "mult4" if grid is None or grid % 4 == 0 else "odd"


def table_stride(slots: int, cls: str) -> int:
    """A block-table row stride of class ``cls`` for ``slots`` columns (a wider table's slice
    when it exceeds ``slots``); class "1" needs a single slot."""
    if cls == "1":
        return 1
    if cls == "16":
        return -(-slots // 16) * 16
    s = slots
    while s == 1 or s % 16 == 0:
        s += 1
    return s


@dataclass(frozen=True)
class Limits:
    """Ranges of the runtime axes (smaller ones keep interpreter runs short)."""

    max_batch: int = 8
    max_len: int = 4096
    kv_heads: tuple[int, ...] = KV_HEADS
    grids: tuple[int | None, ...] = GRIDS
    variants: int = 40
    graph_every: int = 50  # every graph_every-th case is captured in a CUDA graph (GPU only)
    bad_page_rate: float = 0.05  # of paged, non-graph cases
    check_rate: float = 0.1  # of the other non-graph cases: check=True (must not raise)
    clamp_rate: float = 0.03  # a length over the capacity or a leftpad past its length


@dataclass
class Case:
    """One drawn case: everything needed to build its inputs again."""

    index: int
    variant: Variant
    batch: int
    kv_heads: int
    capacity: int
    lens: list[int]
    leftpad: list[int] | None
    num_programs: int | None
    strided_cache: bool  # dense: (B,Hkv,N,D) transposed; paged: (P,Hkv,page,D) transposed
    q_view: bool  # q a slice of a wider qkv tensor
    table_stride: int  # block_table's row stride: a column slice of a wider table when > slots
    sharp: bool  # q scaled up: peaked softmax
    check: bool
    layers: int  # wrapper: runs per plan, each with its own q
    bad_page: tuple[int, int, int | None] | None  # (sequence, slot, id) put into a live slot
    graph: bool
    replays: list[tuple[list[int], list[int] | None]] = field(default_factory=list)
    data_seed: int = 0
    window_size: list[int] = field(default_factory=lambda: [-1, -1])  # a list: JSON keeps it
    softcap: float = 0.0
    scales: str = "-"  # fp8: per-kv-head scales as a "float" or a "tensor" (other kinds are tensors)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _cycle(values: tuple, n: int, rng: random.Random) -> list:
    """``n`` values cycling through ``values`` (each at least once when n >= len), shuffled."""
    out = [values[i % len(values)] for i in range(n)]
    rng.shuffle(out)
    return out


def draw_pool(seed: int, size: int) -> list[Variant]:
    """The seed's kernel variants: every value of every compile-time axis appears in
    ``size // len(values)`` or more of them (a Latin-hypercube-like draw)."""
    rng = random.Random(f"pool:{seed}")
    columns = [
        _cycle(HEAD_DIMS, size, rng),
        _cycle(GROUPS, size, rng),
        _cycle(tuple(DTYPES), size, rng),
        _cycle(PAGE_SIZES, size, rng),
        _cycle((True,) * 7 + (False,), size, rng),
        _cycle((False, True), size, rng),
        _cycle((False, True), size, rng),
        _cycle(("decode", "wrapper"), size, rng),
        _cycle(("mult4", "odd"), size, rng),
        _cycle(("16", "n", "16", "n", "1"), size, rng),
        _cycle(Q_LENS, size, rng),
        _cycle(tuple(KV_DTYPES) + ("same",), size, rng),
        _cycle((False, False, True), size, rng),
        _cycle((True, True, True, False), size, rng),
        _cycle((False, False, True), size, rng),
        _cycle((False, False, True), size, rng),
    ]
    pool = []
    for d, g, dt, page, seqlens, pad, lse, api, grids, table, q_len, cache, window, causal, cap, sinks in zip(*columns):
        # An LSE stride class that some kv_heads gives this group.
        lse_class = rng.choice(sorted({int_class(g * kv) for kv in KV_HEADS})) if lse else "-"
        q_len = min(q_len, leanattn.max_query_rows(d) // g)
        pool.append(Variant(d, g, dt, page, seqlens, pad, lse, api, grids, lse_class, table if page else "-",
                            q_len, cache, window, causal, cap, sinks))
    # The fp8 variants' scale kinds, cycling through SCALE_KINDS, from a generator of their own
    # (the other axes keep the draws they had before this axis).
    kinds = iter(_cycle(SCALE_KINDS, sum(v.kv != "same" for v in pool), random.Random(f"pool-scales:{seed}")))
    pool = [dataclasses.replace(v, scale_kinds=next(kinds)) if v.kv != "same" else v for v in pool]
    merges = iter(_cycle(MERGES, len(pool), random.Random(f"pool-merges:{seed}")))
    return [dataclasses.replace(v, merge=next(merges)) for v in pool]


def _draw_len(rng: random.Random, tile: int, max_len: int) -> int:
    """A length, often at a tile boundary (0, 1, tile +- 1, k tiles +- 1)."""
    r = rng.random()
    if r < 0.35:
        x = rng.choice([0, 1, tile - 1, tile, tile + 1, 2 * tile - 1, 2 * tile + 1])
    elif r < 0.55:
        x = rng.randint(2, 40) * tile + rng.choice([-1, 0, 1])
    elif r < 0.8:
        x = rng.randint(0, 3 * tile)
    else:
        x = rng.randint(0, max_len)
    return min(max(x, 0), max_len)


def _draw_pads(rng: random.Random, lens: list[int], tile: int) -> list[int]:
    """Left padding within each length: none, up to the length (then empty), or a tile boundary."""
    pads = []
    for n in lens:
        r = rng.random()
        pads.append(0 if r < 0.3 else n if r < 0.4 else min(n, tile) if r < 0.5 else rng.randint(0, n))
    return pads


def draw_case(seed: int, index: int, pool: list[Variant], limits: Limits, graph_ok: bool = ON_GPU) -> Case:
    """Case ``index`` of seed ``seed``: drawn from (seed, index) alone."""
    rng = random.Random(f"case:{seed}:{index}")
    graph = graph_ok and limits.graph_every > 0 and index % limits.graph_every == limits.graph_every // 2
    # A graph case replays new lengths: it needs a variant that takes them.
    choices = [v for v in pool if v.has_seqlens] if graph else pool
    variant = rng.choice(choices)
    tile = variant.tile
    batch = rng.randint(1, limits.max_batch)
    # Runtime values within the variant's classes (any, where the limits leave none).
    kv_heads = rng.choice([kv for kv in limits.kv_heads if not variant.return_lse
                           or int_class(kv * variant.group) == variant.lse_class] or limits.kv_heads)
    grid = rng.choice([g for g in limits.grids if grid_class(g) == variant.grid_class] or limits.grids)
    max_len = max(1, min(limits.max_len, CACHE_ELEMENTS // (batch * kv_heads * variant.head_dim)))
    if variant.table_class == "1":
        max_len = variant.page_size  # one slot a sequence
    if variant.has_seqlens:
        lens = [_draw_len(rng, tile, max_len) for _ in range(batch)]
        capacity = max(max(lens), 1) + rng.choice([0, 0, 1, rng.randint(0, 2 * tile)])
    else:
        capacity = max(1, _draw_len(rng, tile, max_len))
    page = variant.page_size
    if page:
        capacity = -(-capacity // page) * page  # the block table's capacity
        if variant.table_class == "1":
            capacity = page
    if not variant.has_seqlens:
        lens = [capacity] * batch
    pads = _draw_pads(rng, lens, tile) if variant.leftpad else None
    special = rng.random()
    check = bad_page = None
    if not graph and special < limits.clamp_rate and variant.has_seqlens:
        # Documented clamping (check mode would refuse these): a length past the capacity, or a
        # leftpad past its length.
        b = rng.randrange(batch)
        if pads is not None and rng.random() < 0.5:
            pads[b] = min(capacity, lens[b] + rng.randint(1, 2 * tile))
        else:
            lens[b] = capacity + rng.randint(1, 2 * tile)
    elif not graph and page and special < limits.clamp_rate + limits.bad_page_rate:
        live = [b for b in range(batch) if _live(lens, pads, capacity, b)[1] > _live(lens, pads, capacity, b)[0]]
        if live:
            b = rng.choice(live)
            first, end = _live(lens, pads, capacity, b)
            slot = rng.randint(first // page, (end - 1) // page)
            bad_page = (b, slot, rng.choice(GARBAGE_IDS))
    if not graph and bad_page is None and special >= limits.clamp_rate:
        check = rng.random() < limits.check_rate
    replays = []
    if graph:
        for _ in range(2):
            new = [_draw_len(rng, tile, capacity) for _ in range(batch)]
            replays.append((new, _draw_pads(rng, new, tile) if variant.leftpad else None))
    window_size = [-1, -1]
    if variant.window:
        # From no key back (0) to more than the cache; without causal, a bounded or open right side.
        left = rng.choice([0, 1, tile - 1, tile, rng.randint(0, 3 * tile), capacity + rng.randint(0, tile)])
        right = 0 if variant.causal else rng.choice([0, 3, tile, -1])
        window_size = [left, right]
    return Case(
        index=index, variant=variant, batch=batch, kv_heads=kv_heads, capacity=capacity, lens=lens,
        leftpad=pads, num_programs=grid, strided_cache=rng.random() < 0.4, q_view=rng.random() < 0.25,
        table_stride=table_stride(capacity // page, variant.table_class) if page else 0, sharp=rng.random() < 0.2,
        check=bool(check), layers=rng.choice([1, 2]) if variant.api == "wrapper" else 1,
        bad_page=bad_page, graph=graph, replays=replays, data_seed=rng.randrange(2**31),
        window_size=window_size, softcap=rng.choice([1.0, 5.0, 30.0]) if variant.softcap else 0.0,
        scales=rng.choice(["float", "tensor"]) if variant.kv != "same" else "-",
    )


def _live(lens: list[int], pads: list[int] | None, capacity: int, b: int) -> tuple[int, int]:
    """[first, end) of sequence b's keys after the documented clamps."""
    first = 0 if pads is None else min(max(pads[b], 0), capacity)
    return first, min(max(lens[b], first), capacity)


def _live_slots(lens: list[int], pads: list[int] | None, capacity: int, page: int) -> torch.Tensor:
    """Bool (batch, capacity / page): the slots holding some key of their sequence."""
    slots = capacity // page
    start = torch.arange(slots) * page
    bounds = [_live(lens, pads, capacity, b) for b in range(len(lens))]
    first = torch.tensor([f for f, _ in bounds])[:, None]
    end = torch.tensor([e for _, e in bounds])[:, None]
    return (start[None] < end) & (start[None] + page > first) & (end > first)


def garbage_id(value: int | None, num_pages: int) -> int:
    return num_pages if value is None else value


def page_cache(
    k: torch.Tensor, v: torch.Tensor, owned: torch.Tensor, page: int, gen: torch.Generator,
    dgen: torch.Generator, strided: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy dense (B, N, Hkv, D) caches, N a multiple of ``page``, into shuffled pages.

    Slot (b, s) gets a page of its own where ``owned[b, s]``; the pool also holds 3 pages nobody
    owns, and every page's unowned rows hold random data. Returns pages (P, page, Hkv, D) (a
    transposed (P, Hkv, page, D) tensor when ``strided``) and the int32 (B, N / page) ids of the
    owned slots (-1 elsewhere: fill them with ``table_for``)."""
    batch, n, hkv, d = k.shape
    slots = n // page
    n_owned = int(owned.sum())
    total = n_owned + 3
    perm = torch.randperm(total, generator=gen).to(torch.int32)
    ids = torch.full((batch, slots), -1, dtype=torch.int32)
    ids[owned] = perm[:n_owned]
    shape = (total, hkv, page, d) if strided else (total, page, hkv, d)
    pages = []
    idx = ids[owned].long().to(k.device)
    for src in (k, v):
        p = torch.randn(shape, generator=dgen, dtype=torch.float32, device=k.device).to(k.dtype)
        p = p.transpose(1, 2) if strided else p
        p[idx] = src.reshape(batch, slots, page, hkv, d)[owned.to(k.device)]
        pages.append(p)
    return pages[0], pages[1], ids


def table_for(
    ids: torch.Tensor, lens: list[int], pads: list[int] | None, capacity: int, page: int, num_pages: int,
    rng: random.Random,
) -> torch.Tensor:
    """The block table of one step: owned ids in the slots that are live for these lengths,
    garbage (ids outside [0, num_pages)) in every other slot."""
    live = _live_slots(lens, pads, capacity, page)
    assert (ids[live] >= 0).all(), "a live slot without a page"
    choices = torch.tensor([garbage_id(g, num_pages) for g in GARBAGE_IDS], dtype=torch.int32)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    garbage = choices[torch.randint(len(choices), ids.shape, generator=gen)]
    return torch.where(live, ids, garbage)


@dataclass
class Inputs:
    q: list[torch.Tensor]  # one per layer, (B, q_len, Hq, D), possibly views
    k: torch.Tensor  # dense (B, N, Hkv, D), the reference's view of the cache
    v: torch.Tensor
    kc: torch.Tensor  # what the kernel reads: k itself or its pages
    vc: torch.Tensor
    ids: torch.Tensor | None  # owned page ids (B, N / page), on the CPU
    table: torch.Tensor | None  # the block table (a view when its stride exceeds its width), on the device
    rng: random.Random  # for garbage ids of later steps
    features: dict = field(default_factory=dict)  # sinks and fp8 scales, as decode's keywords
    ref_features: dict = field(default_factory=dict)  # the same for the reference's dense cache


def features(case: Case, device: torch.device, dgen: torch.Generator) -> dict:
    """The case's feature keywords for ``leanattn.decode`` (and the reference), but for the
    window and causal flag, which the wrapper takes at plan time. Per-token scales are dense
    (B, N, Hkv), like the reference's cache (``build`` pages them for a paged one), NaN in the
    rows no step of the case reads."""
    var = case.variant
    hq, hkv = var.group * case.kv_heads, case.kv_heads
    kw: dict = {}
    if var.softcap:
        kw["softcap"] = case.softcap
    if var.sinks:
        # Sink logits of the scores' size, some large enough to take most of the mass.
        sinks = torch.randn(hq, generator=dgen, device=device) * 2
        kw["sinks"] = sinks + 6 * (torch.rand(hq, generator=dgen, device=device) < 0.25)
    if case.scales == "float":
        kw["k_scale"], kw["v_scale"] = 0.5 + (case.data_seed % 7) / 4, 2.0 - (case.data_seed % 5) / 4
    elif case.scales == "tensor":
        kw["k_scale"] = 0.5 + torch.rand(hkv, generator=dgen, device=device) * 1.5
        kw["v_scale"] = 0.5 + torch.rand(hkv, generator=dgen, device=device) * 1.5
    if var.scale_kinds != "-":
        for name, kind in zip(("k_scale", "v_scale"), var.scale_kinds.split("/")):
            if kind == "seq":
                kw[name] = 0.5 + torch.rand(case.batch, hkv, generator=dgen, device=device) * 1.5
            elif kind == "token":
                x = 10 ** (torch.rand(case.batch, case.capacity, hkv, generator=dgen, device=device) * 4 - 3)
                kw[name] = torch.where(_read_rows(case).to(device)[..., None], x, math.nan)
    return kw


def _read_rows(case: Case) -> torch.Tensor:
    """Bool (batch, capacity): the cache positions some step of the case may read (the live
    ones of the first step and of the replays)."""
    pos = torch.arange(case.capacity)
    rows = torch.zeros(case.batch, case.capacity, dtype=torch.bool)
    for lens, pads in [(case.lens, case.leftpad)] + case.replays:
        for b in range(case.batch):
            first, end = _live(lens, pads, case.capacity, b)
            rows[b] |= (pos >= first) & (pos < end)
    return rows


def page_scales(x: torch.Tensor, ids: torch.Tensor, owned: torch.Tensor, num_pages: int) -> torch.Tensor:
    """Dense per-token scales (B, N, Hkv) in the pages of ``page_cache``'s ``ids``: (num_pages,
    page, Hkv), NaN in the rows of pages nobody owns."""
    batch, n, hkv = x.shape
    slots = ids.shape[1]
    pages = torch.full((num_pages, n // slots, hkv), math.nan, dtype=x.dtype, device=x.device)
    pages[ids[owned].long().to(x.device)] = x.reshape(batch, slots, n // slots, hkv)[owned.to(x.device)]
    return pages


def build(case: Case, device: torch.device) -> Inputs:
    """Random inputs of a case, on ``device``."""
    var = case.variant
    dtype = DTYPES[var.dtype]
    gen = torch.Generator(device="cpu").manual_seed(case.data_seed)
    dgen = torch.Generator(device=device).manual_seed(case.data_seed)
    hq, hkv, d, b, n = var.group * case.kv_heads, case.kv_heads, var.head_dim, case.batch, case.capacity

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=dgen, device=device, dtype=dtype)

    qs = []
    tokens = var.q_len
    for _ in range(case.layers):
        # q a slice of a fused qkv projection: its batch stride is not Hq * D.
        q = rnd(b, tokens, hq + 2 * hkv, d)[:, :, :hq] if case.q_view else rnd(b, tokens, hq, d)
        qs.append(q * 4 if case.sharp else q)
    if case.strided_cache and not var.page_size:
        k, v = rnd(b, hkv, n, d).transpose(1, 2), rnd(b, hkv, n, d).transpose(1, 2)  # HF layout
    else:
        k, v = rnd(b, n, hkv, d), rnd(b, n, hkv, d)
    # fp8 caches: converted from the same values, pages and dense copy alike (strides kept).
    k, v = k.to(var.kv_dtype), v.to(var.kv_dtype)
    feats = features(case, device, dgen)
    if not var.page_size:
        return Inputs(qs, k, v, k, v, None, None, random.Random(case.data_seed), feats, feats)
    page = var.page_size
    steps = [(case.lens, case.leftpad)] + case.replays
    owned = torch.zeros(b, n // page, dtype=torch.bool)
    for lens, pads in steps:
        owned |= _live_slots(lens, pads, n, page)
    kp, vp, ids = page_cache(k, v, owned, page, gen, dgen, case.strided_cache)
    paged_feats = {name: page_scales(x, ids, owned, kp.shape[0]) if name.endswith("_scale") and
                   isinstance(x, torch.Tensor) and x.dim() == 3 else x for name, x in feats.items()}
    rng = random.Random(case.data_seed)
    table = table_for(ids, case.lens, case.leftpad, n, page, kp.shape[0], rng)
    if case.bad_page is not None:
        seq, slot, bad = case.bad_page
        table[seq, slot] = garbage_id(bad, kp.shape[0])
    if case.table_stride > n // page:
        wide = torch.full((b, case.table_stride), 7, dtype=torch.int32)
        wide[:, : n // page] = table
        table = wide.to(device)[:, : n // page]
    else:
        table = table.to(device)
    return Inputs(qs, k, v, kp, vp, ids, table, rng, paged_feats, feats)


def _i32(values: list[int] | None, device: torch.device) -> torch.Tensor | None:
    return None if values is None else torch.tensor(values, dtype=torch.int32, device=device)


def poisoned_out(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A NaN buffer (B, q_len, Hq + 2, D) and the (B, q_len, Hq, D) view of it to write into:
    its margins must stay NaN."""
    b, q_len, hq, d = q.shape
    buf = torch.full((b, q_len, hq + 2, d), math.nan, dtype=q.dtype, device=q.device)
    return buf, buf[:, :, 1 : hq + 1]


def compare(
    out: torch.Tensor, buf: torch.Tensor, lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, lens: list[int], pads: list[int] | None, feats: dict | None = None,
) -> str | None:
    """Why ``out`` (and ``lse``) is wrong for these lengths, or None. ``feats``: the feature
    keywords of the call (window, causal, softcap, sinks, fp8 scales). ``k`` holds NaN keys where
    a case put an out-of-range page: the rows the reference gives a NaN LSE (those that attend
    to one) must be NaN in the output and the LSE, and every other row right."""
    ref, ref_lse = leanattn.reference.decode(
        q.float(), k, v, _i32(lens, q.device), cache_leftpad=_i32(pads, q.device), return_lse=True,
        compute_dtype=torch.float32, **(feats or {}),
    )
    if not torch.isnan(buf[:, :, 0]).all() or not torch.isnan(buf[:, :, -1]).all():
        return "wrote outside out (the margins of its buffer)"
    tol = TOL[out.dtype]
    for b in range(out.shape[0]):
        poisoned = torch.isnan(ref_lse[b]).T  # (q_len, q_heads)
        o = out[b].float()
        if poisoned.any():
            if not torch.isnan(o[poisoned]).all():
                return (f"sequence {b}: {int(poisoned.sum())} rows attend to an out-of-range page, but "
                        f"{int((~torch.isnan(o[poisoned])).sum())} of their elements are not NaN")
            if lse is not None and not torch.isnan(lse[b].T[poisoned]).all():
                return f"sequence {b}: rows attend to an out-of-range page, but their LSE is not NaN"
        kept = ~poisoned
        o, r = o[kept], ref[b].float()[kept]  # (rows, head_dim)
        if not torch.isfinite(o).all():
            return f"sequence {b}: {int((~torch.isfinite(o)).sum())} NaN/inf elements (unwritten or broken)"
        first, end = _live(lens, pads, k.shape[1], b)
        if end == first:
            if (o != 0).any():
                return f"sequence {b}: empty, but its output is not all zeros"
        elif o.numel():
            denom = r.norm().item()
            err = (o - r).norm().item() / (denom if denom > 0 else 1.0)
            if not err < tol:
                return f"sequence {b}: relative error {err:.3e} over {tol:.1e}"
        if lse is not None:
            got, want = lse[b].T[kept], ref_lse[b].T[kept]
            if torch.isnan(got).any():
                return f"sequence {b}: NaN in LSE"
            empty = torch.isinf(want)
            if not torch.equal(torch.isinf(got), empty) or (got[empty] > 0).any():
                return f"sequence {b}: LSE -inf pattern differs"
            diff = (got[~empty] - want[~empty]).abs()
            if diff.numel() and not diff.max().item() < LSE_TOL:
                return f"sequence {b}: LSE off by {diff.max().item():.3e}"
    return None


def _call(case: Case, x: Inputs, q: torch.Tensor, out: torch.Tensor, seqlens, pads, wrapper, *, plan: bool):
    """One leanattn call of the case's API: returns (out, lse or None)."""
    var = case.variant
    kw = dict(x.features) if x.table is None else dict(x.features, block_table=x.table)
    if var.api == "decode":
        res = leanattn.decode(q, x.kc, x.vc, seqlens, cache_leftpad=pads, out=out, return_lse=var.return_lse,
                              num_programs=case.num_programs, check=case.check, causal=var.causal,
                              window_size=tuple(case.window_size), config=var.config, **kw)
    else:
        if plan:
            wrapper.plan(seqlens, case.capacity, batch=case.batch, cache_leftpad=pads, check=case.check,
                         q_len=var.q_len, causal=var.causal, window_size=tuple(case.window_size))
        res = wrapper.run(q, x.kc, x.vc, out=out, return_lse=var.return_lse, check=case.check, **kw)
    out_, lse = res if var.return_lse else (res, None)
    if out_ is not out:
        raise AssertionError("the call did not return the out tensor it was given")
    return out_, lse


def run_case(case: Case, device: torch.device) -> str | None:
    """Run and check one case; the reason it failed, or None."""
    var = case.variant
    x = build(case, device)
    seqlens = _i32(case.lens, device) if var.has_seqlens else None
    pads = _i32(case.leftpad, device)
    wrapper = None
    if var.api == "wrapper":
        wrapper = leanattn.DecodeWrapper(var.group * case.kv_heads, case.kv_heads, var.head_dim, DTYPES[var.dtype],
                                         device, kv_dtype=var.kv_dtype, max_q_len=var.q_len,
                                         num_programs=case.num_programs, paged=var.page_size > 0, config=var.config)
    k_ref = x.k
    if case.bad_page is not None:
        seq, slot, _ = case.bad_page
        k_ref = x.k.float().clone()
        k_ref[seq, slot * var.page_size : (slot + 1) * var.page_size] = math.nan
    feats = dict(x.ref_features, causal=var.causal, window_size=tuple(case.window_size))
    if not case.graph:
        for layer, q in enumerate(x.q):
            buf, out = poisoned_out(q)
            out, lse = _call(case, x, q, out, seqlens, pads, wrapper, plan=layer == 0)
            why = compare(out, buf, lse, q, k_ref, x.v, case.lens, case.leftpad, feats)
            if why:
                return f"layer {layer}: {why}" if case.layers > 1 else why
        return None

    # CUDA graph: run once eagerly (compiles, sizes the workspace), capture the same call (a
    # wrapper's plan included), then replay it after changing the lengths and block table in place.
    q = x.q[0]
    buf, out = poisoned_out(q)
    out, lse = _call(case, x, q, out, seqlens, pads, wrapper, plan=True)
    why = compare(out, buf, lse, q, x.k, x.v, case.lens, case.leftpad, feats)
    if why:
        return f"eager call before capture: {why}"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, lse = _call(case, x, q, out, seqlens, pads, wrapper, plan=True)
    for r, (lens, new_pads) in enumerate(case.replays):
        seqlens.copy_(_i32(lens, device))
        if pads is not None:
            pads.copy_(_i32(new_pads, device))
        if x.table is not None:
            x.table.copy_(table_for(x.ids, lens, new_pads, case.capacity, var.page_size, x.kc.shape[0], x.rng))
        buf.fill_(math.nan)
        graph.replay()
        torch.cuda.synchronize()
        why = compare(out, buf, lse, q, x.k, x.v, lens, new_pads, feats)
        if why:
            return f"graph replay {r} (lens {lens}, leftpad {new_pads}): {why}"
    return None


def compiled_kernels() -> int | None:
    """Kernels Triton has compiled in this process (None under the interpreter)."""
    from leanattn._testing import lean_decode_kernel, lean_merge_kernel, lean_plan_kernel

    count = 0
    for fn in (lean_decode_kernel, lean_merge_kernel, lean_plan_kernel):
        caches = getattr(fn, "device_caches", None)
        if not isinstance(caches, dict):
            return None
        try:
            count += sum(len(entry[0]) for entry in caches.values())
        except (TypeError, IndexError, KeyError):
            return None
    return count


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"


def sweep(
    cases: int, seed: int, limits: Limits = Limits(), *, only: int | None = None,
    log: Callable[[str], None] = print, argv: list[str] | None = None,
) -> dict[str, Any]:
    """Run cases 0..cases-1 of ``seed`` (or case ``only``); returns {"summary", "failures", "variants"}."""
    device = torch.device("cuda", torch.cuda.current_device()) if ON_GPU else torch.device("cpu")
    pool = draw_pool(seed, limits.variants)
    indices = [only] if only is not None else range(cases)
    failures: list[dict[str, Any]] = []
    graphs = 0
    log(f"sweep: seed {seed}, {len(indices)} cases over {len(pool)} kernel variants on {device_name(device)}")
    start = time.perf_counter()
    dead = None
    n = 0
    for n, i in enumerate(indices, 1):
        case = draw_case(seed, i, pool, limits, graph_ok=device.type == "cuda")
        graphs += case.graph
        try:
            why = run_case(case, device)
        except Exception as e:  # a crash is a failure of this case, with its traceback
            why = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}"
            if device.type == "cuda":
                try:
                    torch.cuda.synchronize()
                except Exception as e2:  # the CUDA context is gone: later cases can't run
                    dead = repr(e2)
        if why:
            failures.append({"case": i, "error": why, "repro": _repro(seed, i, limits), "params": case.to_dict()})
            log(f"FAIL case {i}: {why.splitlines()[0]}")
        if n % 1000 == 0:
            log(f"{n}/{len(indices)} cases, {len(failures)} failures, {time.perf_counter() - start:.0f} s, "
                f"{compiled_kernels()} kernels compiled")
        if dead:
            log(f"stopping after case {i}: the CUDA context is unusable ({dead})")
            break
    runtime = time.perf_counter() - start
    summary = {
        "seed": seed, "cases": n, "failures": len(failures), "runtime_s": round(runtime, 1),
        "gpu": device_name(device), "graph_cases": graphs, "variants": len(pool),
        "compiled_kernels": compiled_kernels(), "limits": dataclasses.asdict(limits),
        "torch": torch.__version__, "triton": _triton_version(), "argv": argv,
        "stopped_early": dead,
    }
    log(f"sweep: seed {seed}, {n} cases, {len(failures)} failures, {runtime:.1f} s, {summary['gpu']} "
        f"({graphs} graph cases, {len(pool)} variants, {summary['compiled_kernels']} kernels compiled)")
    return {"summary": summary, "failures": failures, "variants": [dataclasses.asdict(v) for v in pool]}


def _triton_version() -> str:
    import triton

    return triton.__version__


def _repro(seed: int, index: int, limits: Limits) -> str:
    """The command line that re-runs one case with these limits."""
    default = Limits()
    extra = "".join(
        f" --{name.replace('_', '-')} {_fmt(getattr(limits, name))}"
        for name in ("max_batch", "max_len", "kv_heads", "grids", "variants", "graph_every")
        if getattr(limits, name) != getattr(default, name)
    )
    return f"PYTHONPATH=$PWD/src python tests/sweep_gpu.py --seed {seed} --case {index}{extra}"


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join("none" if x is None else str(x) for x in value)
    return str(value)


def _ints(text: str, allow_none: bool = False) -> tuple:
    return tuple(None if allow_none and s.strip().lower() == "none" else int(s) for s in text.split(","))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=10_000, help="number of random cases (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the variant pool and of every case")
    p.add_argument("--out", help="write the summary and the failures to this JSON file")
    p.add_argument("--case", type=int, help="run only this case of the seed (to reproduce a failure)")
    p.add_argument("--max-batch", type=int, default=Limits.max_batch)
    p.add_argument("--max-len", type=int, default=Limits.max_len)
    p.add_argument("--kv-heads", type=_ints, default=Limits.kv_heads, help="comma-separated choices")
    p.add_argument("--grids", type=lambda s: _ints(s, True), default=Limits.grids,
                   help="num_programs choices, comma-separated, 'none' for the default grid")
    p.add_argument("--variants", type=int, default=Limits.variants, help="size of the kernel-variant pool")
    p.add_argument("--graph-every", type=int, default=Limits.graph_every, help="0: no CUDA graphs")
    args = p.parse_args(argv)
    limits = Limits(max_batch=args.max_batch, max_len=args.max_len, kv_heads=args.kv_heads, grids=args.grids,
                    variants=args.variants, graph_every=args.graph_every)
    result = sweep(args.cases, args.seed, limits, only=args.case, argv=sys.argv[1:] if argv is None else argv)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if result["failures"] or result["summary"]["stopped_early"] else 0


if __name__ == "__main__":
    sys.exit(main())
