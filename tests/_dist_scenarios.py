"""What the distributed tests run on every rank (see ``_dist.Cluster``): ``fn(rank, world, ...)``.

Every rank builds the same full inputs from a seed, keeps the tokens its round-robin pages hold,
runs the context-parallel decode, and checks the result against the float64 reference on the
full cache. A failed check raises, and the test reports every rank's error.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

import leanattn
from leanattn.distributed import ContextParallelDecode, _symmetric, round_robin_lengths, round_robin_slot

from _util import assert_close, reference, rel_err, to_paged

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Lengths with a page size of 16: an empty sequence, one that only rank 0 holds, one that rank 2
# of 3 doesn't reach, and longer ones.
LENS = [0, 1, 17, 100, 45, 64]
PAGE = 16


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build(rank: int, world: int, lens: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int,
          page: int = PAGE, q_len: int = 1, pads: list[int] | None = None):
    """Full q (batch, q_len, hq, d), k, v, lengths (identical on every rank: one seed, one device
    type), and this rank's slice: a contiguous local cache holding its pages back to back, and
    its local lengths. ``pads``: positions before them (left padding) hold large garbage."""
    dev = device()
    gen = torch.Generator(device=dev).manual_seed(seed)
    batch, n = len(lens), max(max(lens), 1)
    q, k, v = (torch.randn(*s, generator=gen, device=dev).to(dtype) for s in
               ((batch, q_len, hq, d), (batch, n, hkv, d), (batch, n, hkv, d)))
    for b, pad in enumerate(pads or []):
        k[b, :pad], v[b, :pad] = 3e4, -3e4
    full = torch.tensor(lens, dtype=torch.int32, device=dev)
    local = round_robin_lengths(full, world, rank, page)
    tok = torch.arange(n, device=dev)
    mine = [tok[(tok < length) & ((tok // page) % world == rank)] for length in lens]
    assert local.tolist() == [len(m) for m in mine], "round_robin_lengths disagrees with the dealt pages"
    cap = max(max(len(m) for m in mine), 1)
    # Slots past a sequence's local length hold large garbage: they must never be read.
    lk = torch.full((batch, cap, hkv, d), 3e4, dtype=dtype, device=dev)
    lv = torch.full_like(lk, -3e4)
    for b, idx in enumerate(mine):
        owner, pos = round_robin_slot(idx, world, page)
        assert (owner == rank).all() and torch.equal(pos, torch.arange(len(idx), device=dev))
        lk[b, : len(idx)] = k[b, idx]
        lv[b, : len(idx)] = v[b, idx]
    return q, k, v, full, lk, lv, local


def same_on_every_rank(t: torch.Tensor) -> bool:
    """True when every rank holds the same bytes in ``t``."""
    raw = t.contiguous().view(torch.uint8).flatten()
    everyone = [torch.empty_like(raw) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, raw)
    return all(torch.equal(everyone[0], x) for x in everyone)


def ping(rank: int, world: int) -> int:
    """An all_reduce: the group still works."""
    x = torch.ones(1, device=device())
    dist.all_reduce(x)
    return int(x.item())


def replicated(rank: int, world: int, dtype: str, paged: bool, head_dim: int = 64) -> None:
    """Two layers with one plan, a rerun, then a new plan with shorter lengths (same buffers)."""
    dt = DTYPES[dtype]
    cp = ContextParallelDecode(None, 12, 4, head_dim, dt, device())
    layers = [build(rank, world, LENS, 12, 4, head_dim, dt, seed) for seed in (1, 2)]
    local = layers[0][-1]
    table = None
    caches = []
    for q, k, v, full, lk, lv, _ in layers:
        if paged:
            kp, vp, table = to_paged(lk, lv, local.tolist(), PAGE, seed=rank)
            caches.append((kp, vp))
        else:
            caches.append((lk, lv))
    capacity = lambda kc: kc.shape[1] if table is None else table.shape[1] * PAGE  # noqa: E731
    cp.plan(local, capacity(caches[0][0]), block_table=table)
    for (q, k, v, full, *_), (kc, vc) in zip(layers, caches):
        out, lse = cp.run(q, kc, vc, return_lse=True)
        assert out.shape == q.shape and lse.shape == (len(LENS), 12, 1)
        assert_close(out, lse, *reference(q, k, v, full))
        again, again_lse = cp.run(q, kc, vc, return_lse=True)
        assert torch.equal(again, out) and torch.equal(again_lse, lse), "not deterministic"
        assert same_on_every_rank(out) and same_on_every_rank(lse), "ranks differ"

    # A new step: shorter sequences; a rank's local tokens of a global prefix are a local prefix.
    shorter = [n // 2 for n in LENS]
    q, k, v, *_ = layers[0]
    full = torch.tensor(shorter, dtype=torch.int32, device=device())
    local.copy_(round_robin_lengths(full, world, rank, PAGE))
    cp.plan(local, capacity(caches[0][0]), block_table=table)
    assert len(cp._buffers) == 1, "a plan of the same batch must reuse the collective buffers"
    out, lse = cp.run(q, *caches[0], return_lse=True)
    assert_close(out, lse, *reference(q, k, v, full))
    # The next step without the exchange (what a CUDA graph captures): lengths changed in place.
    full.copy_(torch.tensor([n - n // 3 for n in LENS], dtype=torch.int32))
    local.copy_(round_robin_lengths(full, world, rank, PAGE))
    cp.plan(local, capacity(caches[0][0]), block_table=table, check=False)
    out, lse = cp.run(q, *caches[0], return_lse=True)
    assert_close(out, lse, *reference(q, k, v, full))
    assert same_on_every_rank(out), "ranks differ"


def scatter(rank: int, world: int) -> None:
    """scatter_heads: each rank gets its own q_heads / world heads."""
    q, k, v, full, lk, lv, local = build(rank, world, LENS, 12, 4, 64, torch.float16, seed=3)
    cp = ContextParallelDecode(None, 12, 4, 64, torch.float16, device(), scatter_heads=True)
    cp.plan(local, lk.shape[1])
    out, lse = cp.run(q, lk, lv, return_lse=True)
    hc = 12 // world
    assert out.shape == (len(LENS), 1, hc, 64) and lse.shape == (len(LENS), hc, 1)
    ref, ref_lse = reference(q, k, v, full)
    mine = slice(rank * hc, (rank + 1) * hc)
    assert_close(out, lse, ref[:, :, mine], ref_lse[:, mine])
    # The same heads as the replicated merge, bit for bit.
    full_out, full_lse = leanattn.distributed.decode(q, lk, lv, local, return_lse=True)
    assert torch.equal(out, full_out[:, :, mine]) and torch.equal(lse, full_lse[:, mine])


_MAPPED: list = []  # shared-file mappings of the CPU rendezvous: they must outlive the buffers


def file_rendezvous(group, dev, recv_words: int, flag_words: int):
    """exchange="symmetric" on the CPU: every rank's buffers in a file in /dev/shm that every
    process maps (shared), so the interpreter's kernel writes into the other ranks' memory as it
    would over NVLink. A collective, as torch's rendezvous."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    tag = torch.tensor([os.getpid() if rank == 0 else 0, len(_MAPPED)], dtype=torch.int64)
    dist.broadcast(tag, 0, group=group)  # one name for every rank's files of this rendezvous
    nbytes = recv_words * 4 + flag_words * 8
    path = lambda r: f"/dev/shm/leanattn-test-{int(tag[0])}-{int(tag[1])}-{r}"  # noqa: E731
    try:
        mine = torch.from_file(path(rank), shared=True, size=nbytes, dtype=torch.uint8)
        mine.zero_()
        dist.barrier(group)
        maps = [mine if r == rank else torch.from_file(path(r), shared=True, size=nbytes, dtype=torch.uint8)
                for r in range(world)]
        dist.barrier(group)
    finally:
        if os.path.exists(path(rank)):
            os.unlink(path(rank))  # the mappings stay
    _MAPPED.append(maps)
    recv = mine[: recv_words * 4].view(torch.float32)
    flags = mine[recv_words * 4:].view(torch.int64)
    return recv, flags, [m.data_ptr() for m in maps], [m.data_ptr() + recv_words * 4 for m in maps], maps


@contextlib.contextmanager
def shared_files():
    """exchange="symmetric"'s buffers mapped through :func:`file_rendezvous` inside."""
    _symmetric.RENDEZVOUS = file_rendezvous
    try:
        yield
    finally:
        _symmetric.RENDEZVOUS = _symmetric.torch_rendezvous


def symmetric(rank: int, world: int) -> None:
    """exchange="symmetric" (the one-launch push and merge, here through shared files) gives the
    all_gather exchange's bits, replicated and scattered, over calls that reuse both slots of
    its buffers, and with several query tokens over global positions (new buffers)."""
    with shared_files():
        lens = [0, 1, 17, 40]
        layers = [build(rank, world, lens, 6, 2, 32, torch.bfloat16, seed) for seed in (11, 12)]
        local = layers[0][-1]
        for scatter in (False, True):
            cps = [ContextParallelDecode(None, 6, 2, 32, torch.bfloat16, device(), scatter_heads=scatter,
                                         exchange=ex) for ex in ("all_gather", "symmetric")]
            for cp in cps:
                cp.plan(local, layers[0][4].shape[1])
            assert cps[1].exchange == "symmetric" and cps[1].planned[-1].symmetric is not None
            for call, i in enumerate((0, 1, 0)):  # calls 1, 2, 3: slots 1, 0, 1
                q, k, v, full, lk, lv, _ = layers[i]
                want, want_lse = cps[0].run(q, lk, lv, return_lse=True)
                out, lse = cps[1].run(q, lk, lv, return_lse=True)
                assert torch.equal(out, want) and torch.equal(lse, want_lse), f"call {call} (scatter {scatter})"
            if not scatter:
                assert_close(out, lse, *reference(q, k, v, full))
                assert same_on_every_rank(out) and same_on_every_rank(lse), "ranks differ"
        # Several query tokens (a new (batch, q_len): new buffers), leftpad and a window.
        q, k, v, full, lk, lv, _ = build(rank, world, POS_LENS[1:], 4, 2, 32, torch.float16, seed=13, q_len=3,
                                         pads=POS_PADS[1:])
        pads = torch.tensor(POS_PADS[1:], dtype=torch.int32, device=device())
        kw = dict(q_len=3, seqlens=full, page_size=PAGE, cache_leftpad=pads, window_size=(20, -1))
        outs = []
        for ex in ("all_gather", "symmetric"):
            cp = ContextParallelDecode(None, 4, 2, 32, torch.float16, device(), exchange=ex)
            cp.plan(None, lk.shape[1], **kw)
            outs.append(cp.run(q, lk, lv, return_lse=True))
        assert all(torch.equal(a, b) for a, b in zip(outs[1], outs[0])), "symmetric differs, q_len 3"
        assert_close(*outs[0], *reference(q, k, v, full, cache_leftpad=pads, window_size=(20, -1)))


def oneshot(rank: int, world: int) -> float:
    """The one-shot function, bf16, group size 3 (12 / 4), every sequence its full capacity."""
    lens = [40] * 3
    q, k, v, full, lk, lv, local = build(rank, world, lens, 12, 4, 64, torch.bfloat16, seed=4)
    # Each rank's cache holds exactly its tokens, so no lengths are needed.
    lk, lv = lk[:, : int(local[0])], lv[:, : int(local[0])]
    out = leanattn.distributed.decode(q, lk, lv)
    ref, _ = reference(q, k, v, full)
    return rel_err(out, ref)


def mismatch(rank: int, world: int, kind: str) -> None:
    """Ranks that disagree (or one rank with bad arguments): plan must raise on every rank."""
    last = rank == world - 1
    dev = device()
    if kind == "batch":
        batch = 3 if last else 2
        cp = ContextParallelDecode(None, 8, 2, 64, torch.float16, dev)
        cp.plan(torch.zeros(batch, dtype=torch.int32, device=dev), 16)
    elif kind == "heads":
        cp = ContextParallelDecode(None, 4 if last else 8, 2, 64, torch.float16, dev)
        cp.plan(torch.zeros(2, dtype=torch.int32, device=dev), 16)
    elif kind == "local":
        cp = ContextParallelDecode(None, 8, 2, 64, torch.float16, dev)
        cp.plan(torch.zeros(2, dtype=torch.int64 if last else torch.int32, device=dev), 16)
    elif kind == "unchecked_first":
        cp = ContextParallelDecode(None, 8, 2, 64, torch.float16, dev)
        cp.plan(torch.zeros(2, dtype=torch.int32, device=dev), 16, check=False)
    elif kind == "q_len_local":  # several query tokens need global positions
        cp = ContextParallelDecode(None, 8, 2, 64, torch.float16, dev)
        cp.plan(torch.zeros(2, dtype=torch.int32, device=dev), 16, q_len=3)
    elif kind == "page_size":
        cp = ContextParallelDecode(None, 8, 2, 64, torch.float16, dev)
        cp.plan(None, 16, q_len=2, seqlens=torch.zeros(2, dtype=torch.int32, device=dev), page_size=32 if last else 16)
    elif kind == "unchecked_window":
        cp = ContextParallelDecode(None, 8, 2, 64, torch.float16, dev)
        seqlens = torch.zeros(2, dtype=torch.int32, device=dev)
        cp.plan(None, 16, q_len=2, seqlens=seqlens, page_size=16)
        cp.plan(None, 16, q_len=2, seqlens=seqlens, page_size=16, window_size=(8, -1), check=False)
    elif kind == "capacity":  # the last rank's cache is too small for the pages dealt to it
        cp = ContextParallelDecode(None, 8, 2, 64, torch.float16, dev)
        seqlens = torch.tensor([9 * 16, 3], dtype=torch.int32, device=dev)  # 48 or more tokens a rank
        cp.plan(None, 16 if last else 256, seqlens=seqlens, page_size=16)
    elif kind == "exchange":
        cp = ContextParallelDecode(None, 8, 2, 64, torch.float16, dev, exchange="symmetric" if last else "all_gather")
        cp.plan(torch.zeros(2, dtype=torch.int32, device=dev), 16)
    elif kind == "symmetric_alloc":  # the last rank runs out of memory for its exchange buffers
        with shared_files():
            cp = ContextParallelDecode(None, 8, 2, 64, torch.float16, dev, exchange="symmetric")
            if last:
                def fail(*args):
                    raise MemoryError("out of memory (a test's)")
                cp._local_buffers = fail
            try:
                cp.plan(torch.zeros(2, dtype=torch.int32, device=dev), 16)
            finally:
                assert cp._checked is None and not cp._buffers, "a failed allocation left a checked plan"
    elif kind == "unchecked_batch":
        cp = ContextParallelDecode(None, 8, 2, 64, torch.float16, dev)
        cp.plan(torch.zeros(2, dtype=torch.int32, device=dev), 16)
        cp.plan(torch.zeros(3, dtype=torch.int32, device=dev), 16, check=False)
    else:
        raise KeyError(kind)


# Global positions (several query tokens, leftpad, windows): ragged lengths with a page size of 16
# over 2 or 3 ranks. The second sequence's queries (34, 35, 36) lie on rank 0's last page; its
# leftpad 35 leaves the first query before every key (zeros, LSE -inf); the third is shorter
# than q_len (its first queries see nothing).
POS_LENS = [150, 37, 1]
POS_PADS = [20, 35, 0]


def positions(rank: int, world: int, dtype: str, paged: bool, q_len: int, window: tuple[int, int],
              leftpad: bool, causal: bool = True, lens: list[int] = POS_LENS, hq: int = 8, hkv: int = 2,
              head_dim: int = 64, page: int = PAGE) -> None:
    """plan(seqlens=, page_size=): against the float64 reference and leanattn.decode on the whole
    cache, the same bits on every rank, the one-shot function, and a re-plan with new lengths
    written in place (check=False, as a CUDA graph replays it)."""
    dt = DTYPES[dtype]
    pads = POS_PADS[: len(lens)] if leftpad else None
    q, k, v, full, lk, lv, local = build(rank, world, lens, hq, hkv, head_dim, dt, seed=7, page=page, q_len=q_len,
                                         pads=pads)
    pad_t = None if pads is None else torch.tensor(pads, dtype=torch.int32, device=device())
    table = None
    if paged:
        lk, lv, table = to_paged(lk, lv, local.tolist(), page, seed=rank)
    capacity = lk.shape[1] if table is None else table.shape[1] * page
    cp = ContextParallelDecode(None, hq, hkv, head_dim, dt, device())
    kw = dict(cache_leftpad=pad_t, causal=causal, window_size=window)
    cp.plan(None, capacity, q_len=q_len, block_table=table, seqlens=full, page_size=page, **kw)
    out, lse = cp.run(q, lk, lv, return_lse=True)
    assert out.shape == q.shape and lse.shape == (len(lens), hq, q_len)
    ref, ref_lse = reference(q, k, v, full, **kw)
    assert_close(out, lse, ref, ref_lse)
    single, single_lse = leanattn.decode(q, k, v, full, return_lse=True, **kw)
    assert rel_err(out, single) < 1.5e-2, "far from leanattn.decode on the whole cache"
    assert_close(single, lse, ref, single_lse)  # the LSEs agree (-inf where empty)
    assert same_on_every_rank(out) and same_on_every_rank(lse), "ranks differ"
    oneshot_out = leanattn.distributed.decode(q, lk, lv, block_table=table, seqlens=full, page_size=page, **kw)
    assert torch.equal(oneshot_out, out), "the one-shot function differs from plan and run"

    # The next step without the exchange: global lengths (and pads) changed in place, the local
    # cache unchanged (each new global prefix is a local prefix).
    full.copy_(torch.tensor([max(n - 5, 0) for n in lens], dtype=torch.int32))
    if pad_t is not None:
        pad_t.copy_(torch.tensor([p + 3 for p in pads], dtype=torch.int32))  # (garbage stays padding)
    cp.plan(None, capacity, q_len=q_len, block_table=table, seqlens=full, page_size=page, check=False, **kw)
    out, lse = cp.run(q, lk, lv, return_lse=True)
    assert_close(out, lse, *reference(q, k, v, full, **kw))
    assert same_on_every_rank(out), "ranks differ"


def switch_q_len(rank: int, world: int) -> None:
    """One ContextParallelDecode alternating plain decode steps (local lengths) and steps of three
    query tokens (global lengths), on a contiguous and a paged copy of the local cache in turn:
    each step as the reference on the whole cache. Only a longer q_len outgrows a wrapper (a
    captured graph may still read it); switching cache kinds back and forth retires none."""
    q, k, v, full, lk, lv, local = build(rank, world, [100, 37], 8, 2, 64, torch.float16, seed=9, q_len=3)
    kp, vp, table = to_paged(lk, lv, local.tolist(), PAGE, seed=rank)
    cp = ContextParallelDecode(None, 8, 2, 64, torch.float16, device())
    for q_len, paged in ((1, False), (3, False), (1, True), (1, False), (3, True), (1, False), (1, True)):
        qs = q[:, -q_len:]
        kc, vc, bt = (kp, vp, table) if paged else (lk, lv, None)
        capacity = table.shape[1] * PAGE if paged else lk.shape[1]
        if q_len == 1:
            cp.plan(local, capacity, block_table=bt)
        else:
            cp.plan(None, capacity, q_len=q_len, seqlens=full, page_size=PAGE, block_table=bt)
        out, lse = cp.run(qs, kc, vc, return_lse=True)
        assert_close(out, lse, *reference(qs, k, v, full))
    assert len(cp._retired) == 1 and len(cp._wrappers) == 2  # the contiguous q_len 1 wrapper only


# -- GPU (NCCL) ------------------------------------------------------------------------------------

GPU_LENS = [131072, 1, 0, 77777]


def gpu_matches_single(rank: int, world: int, scatter_heads: bool, exchange: str = "all_gather",
                       lens: list[int] = GPU_LENS) -> None:
    """Long ragged sequences: the context-parallel result against one GPU running leanattn on the
    full cache and against the float64 reference; the same bits on both ranks, and with either
    exchange."""
    q, k, v, full, lk, lv, local = build(rank, world, lens, 32, 8, 128, torch.bfloat16, seed=5, page=64)
    cp = ContextParallelDecode(None, 32, 8, 128, torch.bfloat16, device(), scatter_heads=scatter_heads,
                               exchange=exchange)
    cp.plan(local, lk.shape[1])
    out, lse = cp.run(q, lk, lv, return_lse=True)
    single, single_lse = leanattn.decode(q, k, v, full, return_lse=True)
    ref, ref_lse = reference(q, k, v, full)
    if scatter_heads:
        mine = slice(rank * out.shape[2], (rank + 1) * out.shape[2])
        single, single_lse, ref, ref_lse = single[:, :, mine], single_lse[:, mine], ref[:, :, mine], ref_lse[:, mine]
    assert_close(out, lse, ref, ref_lse)
    assert rel_err(out, single) < 1.5e-2, "far from one GPU's result"
    assert_close(single, lse, ref, single_lse)  # the LSEs agree (-inf where empty)
    if not scatter_heads:  # scattered, each rank holds other heads
        assert same_on_every_rank(out) and same_on_every_rank(lse), "ranks differ"
    again, again_lse = cp.run(q, lk, lv, return_lse=True)
    assert torch.equal(again, out) and torch.equal(again_lse, lse), "not deterministic"
    if exchange != "all_gather":
        other = ContextParallelDecode(None, 32, 8, 128, torch.bfloat16, device(), scatter_heads=scatter_heads)
        other.plan(local, lk.shape[1])
        gathered, gathered_lse = other.run(q, lk, lv, return_lse=True)
        assert torch.equal(gathered, out) and torch.equal(gathered_lse, lse), "the exchanges differ"


def gpu_graph(rank: int, world: int, paged: bool, exchange: str = "all_gather") -> None:
    """A captured run replayed with new lengths equals an eager run with them, bit for bit."""
    cap = 8192
    lens = [cap, cap // 2, 3, cap - 7]
    # The replays grow sequences past `lens`, so every sequence's cache (and block table) holds
    # real tokens up to cap; the capture starts from `lens`. (Slots past the built lengths hold
    # garbage, and pages past them are out of range: a replay that reached them would read them.)
    q, k, v, _, lk, lv, local = build(rank, world, [cap] * len(lens), 32, 8, 128, torch.bfloat16, seed=6, page=64)
    table = None
    if paged:
        lk, lv, table = to_paged(lk, lv, local.tolist(), 64, seed=rank)
    local.copy_(round_robin_lengths(torch.tensor(lens, dtype=torch.int32, device=device()), world, rank, 64))
    capacity = lk.shape[1] if table is None else table.shape[1] * 64
    cp = ContextParallelDecode(None, 32, 8, 128, torch.bfloat16, device(), exchange=exchange)
    cp.plan(local, capacity, block_table=table)
    out = torch.empty_like(q)
    cp.run(q, lk, lv, out=out)  # compiles and warms NCCL before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # A step: the device-side plan for the new lengths, then the layers (two: with the eager run
    # that checks each replay, a step is three calls, so the symmetric exchange's replays start
    # on either of its two slots).
    # thread_local: the NCCL watchdog thread's calls can't invalidate this thread's capture.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        cp.plan(local, capacity, block_table=table, check=False)
        for _ in range(2):
            _, lse = cp.run(q, lk, lv, out=out, return_lse=True)
    for step, new in enumerate(([0, 0, 0, 0], lens, [1, cap, 0, 4000], [cap // 3, 17, cap, 64])):
        new_full = torch.tensor(new, dtype=torch.int32, device=device())
        local.copy_(round_robin_lengths(new_full, world, rank, 64))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        cp.plan(local, capacity, block_table=table, check=False)
        eager, eager_lse = cp.run(q, lk, lv, return_lse=True)
        assert torch.isfinite(out).all() and torch.isfinite(eager).all(), f"step {step}: NaN/inf output"
        assert torch.equal(out, eager) and torch.equal(lse, eager_lse), f"replay {step} differs from eager"
        assert_close(out, lse, *reference(q, k, v, new_full))
        assert same_on_every_rank(out), "ranks differ"


def gpu_graph_positions(rank: int, world: int, q_len: int, window: tuple[int, int],
                        exchange: str = "all_gather") -> None:
    """plan(seqlens=, page_size=, cache_leftpad=) captured with a run: replays with new global
    lengths and pads written in place equal eager runs with them, bit for bit."""
    cap = 8192
    lens = [cap, cap // 2, 3, cap - 7]
    q, k, v, _, lk, lv, local = build(rank, world, [cap] * len(lens), 32, 8, 128, torch.bfloat16, seed=8, page=64,
                                      q_len=q_len)
    full = torch.tensor(lens, dtype=torch.int32, device=device())
    pads = torch.zeros(len(lens), dtype=torch.int32, device=device())
    capacity = lk.shape[1]
    kw = dict(cache_leftpad=pads, window_size=window)
    cp = ContextParallelDecode(None, 32, 8, 128, torch.bfloat16, device(), exchange=exchange)
    cp.plan(None, capacity, q_len=q_len, seqlens=full, page_size=64, **kw)
    out = torch.empty_like(q)
    cp.run(q, lk, lv, out=out)  # compiles and warms NCCL before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        cp.plan(None, capacity, q_len=q_len, seqlens=full, page_size=64, check=False, **kw)
        _, lse = cp.run(q, lk, lv, out=out, return_lse=True)
    steps = (([0, 0, 0, 0], [0, 0, 0, 0]), (lens, [0, 100, 0, 4000]), ([1, cap, 0, 4000], [0, 0, 0, 3999]),
             ([cap // 3, 17, cap, 64], [5, 15, 0, 0]))
    for step, (new, new_pads) in enumerate(steps):
        full.copy_(torch.tensor(new, dtype=torch.int32))
        pads.copy_(torch.tensor(new_pads, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        cp.plan(None, capacity, q_len=q_len, seqlens=full, page_size=64, check=False, **kw)
        eager, eager_lse = cp.run(q, lk, lv, return_lse=True)
        assert torch.isfinite(out).all() and torch.isfinite(eager).all(), f"step {step}: NaN/inf output"
        assert torch.equal(out, eager) and torch.equal(lse, eager_lse), f"replay {step} differs from eager"
        assert_close(out, lse, *reference(q, k, v, full, **kw))
        assert same_on_every_rank(out), "ranks differ"


def gpu_symmetric_staggered(rank: int, world: int, scatter_heads: bool) -> None:
    """exchange="symmetric" with the ranks out of step: before each layer one rank (in turn)
    sleeps ~1 ms on the GPU, so the others push, wait and reuse slots while it lags; eager calls
    and a CUDA graph of four layers replayed twice, each layer's output the all_gather
    exchange's bits."""
    lens = [8192, 1, 0, 5000]
    layers = [build(rank, world, lens, 32, 8, 128, torch.bfloat16, seed=20 + i, page=64) for i in range(4)]
    local, capacity = layers[0][-1], layers[0][4].shape[1]
    cps = [ContextParallelDecode(None, 32, 8, 128, torch.bfloat16, device(), scatter_heads=scatter_heads,
                                 exchange=ex) for ex in ("all_gather", "symmetric")]
    for cp in cps:
        cp.plan(local, capacity)
    want = [cps[0].run(q, lk, lv, return_lse=True) for q, k, v, full, lk, lv, _ in layers]
    outs = [torch.empty_like(w[0]) for w in want]
    lses = [torch.empty_like(w[1]) for w in want]

    def step() -> None:
        for i, (q, k, v, full, lk, lv, _) in enumerate(layers):
            if i % world == rank:
                torch.cuda._sleep(2_000_000)
            cps[1].run(q, lk, lv, out=outs[i])
            lses[i].copy_(cps[1].planned[-1].lse_scratch)

    for turn in range(2):
        step()
        torch.cuda.synchronize()
        for i, (w, w_lse) in enumerate(want):
            assert torch.equal(outs[i], w) and torch.equal(lses[i], w_lse), f"eager turn {turn}, layer {i}"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        step()
    for replay in range(2):
        for o, l in zip(outs, lses):
            o.fill_(float("nan"))
            l.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for i, (w, w_lse) in enumerate(want):
            assert torch.equal(outs[i], w) and torch.equal(lses[i], w_lse), f"replay {replay}, layer {i}"
