"""Context-parallel decode over gloo on the CPU (2 and 3 processes, Triton interpreter), against
the single-process float64 reference on the full cache."""

from __future__ import annotations

import pytest
import torch

import leanattn
from leanattn._testing import MIN_INTERPRETER_TRITON, triton_version
from leanattn.distributed import round_robin_lengths, round_robin_slot

from _dist import Cluster

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed"),
    # The workers run the kernels under the interpreter, on a GPU host too (test_distributed_gpu.py
    # is the NCCL twin).
    pytest.mark.skipif(triton_version() < MIN_INTERPRETER_TRITON, reason=f"the interpreter needs Triton >= {MIN_INTERPRETER_TRITON}"),
]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def cluster(request):
    c = Cluster(request.param, "gloo")
    yield c
    c.close(force=c.broken)


@pytest.mark.parametrize("dtype,paged,head_dim", [("bf16", False, 64), ("fp16", True, 64), ("bf16", True, 512)])
def test_replicated_matches_reference(cluster, dtype, paged, head_dim):
    cluster.check("replicated", dtype, paged, head_dim)


def test_scatter_heads(cluster):
    cluster.check("scatter")


def test_oneshot(cluster):
    errors = cluster.check("oneshot")
    assert all(e < 1.5e-2 for e in errors), errors


@pytest.mark.parametrize("kind,error,words", [
    ("batch", "ValueError", "disagree on batch"),
    ("heads", "ValueError", "disagree on q_heads"),
    ("local", "ValueError", "rejected their own arguments"),
    ("unchecked_first", "RuntimeError", "earlier checked plan"),
    ("unchecked_batch", "ValueError", "must keep the checked (batch, q_len)"),
])
def test_inconsistent_plans_raise_everywhere(cluster, kind, error, words):
    outcomes = cluster.run("mismatch", kind, timeout=90)
    assert all(not o.ok and o.error_type == error for o in outcomes), [(o.error_type, o.message) for o in outcomes]
    last = outcomes[-1].message
    assert all(words in o.message for o in outcomes[: -1]), [o.message for o in outcomes]
    assert words in last or "local_seqlens must be an int32" in last, last
    # Nobody is left inside a collective: the group still works.
    assert cluster.check("ping") == [cluster.world] * cluster.world


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_round_robin_lengths_sum_to_the_lengths(world):
    lens = torch.tensor([0, 1, 15, 16, 17, 64, 100, 1000], dtype=torch.int32)
    local = torch.stack([round_robin_lengths(lens, world, r, 16) for r in range(world)])
    assert local.dtype == torch.int32 and torch.equal(local.sum(0).int(), lens)
    assert (local.max(0).values - local.min(0).values <= 16).all()  # balanced to within one page
    rank, pos = round_robin_slot(torch.arange(1000), world, 16)
    for r in range(world):
        assert torch.equal(pos[rank == r], torch.arange(int(local[r, -1])))


def test_needs_an_initialised_group():
    if torch.distributed.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        leanattn.distributed.ContextParallelDecode(None, 8, 2, 64, torch.float16, "cpu")

