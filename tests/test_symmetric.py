"""Context parallel's one-launch exchange (``merge.push_merge_kernel``) in one process: W ranks'
buffers side by side, each rank's push run before any rank's merge (the interpreter runs a
launch's programs one by one, so a rank's merge may not wait on a rank that has not pushed).
Against ``merge_states_into`` on the same partials, bit for bit, over calls that reuse both
slots. The multi-process runs are in test_distributed.py (gloo, shared files) and
test_distributed_gpu.py (NCCL, torch symmetric memory)."""

from __future__ import annotations

import pytest
import torch

from leanattn.distributed import _symmetric
from leanattn.merge import merge_states_into

from _util import DEVICE


def fake_world(world: int, batch: int, q_len: int, heads_out: int, head_dim: int, dtype: torch.dtype,
               monkeypatch) -> list[_symmetric.SymmetricBuffers]:
    """Every rank's exchange buffers, in this process: each rank's table holds every buffer."""
    made: list[tuple[torch.Tensor, torch.Tensor]] = []

    def rendezvous(group, dev, recv_words, flag_words):
        if not made:
            made.extend((torch.full((recv_words,), float("nan"), device=dev),
                         torch.zeros(flag_words, dtype=torch.int64, device=dev)) for _ in range(world))
        rank = len(sent)
        sent.append(rank)
        return (*made[rank], [r.data_ptr() for r, _ in made], [f.data_ptr() for _, f in made], made)

    sent: list[int] = []
    monkeypatch.setattr(_symmetric, "RENDEZVOUS", rendezvous)
    return [_symmetric.allocate(None, DEVICE, world, batch, q_len, heads_out, head_dim, dtype) for _ in range(world)]


@pytest.mark.parametrize("world,batch,q_len,heads,head_dim,scatter", [
    (2, 3, 1, 4, 64, False),
    (3, 2, 2, 6, 80, True),  # scattered: rank p merges heads [2p, 2p + 2); head dim padded
    (4, 5, 1, 8, 128, False),  # more row blocks than the interpreter's 4 programs
])
def test_push_merge_matches_merge_states(world, batch, q_len, heads, head_dim, scatter, monkeypatch):
    dtype = torch.bfloat16
    heads_out = heads // world if scatter else heads
    syms = fake_world(world, batch, q_len, heads_out, head_dim, dtype, monkeypatch)
    gen = torch.Generator(device=DEVICE).manual_seed(world * 100 + head_dim)
    for call in range(5):  # each slot three times or twice
        parts = torch.randn(world, batch, q_len, heads, head_dim, generator=gen, device=DEVICE).to(dtype)
        lses = torch.randn(world, batch, heads, q_len, generator=gen, device=DEVICE) * 4
        lses[0, 0] = float("-inf")  # rank 0 saw no key of sequence 0: ignored
        parts[0, 0] = float("nan")  # (whatever its rows hold)
        if call == 2:
            lses[world - 1, batch - 1, -1] = float("nan")  # a broken part: that row is NaN
        outs = [torch.empty(batch, q_len, heads_out, head_dim, dtype=dtype, device=DEVICE) for _ in range(world)]
        out_lses = [torch.empty(batch, heads_out, q_len, device=DEVICE) for _ in range(world)]
        for rank in range(world):
            _symmetric.push_merge(syms[rank], rank, parts[rank], lses[rank], outs[rank], out_lses[rank],
                                  scatter=scatter, merge=False)
        for rank in range(world):
            _symmetric.push_merge(syms[rank], rank, parts[rank], lses[rank], outs[rank], out_lses[rank],
                                  scatter=scatter, push=False)
        for rank in range(world):
            mine = slice(rank * heads_out, (rank + 1) * heads_out) if scatter else slice(None)
            want = torch.empty_like(outs[rank])
            want_lse = torch.empty_like(out_lses[rank])
            merge_states_into(parts[:, :, :, mine], lses[:, :, mine], want, want_lse)
            assert torch.equal(outs[rank].nan_to_num(7.0), want.nan_to_num(7.0)), f"call {call}, rank {rank}"
            assert torch.equal(out_lses[rank].nan_to_num(7.0), want_lse.nan_to_num(7.0)), f"call {call}, rank {rank}"
            assert call == 2 or torch.isfinite(outs[rank][1:]).all()
        assert all(int(s.flags.min()) == int(s.flags.max()) == call + 1 for s in syms), "a flag missed its call"


def test_symmetric_needs_cuda_with_torch_symmetric_memory():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _symmetric.torch_rendezvous(None, torch.device("cpu"), 16, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scenario,args", [("gpu_matches_single", (False, "symmetric")),
                                           ("gpu_matches_single", (True, "symmetric")),
                                           ("gpu_graph", (True, "symmetric")),
                                           ("gpu_symmetric_staggered", (True,))])
def test_one_rank_group_through_torch_symmetric_memory(scenario, args):
    """A one-GPU group (NCCL): torch's rendezvous, the compiled kernel, its flags over eager calls
    and graph replays; the two-GPU runs are test_distributed_gpu.py's."""
    from _dist import Cluster

    cluster = Cluster(1, "nccl")
    try:
        cluster.check(scenario, *args, timeout=600)
    finally:
        cluster.close(force=cluster.broken)
