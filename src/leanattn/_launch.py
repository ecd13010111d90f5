"""Device facts and the Triton launcher shim: the one place a compiled kernel is launched."""

from __future__ import annotations

import functools
import math
import os
import torch
from triton import knobs
from triton.compiler import CompiledKernel

from .kernels.config import KernelConfig, interpreting


def default_num_programs(device: torch.device, config: KernelConfig) -> int:
    """Persistent grid size: SMs times the config's programs per SM (a small fixed grid on the
    CPU)."""
    return grid_size(device, config.programs_per_sm)


def grid_size(device: torch.device, programs_per_sm: int) -> int:
    """SMs times ``programs_per_sm`` on a CUDA device; 16 programs on the CPU."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * programs_per_sm
    return 16


_SM_COUNTS: dict[int, int] = {}


def _sm_count(index: int) -> int:
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def resident_shared(shared: int, per_sm: int, sm_bytes: int, block_bytes: int) -> int:
    """Dynamic shared memory (bytes) to launch a kernel that needs ``shared`` bytes with, so that
    an SM of ``sm_bytes`` of shared memory holds at most ``per_sm`` of its programs: ``shared``, or
    the least size of which ``per_sm + 1`` exceed ``sm_bytes`` (even without the driver's
    reservation), where one program may take that much (``block_bytes``) and ``per_sm`` of them
    still fit with the driver's ``RESERVED_SHARED`` each; else ``shared``.

    Why: a persistent grid of SMs x ``per_sm`` programs is dealt equal shares, so it is balanced
    only if every SM holds exactly ``per_sm`` of them. When an SM could hold more, the block
    scheduler may stack a third program on the SMs that are free first (with PDL, while the
    previous kernel still runs on others): measured on an H200, 16 SMs held 3 programs and 8
    none, and the stacked programs streamed their equal shares 20% slower, which the whole call
    waited for (benchmarks/NOTES.md)."""
    least = sm_bytes // (per_sm + 1) + 1
    fits = least <= block_bytes and per_sm * (least + RESERVED_SHARED) <= sm_bytes
    return least if shared < least and fits else shared


# Shared memory the driver reserves for each resident program (sm_80 and newer).
RESERVED_SHARED = 1024


@functools.lru_cache(maxsize=None)
def _shared_limits(device: torch.device) -> tuple[int, int]:
    """(shared memory of an SM, the most one program may use) in bytes; an SM's is the
    per-program maximum plus the driver's reservation where the device does not report it."""
    props = torch.cuda.get_device_properties(device)
    block = getattr(props, "shared_memory_per_block_optin", 0) or 227 * 1024
    return getattr(props, "shared_memory_per_multiprocessor", 0) or block + RESERVED_SHARED, block


# The dynamic shared memory each function's limit was raised to (by CUfunction handle): a limit
# is only ever raised, since a hit packed with a larger size may still be launched.
_RAISED_SHARED: dict[int, int] = {}


def _raise_shared_limit(compiled, size: int) -> bool:
    """Let ``compiled``'s function take ``size`` bytes of dynamic shared memory (Triton raises
    the limit only for kernels that need over 48 KiB); False if the driver refused. Never
    lowers a limit: one compiled kernel serves every ``per_sm`` (a launch option, not a compile
    one), and a launch packed with the size of an earlier, larger raise would fail."""
    import ctypes

    function = compiled.function
    if _RAISED_SHARED.get(function, 0) >= size:
        return True
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
        if cuda.cuFuncSetAttribute(ctypes.c_void_p(function), 8, ctypes.c_int(size)) != 0:
            return False
    except (OSError, AttributeError):
        return False
    _RAISED_SHARED[function] = size
    return True


def use_pdl(device: torch.device, forced: bool = False) -> bool:
    """Programmatic dependent launch: on Hopper and newer GPUs, not under the interpreter, unless
    LEANATTN_PDL=0 (read at import; ``forced`` ignores it)."""
    return (forced or _PDL) and device.type == "cuda" and not interpreting() and _capability(device) >= 9


_PDL = os.environ.get("LEANATTN_PDL", "1") != "0"


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def current_stream_handle(device: torch.device) -> int:
    """The raw handle of the current CUDA stream of ``device``."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch._C._cuda_getCurrentRawStream(index)


DIRECT_LAUNCH_ERROR: list[str] = []  # why direct launches were given up, if they were


def _launcher_takes_metadata_in_args() -> bool:
    """Whether this Triton's CudaLauncher is called as (grid, stream, function, *args), passing
    the kernel metadata and launch hooks inside args, to its C launcher (Triton 3.6), rather than
    as named parameters (later versions)."""
    try:
        import inspect

        from triton.backends.nvidia.driver import CudaLauncher

        names = list(inspect.signature(CudaLauncher.__call__).parameters)
        return names[names.index("function") + 1 :] == ["args"]
    except Exception:
        return False


_C_LAUNCH = _launcher_takes_metadata_in_args()


def run_direct(hit: tuple, grid: int | tuple[int, int], device: torch.device, args: tuple) -> None:
    """What Triton's launcher does for ``compiled[(gx, gy, 1)](*args, *constexprs)`` with the
    compiled kernel, constexpr values, packed metadata (warps, CTAs, dynamic shared memory) and
    tensor arguments' positions of ``hit``, without rebinding the arguments (``grid``: gx, or
    (gx, gy)). The tensors go as their addresses: given a tensor, Triton's launcher calls its
    ``data_ptr()`` and asks the driver (``cuPointerGetAttribute``) whether the device can reach
    it, for each of up to ~20 tensors a call; the callers have checked their devices."""
    compiled, values, packed, tensors = hit
    gx, gy = grid if isinstance(grid, tuple) else (grid, 1)
    stream = current_stream_handle(device)
    enter = knobs.runtime.launch_enter_hook
    meta = compiled.launch_metadata((gx, gy, 1), stream, *args, *values) if enter is not None else None
    if tensors:
        args = list(args)
        for i in tensors:
            args[i] = args[i].data_ptr()
    launcher = compiled.run
    if _C_LAUNCH and not launcher.global_scratch_size and not launcher.profile_scratch_size:
        # Triton 3.6's CudaLauncher.__call__, minus its scratch allocators (none needed here).
        launcher.launch(gx, gy, 1, stream, compiled.function, launcher.launch_cooperative_grid,
                        launcher.launch_pdl, None, None, packed, meta, enter,
                        knobs.runtime.launch_exit_hook, *args, *values)
    else:
        launcher(gx, gy, 1, stream, compiled.function, packed, meta, enter,
                 knobs.runtime.launch_exit_hook, *args, *values)


def _compile(kernel, grid: tuple, args: tuple, params: dict, config: KernelConfig, pdl: bool, per_sm: int,
             device: torch.device) -> tuple | None:
    """Compile ``kernel`` for these arguments without launching it; ``launch``'s ``hit`` for it
    (the compiled kernel, its constexpr values, the packed launch metadata, with the dynamic
    shared memory that holds an SM to ``per_sm`` programs when the grid is one wave, and the
    positions of ``args`` that are tensors), or None when Triton returns something other than a
    compiled kernel."""
    compiled = kernel.warmup(*args, **params, grid=grid, **_options(config, pdl))
    if not isinstance(compiled, CompiledKernel):
        return None
    launcher = compiled.run  # loads the function (lazily loaded): raises if it cannot be
    if compiled.function is None:
        launcher()  # a load that failed before: Triton keeps its error in place of the launcher
    packed = compiled.packed_metadata
    if per_sm > 0 and math.prod(grid) <= grid_size(device, per_sm):
        shared = resident_shared(compiled.metadata.shared, per_sm, *_shared_limits(device))
        if shared > compiled.metadata.shared and (shared <= 48 * 1024 or compiled.metadata.shared > 48 * 1024
                                                  or _raise_shared_limit(compiled, shared)):
            packed = (*packed[:2], shared, *packed[3:])
    tensors = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    return compiled, tuple(params[n] for n in kernel.arg_names[len(args):]), packed, tensors


def launch(
    kernel, grid: int | tuple[int, int], args: tuple, params: dict, config: KernelConfig, pdl: bool,
    device: torch.device, hit: tuple | None, per_sm: int = 0,
) -> tuple | None:
    """Launch ``kernel`` on ``grid`` programs (or a (gx, gy) grid) with ``args`` (its non-constexpr parameters, in
    order) and the compile-time parameters ``params``; returns what a later launch of the same
    specialisation passes as ``hit`` (None under the interpreter or when direct launches failed).
    ``per_sm`` > 0: a grid of one wave (at most SMs x ``per_sm`` programs) is held to that many
    programs an SM (``resident_shared``), so its equal shares land evenly; a larger grid is
    launched as it asks.

    ``hit`` (the compiled kernel, its constexpr values and launch metadata) launches directly,
    skipping Triton's per-call argument binding, which costs more than a short decode step on
    the GPU: the caller must only pass it for arguments Triton would specialise the same way
    (dtypes, 16-byte alignment of every pointer, every int's == 1 / divisibility by 16 / 32-bit
    range).
    """
    if hit is None and not interpreting() and not DIRECT_LAUNCH_ERROR:
        # Compile without launching, so that the first launch is a direct one too.
        hit = _compile(kernel, _grid3(grid), args, params, config, pdl, per_sm, device)
    if hit is not None:
        try:
            run_direct(hit, grid, device, args)
            return hit
        except (TypeError, AttributeError) as e:  # a Triton whose launcher differs: bind every time
            DIRECT_LAUNCH_ERROR.append(repr(e))
    kernel[_grid3(grid)](*args, **params, **_options(config, pdl))
    return None


def prepare(
    kernel, grid: int | tuple[int, int], args: tuple, params: dict, config: KernelConfig, pdl: bool,
    device: torch.device, per_sm: int = 0,
) -> tuple | None:
    """Compile and load ``kernel`` for these arguments (as :func:`launch` would) without running
    it: the ``hit`` a later launch takes, or None under the interpreter, when direct launches
    are off, or when Triton returns no compiled kernel (then nothing is known to be loaded)."""
    if interpreting() or DIRECT_LAUNCH_ERROR:
        return None
    try:
        return _compile(kernel, _grid3(grid), args, params, config, pdl, per_sm, device)
    except (TypeError, AttributeError) as e:  # a Triton whose compiled kernels differ: launch to load
        DIRECT_LAUNCH_ERROR.append(repr(e))
        return None


def _grid3(grid: int | tuple[int, int]) -> tuple:
    return grid if isinstance(grid, tuple) else (grid,)


def _options(config: KernelConfig, pdl: bool) -> dict:
    """Triton's launch options for ``config``."""
    extra = {"launch_pdl": True} if pdl else {}
    return dict(num_warps=config.num_warps, num_stages=config.num_stages, **extra)
