"""Compiles the front end (Python to Triton IR, for sm_90: no GPU needed) of the decode, merge,
MLA and plan kernels with their int arguments typed as a GPU launch types values past 32 bits
(i64; ``--i32``: as it types the others), and prints every variant that fails; exit status 1 if
any did. Run with TRITON_INTERPRET=0
(``tests/test_wide_ints.py``): the interpreter never types ints, so only this sees a kernel
whose values change type with them (a loop-carried i32 becoming i64 is a compile error)."""

from __future__ import annotations

import itertools
import sys

import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton._C.libtriton import ir

from leanattn.kernels.lean_decode import lean_decode_kernel, lean_merge_kernel
from leanattn.kernels import mla_gluon
from leanattn.kernels.mla_decode import mla_decode_kernel, mla_merge_kernel
from leanattn.kernels.plan import lean_plan_kernel
from leanattn.merge import push_merge_kernel

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
OPTIONS = BACKEND.parse_options({})
# Pointer arguments by name (the rest of the capitalised ones point to int32).
POINTERS = {**{n: "*fp16" for n in ("Q", "K", "V", "KV", "KR", "KVDesc", "KRDesc", "Out")}, "Timeline": "*i64",
            **{n: "*fp32" for n in ("Lse", "Sinks", "KScale", "VScale", "WsAcc", "WsStats")}}
FLOATS = {"scale", "softcap"}


def front_end(kernel, constexprs: dict, wide: bool, types: dict | None = None, gluon: bool = False) -> str | None:
    """None if ``kernel`` reaches Triton IR with these constexprs, its ints i64 when ``wide``
    (``types``: arguments of other types, e.g. tensor descriptors; ``gluon``: a Gluon kernel);
    else the error's last lines."""
    signature = {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif types and p.name in types:
            signature[p.name] = types[p.name]
        elif p.name[0].isupper():
            signature[p.name] = POINTERS.get(p.name, "*i32")
        else:
            signature[p.name] = "fp32" if p.name in FLOATS else ("i64" if wide else "i32")
    missing = [p.name for p in kernel.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        return f"constexprs not given here: {missing}"
    options = OPTIONS
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as source_of

        options = BACKEND.parse_options({"num_warps": constexprs.get("WARPS", 4)})
    else:
        source_of = ASTSource
    source = source_of(kernel, signature, {(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    context = ir.context()
    ir.load_dialects(context)
    BACKEND.load_dialects(context)
    try:
        source.make_ir(TARGET, options, BACKEND.get_codegen_implementation(options), BACKEND.get_module_map(),
                       context)
    except Exception as e:  # noqa: BLE001  (any compile error is the finding)
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        return " | ".join(lines[-3:])
    return None


def variants():
    """(name, kernel, constexprs, other argument types, gluon): the decode kernel's modes
    (default / batch-invariant splits, merge by tickets / kernel, contiguous / paged, self-located
    / planned, every length feature), the merge kernel, the MLA kernel's pointer and TMA loops
    (the TMA loop over pages only: a contiguous cache takes it below 2**31 rows, so with a
    32-bit capacity), its merge kernel, the Hopper Gluon kernel where this Triton has it, the
    plan kernel, and context parallel's push-merge kernel."""
    def decode(split: int, merge: bool, page: int, planned: bool) -> dict:
        """The decode kernel with every length feature on."""
        return dict(
            GROUP=4, Q_LEN=2, ROWS=16, HEAD_DIM=64, HEAD_DIM_PAD=64, TILE=64, PAGE_SIZE=page,
            TARGET_SHARE=1 if split else 2, SPLIT=split, UNIT=split or 64, MERGE_ROWS=8, MERGE_WIDE=True,
            ARRIVE_CHUNK=16, HAS_SEQLENS=True, HAS_LEFTPAD=True, HAS_WINDOW=True, HAS_MASK=True, HAS_SOFTCAP=True,
            HAS_SINKS=True, K_SCALE_KIND=0, V_SCALE_KIND=0, HAS_BOUNDS=False, PLANNED=planned, RETURN_LSE=True,
            DOT_DTYPE=tl.float16, BLOCK_B=128, USE_PDL=False, TIMELINE=False, MERGE_KERNEL=merge)

    def mla(split: int, page: int, planned: bool, tma: bool) -> dict:
        """The MLA kernel, its pointer loop or (``tma``) its tensor-descriptor loop under PDL."""
        return dict(
            GROUP=16, Q_LEN=2, ROWS=32, DV=512, DV_PAD=512, DR=64, DR_PAD=64, TILE=64, PAGE_SIZE=page,
            TARGET_SHARE=1 if split else 4, SPLIT=split, UNIT=split or 64, MERGE_ROWS=32, MERGE_WIDE=False,
            ARRIVE_CHUNK=16, HAS_SEQLENS=True, HAS_LEFTPAD=True, HAS_MASK=True, SCALE_KIND=0, PLANNED=planned,
            RETURN_LSE=True, DOT_DTYPE=tl.float16, BLOCK_B=128, USE_PDL=tma, USE_TMA=tma, ROPE_APART=False)

    for split, merge, page, planned in itertools.product((0, 128), (False, True), (0, 16), (False, True)):
        yield (f"decode split={split} merge_kernel={merge} page={page} planned={planned}", lean_decode_kernel,
               decode(split, merge, page, planned))
    yield "decode, capacity-long sequences", lean_decode_kernel, {
        **decode(0, True, 16, False), "Q_LEN": 1, "MERGE_ROWS": 4, "HAS_SEQLENS": False, "HAS_LEFTPAD": False,
        "HAS_WINDOW": False, "HAS_MASK": False, "HAS_SOFTCAP": False, "HAS_SINKS": False, "RETURN_LSE": False}
    for by_slot in (False, True):
        yield f"merge by_slot={by_slot}", lean_merge_kernel, dict(
            GROUP=4, Q_LEN=2, MERGE_ROWS=8, HEAD_DIM=64, HEAD_DIM_PAD=64, COLS=64, MEMBERS=16, V_SCALE_KIND=0,
            RETURN_LSE=True, HAS_SINKS=True, USE_PDL=False, BY_SLOT=by_slot)
    for split, page, planned in itertools.product((0, 128), (0, 64), (False, True)):
        yield f"mla split={split} page={page} planned={planned}", mla_decode_kernel, mla(split, page, planned, False)
    yield "mla merge", mla_merge_kernel, dict(
        GROUP=16, Q_LEN=2, MERGE_ROWS=32, DV_PAD=512, TILE=64, COLS=64, ARRIVE_CHUNK=16, HAS_SEQLENS=True,
        HAS_LEFTPAD=True, RETURN_LSE=True, USE_PDL=False)
    descriptors = {"KVDesc": "tensordesc<fp16[64, 512]>", "KRDesc": "tensordesc<fp16[64, 64]>"}
    for split in (0, 128):
        yield f"mla TMA loop split={split} page=64", mla_decode_kernel, mla(split, 64, True, True), descriptors
    if mla_gluon.AVAILABLE:
        gl = mla_gluon.gl
        layouts = {w: repr(gl.NVMMASharedLayout.get_default_for([64, w], gl.bfloat16)) for w in (512, 64)}
        gluon_types = {"Q": "*bf16", "Out": "*bf16", "kv_desc": f"tensordesc<bf16[64,512],{layouts[512]}>",
                       "kr_desc": f"tensordesc<bf16[64,64],{layouts[64]}>"}
        gluon_params = dict(GROUP=16, Q_LEN=1, ROWS=64, MERGE_ROWS=64, DV=512, DR=64, TILE=64, PAGE_SIZE=64,
                            HAS_SEQLENS=True, HAS_LEFTPAD=True, HAS_MASK=False, RETURN_LSE=True, ROPE_APART=False)
        yield "mla Gluon kernel page=64", mla_gluon.mla_attend_gluon, dict(gluon_params, WARPS=8), gluon_types, True
        yield "mla warp-specialised Gluon kernel page=64", mla_gluon.mla_attend_gluon_ws, dict(
            gluon_params, VALUE_REGS=192), gluon_types, True
    for seqlens, leftpad, window in ((True, True, True), (False, False, False)):
        yield f"plan seqlens={seqlens} leftpad={leftpad} window={window}", lean_plan_kernel, dict(
            HAS_SEQLENS=seqlens, HAS_LEFTPAD=leftpad, Q_LEN=2, HAS_WINDOW=window, TILE=64, TARGET_SHARE=2,
            BLOCK_B=128, USE_PDL=False, ZERO_TICKETS=True)
    exchange = {"Src": "*bf16", "RecvO": "*bf16", "Out": "*bf16", "SrcLse": "*fp32", "RecvLse": "*fp32",
                "OutLse": "*fp32", "PeerRecv": "*i64", "Flags": "*i64", "PeerFlags": "*i64"}
    for push, merge, scatter in ((True, True, False), (True, True, True), (True, False, False), (False, True, True)):
        yield f"push_merge push={push} merge={merge} scatter={scatter}", push_merge_kernel, dict(
            WORLD=4, SCATTER=scatter, PUSH=push, MERGE=merge, HEAD_DIM=80, HEAD_DIM_PAD=128, BLOCK_R=8), exchange


def main() -> int:
    failed = 0
    for name, kernel, constexprs, *other in variants():
        error = front_end(kernel, constexprs, "--i32" not in sys.argv, *other)
        if error is not None:
            failed += 1
            print(f"{name}: {error}")
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
