"""GPU-only: large sizes with the real grid, a race stress test, CUDA graphs, inductor."""

import dataclasses
import random

import pytest
import torch

import leanattn
from leanattn._testing import WORKSPACES, lean_decode_kernel
from leanattn.bench.peers import capture_cuda_graph

from _util import ON_GPU, assert_close, make_inputs, merge_config, poisoned_like, reference, to_paged

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")]

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


def test_wrapper_of_more_heads_than_sms_in_cuda_graph():
    """A DecodeWrapper made with no batch in mind, planned for a call of more kv heads than SMs
    (the heuristic's two-programs-an-SM config, a larger grid than its first plan's) inside a
    captured graph, replayed with new lengths; then a plan of few heads on the same wrapper."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    hq, hkv, d, cap = 32, 8, 128, 1024
    batch = sms // hkv + 3  # more kv heads than SMs
    q, k, v, sl = make_inputs([cap] * batch, hq, hkv, d, torch.bfloat16)
    w = leanattn.DecodeWrapper(hq, hkv, d, torch.bfloat16, q.device)
    seqlens = torch.full((batch,), cap, dtype=torch.int32, device=q.device)
    out = torch.empty_like(q)

    def step():
        w.plan(seqlens, cap)
        return w.run(q, k, v, out=out, return_lse=True)

    graph, (_, lse) = capture_cuda_graph(step)
    assert w._config.programs_per_sm == 2 and w.num_programs == 2 * sms
    rng = random.Random(5)
    for _ in range(3):
        seqlens.copy_(torch.tensor([rng.randint(0, cap) for _ in range(batch)], dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, lse, *reference(q, k, v, seqlens))
    w.plan(seqlens[:2], cap)
    assert w._config.programs_per_sm == 1
    small, small_lse = w.run(q[:2], k[:2], v[:2], return_lse=True)
    assert_close(small, small_lse, *reference(q[:2], k[:2], v[:2], seqlens[:2]))


@pytest.mark.parametrize("d", leanattn.SUPPORTED_HEAD_DIMS)
def test_merge_kernel_blocks_compile_without_spills(d):
    """The merge kernel's largest blocks of every rows count at head dim ``d`` (one head over a
    grid of one, two or eight programs an SM: the most members a step; and the batch-invariant
    block), two steps of which are live at once, compile without register spills, with the
    per-head V scale, sinks and the LSE."""
    import types

    from leanattn import _call
    from leanattn._launch import _options
    from leanattn._testing import lean_merge_kernel
    from leanattn.kernels.config import next_pow2

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dev = torch.device("cuda")
    features = types.SimpleNamespace(v_scale_kind=1)
    f32 = torch.zeros(64, dtype=torch.float32, device=dev)
    jobs = torch.zeros(64, dtype=torch.int32, device=dev)
    out = torch.zeros(64, dtype=torch.bfloat16, device=dev)
    seen = set()
    rows = 1
    while rows <= leanattn.max_query_rows(d):
        for split, busy in ((0, sms), (0, 2 * sms), (0, 8 * sms), (512, sms)):
            params = dict(MERGE_ROWS=rows, HEAD_DIM=d, HEAD_DIM_PAD=next_pow2(d), SPLIT=split, GROUP=rows, Q_LEN=1,
                          RETURN_LSE=True, HAS_SINKS=True, USE_PDL=True)
            mc = _call.merge_constexprs(params, busy, 1, features)
            key = tuple(sorted(mc.items()))
            if key in seen:
                continue
            seen.add(key)
            compiled = lean_merge_kernel.warmup(jobs, f32, f32, out, f32, f32, f32, 0, 0, 0, 0, 0, 0, 1, **mc,
                                                grid=(1, 1), **_options(_call.MERGE_LAUNCH, True))
            compiled.run  # loads the kernel, which fills in its registers and spills
            assert compiled.n_spills == 0, (mc, compiled.n_regs, compiled.n_spills)
        rows *= 2
    assert seen


def test_plan_of_a_large_call_has_decodes_grid():
    """plan_decode for a large bf16 d=128 call (more kv heads than SMs; few heads over a long
    cache) deals decode's grid (two programs an SM), and decode run with that plan gives
    decode's own bits; for a small call, one program an SM."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    hq, hkv, d = 32, 8, 128
    rng = random.Random(6)
    cases = ([rng.randint(0, 700) for _ in range(sms // hkv + 3)], 2), ([64 * sms, 5], 2), ([700, 31], 1)
    for lens, per_sm in cases:
        q, k, v, sl = make_inputs(lens, hq, hkv, d, torch.bfloat16)
        plan = leanattn.plan_decode(sl, k.shape[1], q_heads=hq, kv_heads=hkv, head_dim=d, kv_dtype=k.dtype)
        assert plan.shape[0] == per_sm * sms
        want, want_lse = leanattn.decode(q, k, v, sl, return_lse=True)
        got, lse = leanattn.decode(q, k, v, sl, return_lse=True, plan=plan)
        assert torch.equal(got, want) and torch.equal(lse, want_lse)
        assert_close(got, lse, *reference(q, k, v, sl))


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_inductor_compile(mode):
    """Compiled with the first decode call inside the compiled step: under "reduce-overhead" the
    workspace is first allocated during the CUDA-graph warm-up, outside the graph's pool."""
    torch._dynamo.reset()
    WORKSPACES.clear()
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


def _fp32_reference(q, k, v, sl, **kw):
    return leanattn.reference.decode(q, k, v, sl, return_lse=True, compute_dtype=torch.float32, **kw)


@pytest.mark.parametrize("merge_kernel", [False, True])
@pytest.mark.parametrize("lens,hkv,group,programs", [
    ([40000], 1, 8, None),  # one head over the whole grid: 17 chunks of the merge tree
    ([9000, 3, 20000, 700], 2, 4, 1000),  # more programs than fit at once: late arrivers in later waves
    ([2048] * 16, 8, 1, 4000),
    ([40000, 10, 10, 10], 1, 8, None),  # merge kernel: the long head's ~130 members in three steps
])
def test_merge_race_stress(lens, hkv, group, programs, merge_kernel):
    """Split heads merged by the last arriver (or by the merge kernel), each call on a new q: a
    merge that read a partial before its program wrote it (an early merge, stores not ordered
    before the ticket, a merge kernel not waiting for the kernel before) would read the previous
    call's partial, which differs. Every call is checked."""
    q, k, v, sl = make_inputs(lens, hkv * group, hkv, 128, torch.bfloat16, seed=12)
    gen = torch.Generator(device=q.device).manual_seed(13)
    config = merge_config(128, torch.bfloat16, group, merge_kernel)
    for _ in range(40):
        q = torch.randn(q.shape, generator=gen, device=q.device).to(q.dtype)
        out, lse = leanattn.decode(q, k, v, sl, return_lse=True, num_programs=programs, config=config)
        assert_close(out, lse, *_fp32_reference(q, k, v, sl))


@pytest.mark.parametrize("lens,hkv,group,programs", [
    ([40000], 1, 8, None),  # 625 splits of 64 tokens: 40 chunks, then their sums
    ([9000, 3, 20000, 700], 2, 4, 1000),
])
def test_batch_invariant_merge_race_stress(lens, hkv, group, programs):
    """The batch-invariant merge (over splits) under the same stress: each call on a new q checked
    against the reference, and its bits equal to those of a grid of one program per SM."""
    q, k, v, sl = make_inputs(lens, hkv * group, hkv, 128, torch.bfloat16, seed=14)
    split = leanattn.choose_config(128, torch.bfloat16, group).tile
    gen = torch.Generator(device=q.device).manual_seed(15)
    for _ in range(20):
        q = torch.randn(q.shape, generator=gen, device=q.device).to(q.dtype)
        kw = dict(return_lse=True, batch_invariant=True, split_size=split)
        out, lse = leanattn.decode(q, k, v, sl, num_programs=programs, **kw)
        assert_close(out, lse, *_fp32_reference(q, k, v, sl))
        other, other_lse = leanattn.decode(q, k, v, sl, num_programs=7, **kw)
        assert torch.equal(out, other) and torch.equal(lse, other_lse)


@pytest.mark.parametrize("kind", ["bf16", "paged", "fp8"])
def test_merge_kernel_in_cuda_graph_with_new_lengths(kind):
    """Two heads over the whole grid (the heuristic merges them in the merge kernel), captured
    once and replayed with new lengths (an empty sequence, one inside a tile, the full cache),
    with sinks and the LSE; fp8 with a per-head K scale and a float V scale (the merge kernel
    applies V's): every replay against the reference."""
    from leanattn._testing import DECODE_CALLS

    cap, d = 20000, 128
    q, k, v, sl = make_inputs([cap, cap], 8, 1, d, torch.bfloat16, seed=21)
    sinks = torch.randn(8, device=q.device)
    kw = dict(sinks=sinks)
    if kind == "fp8":
        k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
        kw.update(k_scale=torch.rand(1, device=q.device) + 0.5, v_scale=0.75)
    kc, vc = k, v
    if kind == "paged":
        kc, vc, table = to_paged(k, v, [cap, cap], 64)
        kw["block_table"] = table
    seqlens = sl.clone()
    out = torch.empty_like(q)
    DECODE_CALLS.clear()
    graph, (_, lse) = capture_cuda_graph(lambda: leanattn.decode(q, kc, vc, seqlens, out=out, return_lse=True, **kw))
    assert DECODE_CALLS and all(call.merge_params is not None for call in DECODE_CALLS.values())
    ref_kw = {name: value for name, value in kw.items() if name != "block_table"}
    for new in ([cap, cap], [0, cap], [37, 19000], [cap - 1, 1], [0, 0]):
        seqlens.copy_(torch.tensor(new, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, lse, *reference(q, k, v, seqlens, **ref_kw))


@pytest.mark.parametrize("magnitude", [1e30, 1e-30, 3e4])
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_extremes(magnitude, kv_dtype):
    """fp8 caches multiply in fp16 after scaling q by a power of two into [2^13, 2^15): q of any
    bf16 magnitude stays exact, and an inf in one query row leaves the other rows of its group
    exact (only finite values set the power)."""
    q, k, v, sl = make_inputs([3000, 0, 129], 32, 4, 128, torch.bfloat16, seed=14)
    scale = 1.0 / (magnitude * 448.0 * 128) if magnitude > 1 else None  # keeps the scores finite
    q = (q.float() * magnitude).to(torch.bfloat16)
    k8, v8 = (k.float() * 50).clamp(-400, 400).to(kv_dtype), v.to(kv_dtype)
    kw = dict(k_scale=torch.rand(4, device=q.device) + 0.5, v_scale=0.25, softmax_scale=scale)
    out, lse = leanattn.decode(q, k8, v8, sl, return_lse=True, **kw)
    assert_close(out, lse, *reference(q, k8, v8, sl, **kw))
    q[2, 0, 9, 3] = float("inf")  # kv head 1 of sequence 2: rows 8-15 share the pre-scale
    out, lse = leanattn.decode(q, k8, v8, sl, return_lse=True, **kw)
    ref, ref_lse = reference(q, k8, v8, sl, **kw)
    fine = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
    fine[2, 9] = False
    assert not torch.isfinite(out[2, 0, 9]).all()
    assert_close(out.transpose(1, 2)[fine], lse[fine], ref.transpose(1, 2)[fine], ref_lse[fine])


def test_merge_orders_partials_before_tickets():
    """The merge's memory ordering, read off the compiled code: each arrival ticket is an
    acquire-release atomic at GPU scope, right after a block barrier (every thread's partial
    stores are ordered before it). A race stress test rarely sees a missing fence; this does.
    The merge kernel reads the partials and its jobs past L1 (``.cg``): they were written from
    other SMs by the kernel before, and L1 is not coherent."""
    from leanattn._testing import DECODE_CALLS

    q, k, v, sl = make_inputs([40000], 8, 1, 128, torch.bfloat16, seed=15)
    base = leanattn.choose_config(128, torch.bfloat16, 8)
    for merge_kernel in (False, True):  # one head split over the grid: both merges are compiled in
        leanattn.decode(q, k, v, sl, config=dataclasses.replace(base, merge_kernel=merge_kernel))
    invariant = merge_config(128, torch.bfloat16, 8, True, batch_invariant=True)  # the merge kernel by slot
    leanattn.decode(q, k, v, sl, config=invariant, batch_invariant=True, split_size=512)
    calls = [c for c in DECODE_CALLS.values() if c.hit is not None]
    merged = [c for c in calls if c.merge_hit is not None and not c.merge_params["HAS_SINKS"]
              and not c.merge_params["V_SCALE_KIND"]]
    assert merged
    for call in merged:
        lines = call.merge_hit[0].asm["ptx"].splitlines()
        loads = [i for i, line in enumerate(lines) if "ld.global" in line]
        assert loads and all(".cg" in lines[i] for i in loads), f"a partial may come from a stale L1 line: {loads}"
        if call.merge_params["USE_PDL"]:  # launched early: nothing is read before the decode kernel is done
            waits = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
            assert waits and waits[0] < loads[0], "the merge kernel reads before griddepcontrol.wait"
    checked = 0
    for compiled in (c.hit[0] for c in calls if not c.params["MERGE_KERNEL"]):
        lines = [line.strip() for line in compiled.asm["ptx"].splitlines()]
        atomics = [i for i, line in enumerate(lines) if "atom." in line and ".add" in line]  # maybe predicated
        assert len(atomics) >= 2, "the two arrival tickets are missing"
        for i in atomics:
            assert ".acq_rel" in lines[i] and ".gpu" in lines[i], f"ticket not acq_rel at GPU scope: {lines[i]}"
            assert any("bar.sync" in line for line in lines[max(0, i - 12):i]), \
                f"no barrier before the ticket: {lines[max(0, i - 12):i + 1]}"
        checked += 1
    assert checked > 0


# (head_dim, q_heads, kv_heads, q_len): each new head dim at one query row a kv head and at its
# most without spills (d=192 and 256 spill above 32 rows: WIDE_HEADS_MANY_ROWS), heads long
# enough to be split over the default grid.
NEW_HEAD_DIMS = [(32, 32, 8, 1), (32, 32, 2, 8), (192, 32, 8, 1), (192, 64, 8, 4), (512, 32, 8, 1),
                 (512, 16, 1, 1), (512, 32, 16, 8)]
# HEAD_DIM_PAD 256 at leanattn.max_query_rows (128): the accumulator alone takes 128 registers a
# thread and the kernel spills (measured on an H200: 148 spill stores at 64 rows, ~540 at 128);
# the values must still be the reference's.
WIDE_HEADS_MANY_ROWS = [(192, 64, 8, 16), (256, 64, 8, 16)]


@pytest.mark.parametrize("d,hq,hkv,q_len", WIDE_HEADS_MANY_ROWS)
def test_wide_heads_at_most_query_rows_are_exact(d, hq, hkv, q_len):
    lens = [9000, 3001, 1, 0]
    _, k, v, sl = make_inputs(lens, hq, hkv, d, torch.bfloat16, seed=18)
    q = torch.randn(len(lens), q_len, hq, d, generator=torch.Generator().manual_seed(19)).to(torch.bfloat16).cuda()
    assert q_len * hq // hkv == leanattn.max_query_rows(d)
    out, lse = leanattn.decode(q, k, v, sl, return_lse=True)
    assert_close(out, lse, *reference(q, k, v, sl))


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("d,hq,hkv,q_len", NEW_HEAD_DIMS)
def test_new_head_dims_compile_without_spills(d, hq, hkv, q_len, kv_dtype):
    """Head dims 32, 192 and 512 compile for 16-bit and fp8 caches with the heuristic's config,
    without register spills, and give the reference's values (DecodeWrapper, then decode)."""
    lens = [20000, 3001, 1, 0]
    _, k, v, sl = make_inputs(lens, hq, hkv, d, torch.bfloat16, seed=16)
    q = torch.randn(len(lens), q_len, hq, d, generator=torch.Generator().manual_seed(17)).to(torch.bfloat16).cuda()
    k, v = k.to(kv_dtype), v.to(kv_dtype)
    kw = dict(k_scale=torch.rand(hkv, device=q.device) + 0.5, v_scale=0.5) if kv_dtype.itemsize == 1 else {}
    w = leanattn.DecodeWrapper(hq, hkv, d, torch.bfloat16, q.device, kv_dtype=kv_dtype, max_q_len=q_len)
    w.plan(sl, k.shape[1], q_len=q_len)
    out = w.run(q, k, v, **kw)
    w.run(q, k, v, **kw)  # the second run launches the compiled kernel directly
    direct, lse = leanattn.decode(q, k, v, sl, return_lse=True, **kw)
    assert torch.equal(out, direct), "the wrapper and decode (one grid) differ"
    assert_close(out, lse, *reference(q, k, v, sl, **kw))
    report = [(c.n_regs, c.n_spills, c.metadata.shared) for c in w.compiled_kernels]
    assert report and all(spills == 0 for _, spills, _ in report), f"(registers, spills, shared bytes): {report}"


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kinds", [("token", "token"), ("seq", "token"), ("token", "head")])
def test_fp8_finer_scales_in_fp16_products_and_cuda_graphs(kinds, q_dtype):
    """Per-token scales of engines' size (1e-4..1e-2: p times them would be fp16 subnormals)
    through both PV products of per-token V scales (bf16 weights with a bf16 q; fp16 weights
    brought into range per tile with an fp16 q), in a CUDA graph whose replays see new scale
    values written in place."""
    lens = [3000, 0, 129, 4096]
    q, k, v, sl = make_inputs(lens, 32, 4, 128, q_dtype, seed=16)
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    kp, vp, table = to_paged(k8, v8, lens, 16, seed=16)
    gen = torch.Generator(device=q.device).manual_seed(17)

    def draw(kind: str) -> torch.Tensor:
        shape = {"head": (4,), "seq": (len(lens), 4), "token": tuple(kp.shape[:3])}[kind]
        return 10 ** (torch.rand(shape, generator=gen, device=q.device) * 2 - 4)

    ks, vs = draw(kinds[0]), draw(kinds[1])
    out = torch.empty_like(q)
    graph, (_, lse) = capture_cuda_graph(
        lambda: leanattn.decode(q, kp, vp, sl, block_table=table, k_scale=ks, v_scale=vs, out=out, return_lse=True)
    )
    for _ in range(3):
        ks.copy_(draw(kinds[0]))
        vs.copy_(draw(kinds[1]))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, lse, *reference(q, kp, vp, sl, block_table=table, k_scale=ks, v_scale=vs))


@pytest.mark.parametrize("merge_kernel", [False, True])
@pytest.mark.parametrize("planned", [False, True])
def test_timeline_stamps_are_ordered_and_change_no_bits(planned, merge_kernel):
    """The TIMELINE probe: every program with a share stamps its events in order (the ticket only
    where it left a partial), a program without one stamps none past its start and wait, and
    the output's bits are the plain kernel's (the ticket tree's merge, or the merge kernel's)."""

    from leanattn._testing import DECODE_CALLS, wrapper_calls

    lens = [30000, 77, 4096]
    q, k, v, sl = make_inputs(lens, 16, 2, 128, torch.bfloat16)
    base = merge_config(128, k.dtype, 8, merge_kernel)
    timed = dataclasses.replace(base, constexprs=(("TIMELINE", True),))
    plain = leanattn.decode(q, k, v, sl, num_programs=300, config=base)
    if planned:
        w = leanattn.DecodeWrapper(16, 2, 128, torch.bfloat16, q.device, config=timed, num_programs=300)
        w.plan(sl, k.shape[1])
        out = w.run(q, k, v)
        (call,) = wrapper_calls(w)
    else:
        out = leanattn.decode(q, k, v, sl, num_programs=300, config=timed)
        (call,) = [c for c in DECODE_CALLS.values() if c.timeline is not None and c.params["MERGE_KERNEL"] == merge_kernel]
    assert torch.equal(out, plain)
    stamps = call.timeline.cpu()
    ran = stamps[:, 6] != 0
    assert 0 < ran.sum() <= 300 and (stamps[:, 0] != 0).all()
    cut = ran & (stamps[:, 5] != 0)
    assert 0 < cut.sum() < ran.sum()  # 30000 is cut among many programs; 77 is not
    assert (stamps[cut].diff(dim=1) >= 0).all()
    assert (stamps[ran & ~cut][:, [0, 1, 2, 3, 4, 6]].diff(dim=1) >= 0).all()
    assert (stamps[~ran][:, 2:] == 0).all()


@pytest.mark.parametrize("d,kv_dtype,paged", [
    (96, torch.bfloat16, False),  # 3 stages of 64 x 128 tiles: ~70 KiB, three would fit an SM
    (64, torch.bfloat16, False),  # under 48 KiB: the limit is raised for the padded size
    (128, torch.bfloat16, True),
    (128, torch.float8_e4m3fn, False),
    (128, torch.bfloat16, False),  # 6 stages (a small call): alone on its SM already
])
def test_launch_keeps_programs_per_sm(d, kv_dtype, paged):
    """The driver's occupancy of the launched kernel at the dynamic shared memory it is launched
    with is the config's programs per SM (not more, which lets the block scheduler stack programs
    on some SMs and leave others empty; not fewer, which would leave programs waiting for a
    second wave), and the results are exact."""
    import ctypes

    from leanattn._testing import wrapper_calls

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    lens = [64 * (sms // 2), 40 * (sms // 2)]  # 8 heads of sms / 2 tiles: a small call
    q, k, v, sl = make_inputs(lens, 16, 4, d, torch.bfloat16)
    kw, kc, vc = {}, k, v
    if kv_dtype != torch.bfloat16:
        kc, vc = k.to(kv_dtype), v.to(kv_dtype)
        kw = {"k_scale": 1.0, "v_scale": 1.0}
    capacity = k.shape[1]
    if paged:
        kc, vc, table = to_paged(kc, vc, lens, 16)
        kw["block_table"] = table
        capacity = table.shape[1] * 16
    w = leanattn.DecodeWrapper(16, 4, d, torch.bfloat16, q.device, kv_dtype=kv_dtype, paged=paged)
    w.plan(sl, capacity)
    out = w.run(q, kc, vc, **kw)
    (call,) = wrapper_calls(w)
    if (d, kv_dtype, paged) == (128, torch.bfloat16, False):
        assert call.config.num_stages == 6  # the case it stands for
    cuda = ctypes.CDLL("libcuda.so.1")
    # The graph's decode kernel, and the eager form's where the call has one (small calls of the
    # merge kernel's rule: _call.EAGER_ONE_LAUNCH_BYTES), which eager runs launch.
    assert call.hit is not None
    for hit in (call.hit, call.eager_hit):
        if hit is None:
            continue
        compiled, _, (warps, _, shared), _ = hit
        assert shared >= compiled.metadata.shared
        blocks = ctypes.c_int(0)
        assert cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(blocks), ctypes.c_void_p(compiled.function), warps * 32, ctypes.c_size_t(shared)) == 0
        assert blocks.value == call.config.programs_per_sm
    torch.cuda.synchronize()
    ref = reference(q, kc, vc, sl, block_table=kw.get("block_table"), k_scale=kw.get("k_scale"),
                    v_scale=kw.get("v_scale"))
    assert_close(out, None, ref[0], None)


def test_small_eager_call_takes_one_launch_and_its_graph_the_merge_kernel(monkeypatch):
    """1 x 20000 tokens, 8/1 heads (the merge kernel's rule; 10 MiB of K and V): after the first
    call, an eager call launches one kernel (the ticket tree), bit for bit repeatable; a graph
    captured after it replays the merge kernel; both match the reference, and each other to
    fp32 rounding."""
    from leanattn import _call
    from leanattn._testing import DECODE_CALLS

    q, k, v, sl = make_inputs([20000], 8, 1, 128, torch.bfloat16, seed=4)
    DECODE_CALLS.clear()
    first, first_lse = leanattn.decode(q, k, v, sl, return_lse=True)
    (call,) = DECODE_CALLS.values()
    assert call.params["MERGE_KERNEL"] and call.eager_params is not None and call.graph_loaded
    assert call.hit is not None and call.merge_hit is not None and call.eager_hit is not None
    launches = []
    real = _call.launch
    monkeypatch.setattr(_call, "launch", lambda *a, **kw: (launches.append(a[3].get("MERGE_KERNEL")), real(*a, **kw))[1])
    again, again_lse = leanattn.decode(q, k, v, sl, return_lse=True)
    torch.cuda.synchronize()
    assert launches == [False]
    assert torch.equal(first, again) and torch.equal(first_lse, again_lse)
    assert_close(first, first_lse, *reference(q, k, v, sl))
    out = torch.empty_like(q)
    launches.clear()
    graph, (_, lse) = capture_cuda_graph(lambda: leanattn.decode(q, k, v, sl, out=out, return_lse=True))
    assert launches[-2:] == [True, None]  # captured: the decode kernel, then the merge kernel
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, lse, *reference(q, k, v, sl))
    assert (out.float() - first.float()).abs().max().item() <= 1e-2
    assert torch.allclose(lse, first_lse, atol=1e-5)


def test_one_compile_under_several_programs_per_sm():
    """A config's programs per SM is a launch option, not a compile one, so one compiled kernel is
    launched with the dynamic shared memory of each cap (d=64, 36 KiB: 76 KiB for two an SM, 57
    KiB for three). Launching two, three, then two again must run, with equal results: the
    driver's limit raised for 76 KiB must not have been lowered to 57 in between."""
    from dataclasses import replace

    lens = [5000, 3000]
    q, k, v, sl = make_inputs(lens, 16, 4, 64, torch.bfloat16)
    base = leanattn.choose_config(64, torch.bfloat16, 4)
    outs = []
    for per_sm in (2, 3, 2):
        outs.append(leanattn.decode(q, k, v, sl, config=replace(base, programs_per_sm=per_sm)))
        torch.cuda.synchronize()
    ref = reference(q, k, v, sl)
    for out in outs:
        assert_close(out, None, ref[0], None)
