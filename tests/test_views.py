"""Property test: random views (offset, strided, transposed, expanded) of every argument of
``decode`` and ``DecodeWrapper``. Each call either equals the reference on contiguous copies of
the same values, or raises a ValueError naming the argument the kernel can't read as given."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import leanattn

from _util import DEVICE, poisoned_like, to_paged
from test_contract import assert_same_as_reference

B, HQ, HKV, D, CAP, PAGE = 3, 4, 2, 64, 48, 16
VIEWS = ["dense", "offset", "strided", "transposed", "expanded"]


def view(x: torch.Tensor, kind: str, dim: int = 0) -> torch.Tensor:
    """A view of ``x``'s values (``expanded``: of its first slice along ``dim``, repeated)."""
    if kind == "offset":  # the same layout, 16 bytes into a larger buffer
        buf = torch.empty(x.numel() + 16 // x.element_size(), dtype=x.dtype, device=x.device)
        buf[-x.numel():] = x.flatten()
        return buf[-x.numel():].view(x.shape)
    if kind == "strided":  # every other slice of a buffer twice as long along dim
        shape = list(x.shape)
        shape[dim] *= 2
        big = torch.zeros(shape, dtype=x.dtype, device=x.device)
        every_other = (slice(None),) * dim + (slice(None, None, 2),)
        big[every_other] = x
        return big[every_other]
    if kind == "transposed" and x.dim() >= 3:  # stored with dims 1 and 2 swapped (a HF cache)
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "expanded":
        return x.narrow(dim, 0, 1).expand(x.shape)
    return x


def dense_1d(kind: str) -> bool:
    return kind in ("dense", "offset", "transposed")


@settings(max_examples=24, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    api=st.sampled_from(["decode", "wrapper"]),
    paged=st.booleans(),
    fp8=st.booleans(),
    lens=st.lists(st.integers(0, CAP), min_size=B, max_size=B),
    kinds=st.fixed_dictionaries({name: st.sampled_from(VIEWS) for name in (
        "q", "k_cache", "v_cache", "cache_seqlens", "cache_leftpad", "sinks", "k_scale", "block_table", "out", "lse")}),
    use=st.fixed_dictionaries({"cache_leftpad": st.booleans(), "sinks": st.booleans()}),
    seed=st.integers(0, 2**16),
)
def test_every_view_reads_right_or_is_refused(api, paged, fp8, lens, kinds, use, seed):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    dtype = torch.bfloat16
    kv_dtype = torch.float8_e4m3fn if fp8 else dtype
    q = rnd(B, 1, HQ, D).to(dtype)
    k, v = rnd(B, CAP, HKV, D).to(kv_dtype), rnd(B, CAP, HKV, D).to(kv_dtype)
    args: dict = {"cache_seqlens": torch.tensor(lens, dtype=torch.int32, device=DEVICE)}
    if use["cache_leftpad"]:
        args["cache_leftpad"] = torch.tensor([min(3, n) for n in lens], dtype=torch.int32, device=DEVICE)
    if use["sinks"]:
        args["sinks"] = rnd(HQ)
    if fp8:
        args["k_scale"] = torch.rand(HKV, generator=gen).to(DEVICE) + 0.5
    if paged:
        k, v, table = to_paged(k, v, [CAP] * B, PAGE, seed=seed)
        args["block_table"] = table

    # The views. 1-D arguments must be packed; block_table needs a unit last stride; outputs
    # must not be broadcast; everything else is read through its strides.
    refused = []
    q = view(q, kinds["q"])
    k, v = view(k, kinds["k_cache"]), view(v, kinds["v_cache"])
    for name in ("cache_seqlens", "cache_leftpad", "sinks", "k_scale"):
        if name in args:
            args[name] = view(args[name], kinds[name])
            if not dense_1d(kinds[name]) and args[name].numel() > 1:
                refused.append(name)
    if paged:
        kind = kinds["block_table"]
        args["block_table"] = view(args["block_table"], kind, dim=1 if kind == "strided" else 0)
        if kind == "strided":
            refused.append("block_table")
    out = view(poisoned_like(q).contiguous(), kinds["out"])
    if kinds["out"] == "expanded":
        refused.append("out")
    lse = view(torch.full((B, HQ, 1), float("nan"), device=DEVICE), kinds["lse"])
    if kinds["lse"] == "expanded":
        refused.append("lse")

    def call():
        if api == "decode":
            return leanattn.decode(q, k, v, out=out, lse=lse, return_lse=True, num_programs=5, **args)
        w = leanattn.DecodeWrapper(HQ, HKV, D, dtype, DEVICE, kv_dtype=kv_dtype, num_programs=5)
        capacity = CAP if not paged else args["block_table"].shape[1] * PAGE
        w.plan(args["cache_seqlens"], capacity, cache_leftpad=args.get("cache_leftpad"))
        run_args = {n: args[n] for n in ("block_table", "sinks", "k_scale") if n in args}
        return w.run(q, k, v, out=out, lse=lse, return_lse=True, **run_args)

    if refused:
        with pytest.raises(ValueError) as e:
            call()
        assert any(name in str(e.value) for name in refused), (refused, str(e.value))
        return
    got, got_lse = call()
    assert got.data_ptr() == out.data_ptr() and got_lse.data_ptr() == lse.data_ptr()
    dense = {n: t.contiguous() if isinstance(t, torch.Tensor) else t for n, t in args.items()}
    ref, ref_lse = leanattn.reference.decode(q.contiguous().double(), k.contiguous().double(),
                                             v.contiguous().double(), return_lse=True, **dense)
    assert_same_as_reference(got.contiguous(), got_lse.contiguous(), ref, ref_lse)
