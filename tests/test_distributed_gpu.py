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


@pytest.mark.parametrize("scatter_heads", [False, True])
def test_matches_single_gpu(cluster, scatter_heads):
    cluster.check("gpu_matches_single", scatter_heads, timeout=600)


@pytest.mark.parametrize("paged", [False, True])
def test_cuda_graph_replay(cluster, paged):
    cluster.check("gpu_graph", paged, timeout=600)


def test_inconsistent_plans_raise_everywhere(cluster):
    outcomes = cluster.run("mismatch", "batch", timeout=120)
    assert all(not o.ok and "disagree on batch" in o.message for o in outcomes), [o.message for o in outcomes]
    assert cluster.check("ping") == [2, 2]
