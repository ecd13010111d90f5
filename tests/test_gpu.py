"""GPU-only: large sizes with the real grid, a race stress test, CUDA graphs, inductor."""

import random

import pytest
import torch

import leanattn
from leanattn import api
from leanattn.bench.peers import capture_cuda_graph

from _util import ON_GPU, assert_close, make_inputs, poisoned_like, reference, to_paged

pytestmark = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")

LARGE = [
    ([131072], 32, 8, 128),
    ([131072, 1, 0, 77777], 8, 1, 128),
    ([random.Random(1).randint(0, 8192) for _ in range(64)], 32, 8, 128),
    ([4096] * 64, 32, 32, 64),
    ([65536] * 3, 40, 40, 128),
    ([30000, 5], 16, 2, 256),
    ([100000], 28, 4, 128),  # group 7
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lens,hq,hkv,d", LARGE)
def test_large_default_grid(lens, hq, hkv, d, dtype):
    q, k, v, sl = make_inputs(lens, hq, hkv, d, dtype)
    out = poisoned_like(q)
    _, lse = leanattn.decode(q, k, v, sl, return_lse=True, out=out)
    assert_close(out, lse, *reference(q, k, v, sl))


def test_race_stress_bitwise():
    """Many calls on random ragged batches with heads split across many programs: every repeat
    must match the first bitwise, and the first must match the reference."""
    rng = random.Random()
    for _ in range(30):
        lens = [rng.choice([0, 1, rng.randint(1, 3000), rng.randint(1, 40000)]) for _ in range(rng.randint(1, 12))]
        hkv = rng.choice([1, 2, 8])
        q, k, v, sl = make_inputs(lens, hkv * rng.choice([1, 4, 5, 8]), hkv, 128, torch.bfloat16)
        programs = rng.choice([None, 7, 97, 1000, 4000])
        first, first_lse = leanattn.decode(q, k, v, sl, return_lse=True, num_programs=programs)
        assert_close(first, first_lse, *reference(q, k, v, sl))
        for _ in range(20):
            again, lse = leanattn.decode(q, k, v, sl, return_lse=True, num_programs=programs)
            assert torch.equal(again, first) and torch.equal(lse, first_lse)


@pytest.mark.parametrize("paged", [False, True])
def test_cuda_graph_replay_with_new_lengths(paged):
    cap = 4096
    batch, hq, hkv, d = 6, 32, 8, 128
    q, k, v, sl = make_inputs([cap] * batch, hq, hkv, d, torch.bfloat16)
    kw = {}
    if paged:
        kp, vp, table = to_paged(k, v, [cap] * batch, 16)
        kc, vc, kw = kp, vp, {"block_table": table}
    else:
        kc, vc = k, v
    seqlens = torch.full((batch,), cap, dtype=torch.int32, device=q.device)
    out = torch.empty_like(q)
    graph, (_, lse) = capture_cuda_graph(
        lambda: leanattn.decode(q, kc, vc, seqlens, out=out, return_lse=True, **kw)
    )
    rng = random.Random(3)
    for trial in range(8):
        new = [0, cap, 1] + [rng.randint(0, cap) for _ in range(batch - 3)]
        rng.shuffle(new)
        if trial == 0:
            new = [0] * batch
        if trial == 1:
            new = [cap] * batch
        seqlens.copy_(torch.tensor(new, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, lse, *reference(q, k, v, seqlens))


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_inductor_compile(mode):
    """Compiled with the first decode call inside the compiled step: under "reduce-overhead" the
    workspace is first allocated during the CUDA-graph warm-up, outside the graph's pool."""
    torch._dynamo.reset()
    api._WORKSPACES.clear()
    q, k, v, sl = make_inputs([5000, 0, 777], 32, 8, 128, torch.bfloat16)

    def step(q, k, v, sl):
        out, lse = leanattn.decode(torch.nn.functional.rms_norm(q, (128,)), k, v, sl, return_lse=True)
        return out * 2, lse

    compiled = torch.compile(step, fullgraph=True, mode=mode)
    for lens in ([5000, 0, 777], [1, 4000, 5000], [0, 0, 3]):
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        out, lse = compiled(q, k, v, sl)
        out, lse = out.clone(), lse.clone()
        ref, ref_lse = reference(torch.nn.functional.rms_norm(q, (128,)), k, v, sl)
        assert_close(out / 2, lse, ref, ref_lse)
