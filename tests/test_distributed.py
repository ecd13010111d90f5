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


def test_symmetric_exchange_gives_the_all_gather_bits(cluster):
    """exchange="symmetric": each rank's kernel writes into the others' buffers (files every
    process maps, standing in for GPU symmetric memory) and waits for theirs."""
    cluster.check("symmetric")


@pytest.mark.parametrize("q_len,window,leftpad,causal,paged", [
    (3, (-1, -1), False, True, False),
    (3, (7, -1), True, True, True),  # a window across the ranks' pages, left padding, a paged cache
    (1, (5, -1), True, True, False),  # one query token with a window and leftpad
    (3, (4, 2), False, False, False),  # not causal: keys after a query, within the window
], ids=["q3", "q3-window-leftpad-paged", "q1-window-leftpad", "q3-noncausal-window"])
def test_global_positions_match_one_device(cluster, q_len, window, leftpad, causal, paged):
    """plan(seqlens=, page_size=): several query tokens, leftpad and windows over each key's
    position in the whole sequence, as leanattn.decode and the reference on the whole cache."""
    cluster.check("positions", "bf16", paged, q_len, window, leftpad, causal)


def test_plain_and_several_query_tokens_alternate(cluster):
    cluster.check("switch_q_len")


def test_oneshot(cluster):
    errors = cluster.check("oneshot")
    assert all(e < 1.5e-2 for e in errors), errors


@pytest.mark.parametrize("kind,error,words", [
    ("batch", "ValueError", "disagree on batch"),
    ("heads", "ValueError", "disagree on q_heads"),
    ("local", "ValueError", "rejected their own arguments"),
    ("unchecked_first", "RuntimeError", "earlier checked plan"),
    ("unchecked_batch", "ValueError", "must keep the checked (batch, q_len)"),
    ("q_len_local", "ValueError", "pass seqlens= (global lengths) and page_size="),
    ("page_size", "ValueError", "disagree on page_size"),
    ("unchecked_window", "ValueError", "must keep the checked (page_size, cache_leftpad given, causal, window_size)"),
    ("capacity", "ValueError", "rejected their own arguments"),
    ("exchange", "ValueError", "disagree on exchange"),
    ("symmetric_alloc", "RuntimeError", "allocating the exchange's local buffers failed on"),  # this rank, another
])
def test_inconsistent_plans_raise_everywhere(cluster, kind, error, words):
    outcomes = cluster.run("mismatch", kind, timeout=90)
    assert all(not o.ok and o.error_type == error for o in outcomes), [(o.error_type, o.message) for o in outcomes]
    last = outcomes[-1].message
    assert all(words in o.message for o in outcomes[: -1]), [o.message for o in outcomes]
    assert words in last or "local_seqlens must be an int32" in last or "its cache has capacity 16" in last, last
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



def _visible_local_keys(n, pad, q_len, world, rank, page, left, right):
    """Brute force: per query token, the rank-local indices (its tokens in global order) of the
    keys it may see: live (pad <= p < n), and left / right of the query within the window."""
    mine = [p for p in range(max(n, pad, 0)) if (p // page) % world == rank]
    start, end = max(pad, 0), max(n, pad, 0)
    out = []
    for j in range(q_len):
        query = end - q_len + j
        out.append({i for i, p in enumerate(mine)
                    if start <= p < end and (left < 0 or p >= query - left) and (right < 0 or p <= query + right)})
    return out, sum(p < end for p in mine)


@pytest.mark.parametrize("world,page", [(1, 16), (2, 16), (3, 4), (4, 1)])
def test_key_bounds_match_a_global_position_mask(world, page):
    """The plan's per-query bounds over a rank's keys against each key's global position."""
    from leanattn._testing import window_bounds
    from leanattn._testing import key_bounds as _key_bounds

    gen = torch.Generator().manual_seed(world * 100 + page)
    lens = torch.randint(0, 120, (24,), generator=gen, dtype=torch.int32)
    lens[:3] = torch.tensor([0, 1, page * world + 1], dtype=torch.int32)
    pads = (torch.rand(24, generator=gen) * (lens.float() + 8)).to(torch.int32)  # some past the length
    pads[0] = 0
    cases = [(1, True, (-1, -1)), (3, True, (-1, -1)), (5, True, (7, -1)), (4, True, (0, -1)),
             (3, False, (-1, -1)), (5, False, (6, 2)), (2, False, (-1, 3)), (16, True, (9, -1))]
    checked_empty = 0
    for q_len, causal, window in cases:
        left, right, _, _ = window_bounds(causal, window, q_len)
        want_right = 0 if causal else window[1]
        for leftpad in (None, pads):
            for rank in range(world):
                end, start, bounds = _key_bounds(lens, leftpad, world, rank, page, q_len, left, right)
                assert end.dtype == start.dtype == bounds.dtype == torch.int32 and bounds.shape == (24, q_len, 2)
                for b in range(24):
                    pad = 0 if leftpad is None else int(leftpad[b])
                    vis, n_end = _visible_local_keys(int(lens[b]), pad, q_len, world, rank, page, window[0],
                                                     want_right)
                    ctx = f"b={b} n={int(lens[b])} pad={pad} q_len={q_len} causal={causal} window={window} rank={rank}"
                    assert int(end[b]) == n_end, ctx
                    s = int(start[b])
                    assert 0 <= s <= n_end, ctx
                    for j in range(q_len):
                        lo, hi = bounds[b, j].tolist()
                        assert 0 <= lo <= hi <= n_end - s, ctx
                        assert set(range(s + lo, s + hi)) == vis[j], f"{ctx} query {j}: {lo, hi} vs {sorted(vis[j])}"
                        checked_empty += not vis[j]
                    # The skipped keys (before the start) are seen by no query.
                    assert not any(i < s for v in vis for i in v), ctx
    assert checked_empty > 0  # some rows were empty on some rank: the case the merge must drop
