"""fp8 dequantisation scales of every kind against the float64 reference: per kv head (a float or
(kv_heads,)), per (sequence, kv head) and per token and kv head (shaped like the cache without
head_dim), mixed kinds for K and V, contiguous and paged caches, one and several query tokens;
through decode, the wrapper and torch.compile; value checks and argument errors."""

from __future__ import annotations

import pytest
import torch

import leanattn

from _util import DEVICE, assert_close, make_inputs, poisoned_like, reference, to_paged

HQ, HKV, D = 4, 2, 64
FP8 = torch.float8_e4m3fn
KINDS = ["float", "head", "seq", "token"]


def scale_of(kind: str, cache: torch.Tensor, batch: int, seed: int) -> float | torch.Tensor:
    """A scale of ``kind`` for ``cache`` (contiguous or paged). Per-token scales spread over
    1e-3..10, as engines' amax / 448 scales do, so a kernel that dropped or misplaced one fails."""
    if kind == "float":
        return 0.75
    gen = torch.Generator().manual_seed(seed)
    shape = {"head": (HKV,), "seq": (batch, HKV), "token": tuple(cache.shape[:3])}[kind]
    if kind == "token":
        return (10 ** (torch.rand(shape, generator=gen) * 4 - 3)).to(DEVICE)
    return (0.5 + torch.rand(shape, generator=gen)).to(DEVICE)


def fp8_case(q_len: int, paged: bool, seed: int = 0):
    """(q, k_cache, v_cache, cache_seqlens, extra): three sequences, one over two tiles, one
    empty, fp8 e4m3 caches; ``extra`` has the block table when paged."""
    tile = leanattn.choose_config(D, FP8, q_len * HQ // HKV).tile
    lens = [2 * tile + 9, 17, 0]
    _, k, v, sl = make_inputs(lens, HQ, HKV, D, torch.bfloat16, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lens), q_len, HQ, D, generator=gen).to(torch.bfloat16).to(DEVICE)
    k8, v8 = k.to(FP8), v.to(FP8)
    if not paged:
        return q, k8, v8, sl, {}
    kp, vp, table = to_paged(k8, v8, lens, 16, seed=seed)
    return q, kp, vp, sl, {"block_table": table}


CONFIGS = {
    # Left padding moves each sequence's first key: per-token scales must follow the cache rows.
    "contiguous q_len 1 leftpad": dict(q_len=1, paged=False, leftpad=[3, 2, 0], window_size=(-1, -1)),
    # A window skips the tiles before it: the scales' rows start where the keys do.
    "paged q_len 3 window": dict(q_len=3, paged=True, leftpad=None, window_size=(40, -1)),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("v_kind", KINDS)
@pytest.mark.parametrize("k_kind", KINDS)
def test_every_kind_pair_matches_the_reference(k_kind, v_kind, config):
    cfg = CONFIGS[config]
    q, kc, vc, sl, extra = fp8_case(cfg["q_len"], cfg["paged"], seed=1)
    kw = dict(extra, window_size=cfg["window_size"], k_scale=scale_of(k_kind, kc, 3, seed=2),
              v_scale=scale_of(v_kind, vc, 3, seed=3))
    if cfg["leftpad"] is not None:
        kw["cache_leftpad"] = torch.tensor(cfg["leftpad"], dtype=torch.int32, device=DEVICE)
    out = poisoned_like(q)
    _, lse = leanattn.decode(q, kc, vc, sl, out=out, return_lse=True, num_programs=5, check=True, **kw)
    ref, ref_lse = reference(q, kc, vc, sl, **kw)
    assert_close(out, lse, ref, ref_lse)
    if "token" in (k_kind, v_kind):
        # The per-token scales matter: the same call with their mean per head differs.
        mean = {n: kw[n].mean(dim=(0, 1)) if isinstance(kw[n], torch.Tensor) and kw[n].dim() == 3 else kw[n]
                for n in ("k_scale", "v_scale")}
        other = reference(q, kc, vc, sl, **dict(kw, **mean))[0]
        assert (other - ref).norm() > 0.05 * ref.norm()


def test_paged_token_scales_follow_the_block_table():
    """Per-token scales stored by page and slot give the contiguous cache's reference result:
    the kernel (and the paged reference) read each scale at its key's page and slot."""
    q, k8, v8, sl, _ = fp8_case(2, paged=False, seed=4)
    ks, vs = scale_of("token", k8, 3, seed=5), scale_of("token", v8, 3, seed=6)
    lens = sl.tolist()
    kp, vp, table = to_paged(k8, v8, lens, 16, seed=7)
    # The scales go through the same pages: stack them as two extra head_dim columns.
    both = torch.stack([ks, vs], dim=-1).to(torch.float32)
    pages_of, _, _ = to_paged(both, both, lens, 16, seed=7)
    ksp, vsp = pages_of[..., 0].contiguous(), pages_of[..., 1].contiguous()
    out, lse = leanattn.decode(q, kp, vp, sl, block_table=table, k_scale=ksp, v_scale=vsp, return_lse=True,
                               num_programs=3)
    assert_close(out, lse, *reference(q, k8, v8, sl, k_scale=ks, v_scale=vs))


def test_wrapper_matches_decode_for_each_kind():
    """One wrapper runs every kind in turn (a new kind is a new call key): each run equals decode
    bitwise."""
    q, kc, vc, sl, extra = fp8_case(2, paged=True, seed=8)
    w = leanattn.DecodeWrapper(HQ, HKV, D, torch.bfloat16, DEVICE, kv_dtype=FP8, max_q_len=2, num_programs=4)
    w.plan(sl, extra["block_table"].shape[1] * kc.shape[1], q_len=2)
    for k_kind, v_kind in [("head", "token"), ("token", "seq"), ("seq", "head"), ("token", "token")]:
        kw = dict(k_scale=scale_of(k_kind, kc, 3, seed=9), v_scale=scale_of(v_kind, vc, 3, seed=10))
        out, lse = w.run(q, kc, vc, return_lse=True, check=True, **extra, **kw)
        want, want_lse = leanattn.decode(q, kc, vc, sl, return_lse=True, num_programs=4, **extra, **kw)
        assert torch.equal(out, want) and torch.equal(lse, want_lse), (k_kind, v_kind)
        assert_close(out, lse, *reference(q, kc, vc, sl, **extra, **kw))


def test_compiled_decode_takes_token_scales():
    torch._dynamo.reset()
    q, kc, vc, sl, extra = fp8_case(1, paged=True, seed=11)
    ks, vs = scale_of("token", kc, 3, seed=12), scale_of("seq", vc, 3, seed=13)

    def step(q, kc, vc, sl, table, ks, vs):
        return leanattn.decode(q * 1.0, kc, vc, sl, block_table=table, k_scale=ks, v_scale=vs, num_programs=5)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(q, kc, vc, sl, extra["block_table"], ks, vs)
    assert torch.equal(out, step(q, kc, vc, sl, extra["block_table"], ks, vs))
    out_lse = leanattn.decode(q, kc, vc, sl, block_table=extra["block_table"], k_scale=ks, v_scale=vs,
                              return_lse=True)
    assert_close(out, out_lse[1], *reference(q, kc, vc, sl, block_table=extra["block_table"], k_scale=ks,
                                             v_scale=vs))
    lse = torch.empty(3, HQ, 1, dtype=torch.float32, device=DEVICE)
    torch.library.opcheck(
        torch.ops.leanattn.decode_into.default,
        (q, kc, vc, torch.empty_like(q), lse, sl, extra["block_table"], 0.125, 3),
        dict(k_scale=ks, v_scale=vs), test_utils=("test_faketensor",),  # test_schema: allclose has no fp8
    )


def test_check_reads_only_the_live_rows_of_token_scales():
    """``check=True`` refuses a non-finite per-token scale in a live row, naming its index, its
    sequence and position; rows past a length or on pages nobody owns may hold anything (they
    are never read), and the result is then the reference's."""
    q, kc, vc, sl, extra = fp8_case(1, paged=True, seed=14)
    table = extra["block_table"]
    ks, vs = scale_of("token", kc, 3, seed=15), scale_of("token", vc, 3, seed=16)
    n1 = int(sl[1])
    owned = {int(p) for p in table[:, : -(-max(sl.tolist()) // 16)].flatten() if 0 <= int(p) < kc.shape[0]}
    free = [p for p in range(kc.shape[0]) if p not in owned]
    ks[free], vs[free] = float("nan"), float("inf")
    last = int(table[1, (n1 - 1) // 16])
    ks[last, n1 % 16:], vs[last, n1 % 16:] = float("nan"), float("nan")  # past sequence 1's length
    out, lse = leanattn.decode(q, kc, vc, sl, return_lse=True, k_scale=ks, v_scale=vs, check=True, **extra)
    assert_close(out, lse, *reference(q, kc, vc, sl, k_scale=ks, v_scale=vs, **extra))
    page, slot = int(table[1, 3 // 16]), 3 % 16
    vs[page, slot, 1] = float("nan")
    with pytest.raises(ValueError, match=rf"v_scale\[{page}, {slot}, 1\] = nan is not finite \(sequence 1, "
                                         r"position 3, kv head 1: a live row\)"):
        leanattn.decode(q, kc, vc, sl, k_scale=ks, v_scale=vs, check=True, **extra)
    q, k8, v8, sl, _ = fp8_case(1, paged=False, seed=17)
    ks = scale_of("seq", k8, 3, seed=18)
    ks[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"k_scale\[2, 1\] = inf is not finite \(sequence 2, kv head 1\)"):
        leanattn.decode(q, k8, v8, sl, k_scale=ks, check=True)
    vs = scale_of("token", v8, 3, seed=19)
    vs[0, int(sl[0]) - 1, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"v_scale\[0, {int(sl[0]) - 1}, 0\] = nan is not finite"):
        leanattn.decode(q, k8, v8, sl, v_scale=vs, check=True)
    # Rows before every query's window are not read either.
    vs = scale_of("token", v8, 3, seed=20)
    left, n0 = 4, int(sl[0])
    reached = n0 - q.shape[1] - left  # the first key the window reaches
    assert reached > 0
    vs[0, :reached] = float("nan")
    out, lse = leanattn.decode(q, k8, v8, sl, v_scale=vs, window_size=(left, -1), return_lse=True, check=True)
    assert_close(out, lse, *reference(q, k8, v8, sl, v_scale=vs, window_size=(left, -1)))
    vs[0, reached, 1] = float("nan")
    with pytest.raises(ValueError, match=rf"v_scale\[0, {reached}, 1\] = nan is not finite"):
        leanattn.decode(q, k8, v8, sl, v_scale=vs, window_size=(left, -1), check=True)


def test_bad_scales_are_refused_by_name():
    q, k8, v8, sl, _ = fp8_case(1, paged=False, seed=20)
    batch, n = k8.shape[:2]
    pq, kp, vp, psl, extra = fp8_case(1, paged=True, seed=20)
    tokens = scale_of("token", k8, batch, seed=21)
    cases = [
        (dict(k_scale=torch.ones(HKV + 1, device=DEVICE)), "k_scale", f"got torch.float32 \\({HKV + 1},\\)"),
        (dict(v_scale=torch.ones(batch + 1, HKV, device=DEVICE)), "v_scale", "got torch.float32"),
        (dict(k_scale=torch.ones(batch, n + 1, HKV, device=DEVICE)), "k_scale", "got torch.float32"),
        (dict(v_scale=tokens.half()), "v_scale", "got torch.float16"),
        (dict(k_scale=tokens[..., None]), "k_scale", "got torch.float32"),
        (dict(k_scale=float("nan")), "k_scale", "a float must be finite, got nan"),
    ]
    for kw, name, got in cases:
        with pytest.raises(ValueError, match=rf"{name} must be a float, or a float32 tensor on .* of shape \({HKV},\) "
                                             rf"\(per kv head\), \({batch}, {HKV}\) \(per sequence and kv head\) or "
                                             rf"\({batch}, {n}, {HKV}\) \(per token.*{got}"):
            leanattn.decode(q, k8, v8, sl, **kw)
    # A paged cache's per-token scales are (num_pages, page_size, kv_heads), not (batch, cache_len, kv_heads).
    with pytest.raises(ValueError, match=rf"k_scale must be .* or \({kp.shape[0]}, 16, {HKV}\) \(per token"):
        leanattn.decode(pq, kp, vp, psl, k_scale=scale_of("token", k8, batch, seed=22), **extra)
    strided = torch.empty(batch, n, 2 * HKV, device=DEVICE)[..., ::2]
    strided.copy_(tokens)
    for check in (False, True):
        with pytest.raises(ValueError, match=r"v_scale must be contiguous.*strides"):
            leanattn.decode(q, k8, v8, sl, v_scale=strided, check=check)


def test_check_with_token_scales_and_no_pages():
    """An empty page pool and empty sequences: nothing is read, and check=True says nothing."""
    q = torch.randn(2, 1, 4, 64).to(torch.bfloat16).to(DEVICE)
    k = torch.empty(0, 16, 2, 64, dtype=torch.float8_e4m3fn, device=DEVICE)
    table = torch.zeros(2, 3, dtype=torch.int32, device=DEVICE)
    lens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    scales = torch.ones(0, 16, 2, device=DEVICE)
    out = leanattn.decode(q, k, k, lens, block_table=table, k_scale=scales, v_scale=scales, check=True)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("paged", [False, True])
def test_token_v_scales_of_any_spread_within_a_tile(paged):
    """Per-token V scales 2^-20 and 2^10 side by side in every tile, where the 2^10 keys get no
    attention (their scores sit ~136 below the others'): the output is the 2^-20 keys' values,
    which fp16 weights scaled to the tile's largest scale would flush to zero. The guard is on
    the GPU (a bf16 q's bf16 weights; the interpreter's products are fp32); an fp16 q's output
    could not hold these values anyway."""
    tile = leanattn.choose_config(D, FP8, HQ // HKV).tile
    n = 2 * tile + 5
    gen = torch.Generator().manual_seed(31)
    q = torch.ones(1, 1, HQ, D).to(torch.bfloat16).to(DEVICE)
    big = (torch.arange(n) % 2 == 1).to(DEVICE)  # every other key: scale 2^10, score -128 / sqrt(D)
    k = torch.where(big[:, None, None], -16.0, 1.0).expand(n, HKV, D)[None].to(FP8)
    v = (torch.rand(1, n, HKV, D, generator=gen).to(DEVICE) * 8 - 4).to(FP8)
    sl = torch.tensor([n], dtype=torch.int32, device=DEVICE)
    v_scale = torch.where(big, 2.0**10, 2.0**-20)[None, :, None].expand(1, n, HKV).contiguous()
    kw = {}
    if paged:
        k, v, table = to_paged(k, v, [n], 16, seed=31)
        kw = {"block_table": table}
        pages = torch.zeros(k.shape[0], 16, HKV, device=DEVICE)
        for j in range(table.shape[1]):
            rows = v_scale[0, j * 16:(j + 1) * 16]
            pages[table[0, j], :rows.shape[0]] = rows
        v_scale = pages
    out, lse = leanattn.decode(q, k, v, sl, k_scale=1.0, v_scale=v_scale, return_lse=True, **kw)
    ref, ref_lse = reference(q, k, v, sl, k_scale=1.0, v_scale=v_scale, **kw)
    assert ref.abs().max() > 2.0**-24  # the small keys' values, not zero
    assert_close(out, lse, ref, ref_lse)


@pytest.mark.parametrize("invariant", [False, True])
@pytest.mark.parametrize("v_kind", KINDS)
def test_merge_kernel_applies_each_v_scale_kind(v_kind, invariant):
    """The merge kernel writes the cut heads, so it dequantises V as the decode kernel would: a
    per-head or per-(sequence, head) scale at the output, per-token ones already in the weights;
    in batch-invariant mode too (split heads by slot)."""
    import dataclasses

    from leanattn._testing import DECODE_CALLS

    from leanattn.schedule import plan

    q, kc, vc, sl, extra = fp8_case(1, False, seed=4)
    kw = dict(extra, k_scale=scale_of("head", kc, 3, seed=5), v_scale=scale_of(v_kind, vc, 3, seed=6))
    # One tile a share (or a split), so the first sequence's heads (three tiles) are cut on any
    # tile size.
    config = dataclasses.replace(leanattn.choose_config(D, FP8, HQ // HKV, batch_invariant=invariant),
                                 merge_kernel=True, target_share=1)
    assert plan(sl.tolist(), HKV, config.tile, 7, 1).split_heads()
    mode = dict(batch_invariant=True, split_size=config.tile) if invariant else {}
    DECODE_CALLS.clear()
    out = poisoned_like(q)
    _, lse = leanattn.decode(q, kc, vc, sl, out=out, return_lse=True, num_programs=7, config=config, **kw, **mode)
    assert DECODE_CALLS and all(call.merge_params is not None for call in DECODE_CALLS.values())
    assert_close(out, lse, *reference(q, kc, vc, sl, **kw))


def test_float_scales_are_kept_outside_graph_pools(monkeypatch):
    """A float scale's (kv_heads,) tensor outlives the step that made it (calls keep it), so it is
    allocated as the workspace is, outside any CUDA graph's private pool (torch.compile's
    reduce-overhead warm-up routes the thread's allocations there), once per value."""
    from leanattn import _features

    made = []
    real = _features.outside_graph_pools
    monkeypatch.setattr(_features, "outside_graph_pools", lambda device, allocate: (made.append(device),
                                                                                  real(device, allocate))[1])
    monkeypatch.setattr(_features, "_SCALES", {})
    dev = torch.device(DEVICE)
    first = _features.scale_tensor(0.375, 3, dev)
    assert made == [dev] and first.tolist() == [0.375] * 3 and first.dtype == torch.float32
    assert _features.scale_tensor(0.375, 3, dev) is first and made == [dev]
    _features.scale_tensor(0.5, 3, dev)
    assert len(made) == 2
