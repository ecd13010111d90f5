"""Context-parallel decode over NCCL on two GPUs: against one GPU and the float64 reference, the
same bits on both ranks, and inside a CUDA graph. Run on a machine with two or more GPUs."""

from __future__ import annotations

import pytest
import torch

from _dist import Cluster

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(2, "nccl")
    yield c
    c.close(force=c.broken)


@pytest.mark.parametrize("exchange", ["all_gather", "symmetric"])
@pytest.mark.parametrize("scatter_heads", [False, True])
def test_matches_single_gpu(cluster, scatter_heads, exchange):
    cluster.check("gpu_matches_single", scatter_heads, exchange, timeout=600)


@pytest.mark.parametrize("q_len,window,leftpad,causal,paged", [
    (3, (-1, -1), False, True, False),
    (3, (7, -1), True, True, True),
    (1, (5, -1), True, True, False),
    (3, (4, 2), False, False, False),
], ids=["q3", "q3-window-leftpad-paged", "q1-window-leftpad", "q3-noncausal-window"])
def test_global_positions_match_one_device(cluster, q_len, window, leftpad, causal, paged):
    """The CPU suite's scenarios (test_distributed.py) over NCCL, compiled kernels."""
    cluster.check("positions", "bf16", paged, q_len, window, leftpad, causal, timeout=600)


@pytest.mark.parametrize("q_len,window,paged", [(4, (-1, -1), False), (16, (4096, -1), True), (2, (100, -1), False)])
def test_global_positions_long(cluster, q_len, window, paged):
    """Long ragged sequences (128k), group 4, head dim 128, dealt pages of 64, leftpad: against one
    GPU running leanattn on the whole cache and the float64 reference, the same bits on both ranks."""
    cluster.check("positions", "bf16", paged, q_len, window, True, True, [131072, 77777, 1], 32, 8, 128, 64,
                  timeout=600)


@pytest.mark.parametrize("q_len,window,exchange", [(4, (-1, -1), "all_gather"), (8, (1000, -1), "all_gather"),
                                                   (4, (1000, -1), "symmetric")])
def test_cuda_graph_replay_global_positions(cluster, q_len, window, exchange):
    cluster.check("gpu_graph_positions", q_len, window, exchange, timeout=600)


@pytest.mark.parametrize("exchange", ["all_gather", "symmetric"])
@pytest.mark.parametrize("paged", [False, True])
def test_cuda_graph_replay(cluster, paged, exchange):
    cluster.check("gpu_graph", paged, exchange, timeout=600)


@pytest.mark.parametrize("scatter_heads", [False, True])
def test_symmetric_exchange_with_ranks_out_of_step(cluster, scatter_heads):
    cluster.check("gpu_symmetric_staggered", scatter_heads, timeout=600)


def test_inconsistent_plans_raise_everywhere(cluster):
    outcomes = cluster.run("mismatch", "batch", timeout=120)
    assert all(not o.ok and "disagree on batch" in o.message for o in outcomes), [o.message for o in outcomes]
    assert cluster.check("ping") == [2, 2]
