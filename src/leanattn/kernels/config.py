"""Launch configuration: tile size, warps, pipeline depth and programs per SM.

Chosen per (head_dim, cache dtype, query rows) by the heuristic below, never per context length or
batch, so one compile serves every length. The numbers come from sweeps recorded in
``benchmarks/NOTES.md``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .interpreter import interpreter_problem

__all__ = ["KernelConfig", "check_kernel_device", "choose_config", "interpreting", "next_pow2"]


@dataclass(frozen=True)
class KernelConfig:
    """How the decode kernel is launched: the supported way to choose it by hand.

    ``leanattn.choose_config`` gives the heuristic's choice; pass a config (often that one
    changed with ``dataclasses.replace``) as ``config=`` to ``decode``, ``plan_decode`` or
    ``DecodeWrapper`` to sweep or probe launch variants. A plan and its runs must use one config.
    """

    tile: int  # cache tokens per LeanTile (and per inner-loop step)
    num_warps: int
    num_stages: int
    programs_per_sm: int  # the default grid is SMs x this
    target_share: int = 1  # small problems: the fewest programs whose shares stay within this
    pdl: bool | None = None  # programmatic dependent launch; None: on Hopper and newer (LEANATTN_PDL=0: off)
    dot_dtype: str | None = None  # "float16"/"bfloat16"/"float32" for the products; None: chosen per dtype
    # Extra compile-time parameters of the kernel, as (name, value) pairs (for probes), and a
    # kernel with lean_decode_kernel's parameters to launch instead (an instrumented copy, say).
    constexprs: tuple[tuple[str, object], ...] = ()
    kernel: object = None


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``).

    Read once: Triton decides at import, when it decorates the kernels, so later changes to the
    variable don't apply to them either."""
    return _INTERPRET


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_kernel_device(name: str, device: torch.device) -> None:
    """Raise unless leanattn's kernels can run on ``device`` (the device of argument ``name``):
    a CUDA device, or the CPU under a working interpreter."""
    if device.type == "cuda":
        return
    if not interpreting():
        raise ValueError(f"{name} is on {device}: tensors must be on a CUDA device (or set TRITON_INTERPRET=1 "
                         "before importing leanattn to run on the CPU)")
    problem = interpreter_problem()
    if problem is not None:
        raise RuntimeError(problem)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def choose_config(head_dim: int, kv_dtype: torch.dtype, rows: int) -> KernelConfig:
    """Heuristic launch configuration for one (head_dim, cache dtype, query rows of a kv head:
    q_len x group size)."""
    if interpreting():
        # The interpreter runs programs one by one: few, wide tiles keep the tests fast.
        return KernelConfig(tile=32, num_warps=4, num_stages=1, programs_per_sm=1)
    if head_dim > 128 or rows > 32:
        # K+V tiles of 64 x 256 take 64 KiB a stage, and over 32 query rows the accumulator
        # takes (rows x head_dim) fp32 registers: one program per SM, more warps to issue.
        return KernelConfig(tile=64, num_warps=8, num_stages=3, programs_per_sm=1, target_share=4)
    if kv_dtype.itemsize == 1:
        # fp8: 128-token tiles move the bytes of a 64-token fp16 tile, so the per-tile work (page
        # numbers, softmax, conversions) is spread over as many bytes (docs/decisions.md, fp8).
        return KernelConfig(tile=128, num_warps=4, num_stages=3, programs_per_sm=2, target_share=4)
    # fp16 and bf16 move the same bytes. The sweeps showed no clear effect of the group size up
    # to 8 rows. 64 x 128 tiles, 3 stages: 70 KiB of shared memory, so both programs of an SM
    # are resident. Paged caches add a dependent page-number load per tile; two programs per SM
    # hide it.
    return KernelConfig(tile=64, num_warps=4, num_stages=3, programs_per_sm=2, target_share=4)
