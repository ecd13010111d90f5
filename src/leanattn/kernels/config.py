"""Launch configuration: tile size, warps, pipeline depth and programs per SM.

Chosen per (head_dim, cache dtype, query rows, cache kind, mode, and whether a call is large:
``large_call``) by the heuristic below, never per context length, so one compile serves every
length; a batch or capacity can change the config only across that one threshold (and the merge kernel's block
shape, which ``_call.merge_shape`` sizes from the heads and programs). The numbers come from sweeps recorded in
``benchmarks/NOTES.md``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .interpreter import interpreter_problem

__all__ = ["KernelConfig", "MLAConfig", "ROW_LIMITS", "check_kernel_device", "choose_config", "choose_mla_config",
           "interpreting", "large_call", "next_pow2"]


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
    programs_per_sm: int  # the default grid is SMs x this; a decode launch lets no more share an SM (_launch)
    target_share: int = 1  # small problems: the fewest programs whose shares stay within this
    pdl: bool | None = None  # programmatic dependent launch; None: on Hopper and newer (LEANATTN_PDL=0: off)
    dot_dtype: str | None = None  # "float16"/"bfloat16"/"float32" for the products; None: chosen per dtype
    # Cut heads merged by a second kernel (lean_merge_kernel) rather than by their last arriving
    # member; None: the heuristic's choice (batch-invariant calls: in the kernel unless True).
    merge_kernel: bool | None = None
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


# Query rows of a kv head (q_len x group) the kernel takes, by head dim where registers hold fewer
# than the general limit (``leanattn.max_query_rows``; the arithmetic is in choose_config's notes).
ROW_LIMITS: dict[int, int] = {512: 16}

# The tile and target share of the one-program config below (choose_config's first case).
_ONE_PROGRAM_TILE, _ONE_PROGRAM_SHARE = 64, 4


def large_call(heads: int, capacity: int, sms: int) -> bool:
    """Whether a call of ``heads`` kv heads (batch x kv_heads) over at most ``capacity`` tokens
    is large on a GPU of ``sms`` SMs: two heads or more whose tiles at full capacity pass the
    target share of every program of a one-program-an-SM grid. A large call takes two programs
    of 3 stages an SM where a small one takes one of 6 (``choose_config``).

    Why (serving mode, H200, d=128, same runs; benchmarks/NOTES.md): six stages hold a whole
    share of up to 4 tiles in flight from the start, which wins on small calls (512 tiles: 1 x 4k
    32/8 13.7 against 14.9 µs, 4 x 8k 8/1 13.2 against 13.8). Past that, two programs an SM
    stream faster, one's products and softmax overlapping the other's waits: 1 x 8k 32/8 (1024
    tiles) 17.6 against 18.4, 8 x 8k 32/8 73.0 against 75.9-76.2, 64 x 2k 8/1 25.3 against 26.7,
    1 x 64k 32/32 248.1 against 259.6, and calls of more heads than SMs most (eager, L2 flushed:
    64 x 2k 32/8 138.3 against 161.9); 16 x 4k 64/8 alone lost 0.8%. A single head stays with one
    program: doubling the grid doubles its merge's members (1 x 128k 8/1 29.7 against 28.6; 1 x
    512k 8/1 75.7 against 74.9)."""
    tiles = heads * -(-capacity // _ONE_PROGRAM_TILE)
    return heads >= 2 and tiles > _ONE_PROGRAM_SHARE * sms


def choose_config(head_dim: int, kv_dtype: torch.dtype, rows: int, paged: bool = False,
                  batch_invariant: bool = False, large: bool = False) -> KernelConfig:
    """Heuristic launch configuration for one (head_dim, cache dtype, query rows of a kv head:
    q_len x group size, whether the cache is paged, whether the call is batch-invariant, whether
    it is ``large``: see :func:`large_call`). The tile never depends on ``paged``,
    ``batch_invariant`` or ``large`` (a plan's tiles fit either kind of cache); the grid and the
    shares do, so a paged and a contiguous call agree bit for bit on the same config and grid,
    not always on their own.

    Budgets of an H200 SM: 228 KiB of shared memory (227 KiB for one program), 64K 32-bit
    registers (255 a thread at most). A stage of the K/V pipeline holds one K and one V tile:
    2 x tile x HEAD_DIM_PAD x itemsize bytes (fp8 tiles stay 1 byte an element in shared memory:
    they are converted to fp16 in registers, after the shared-memory load). Triton keeps
    num_stages - 1 stages in flight (measured: 64-token 128-wide 16-bit tiles with 3 stages take
    70 KiB, 128-token ones with 4 stages 200 KiB; benchmarks/NOTES.md); the choices below also fit
    num_stages whole stages, the bound to keep when the compiler is not at hand.

    Registers a thread, for R = max(16, rows) rows and D = HEAD_DIM_PAD: the accumulator
    R x D fp32 spread over all threads; q, the first product's operand, 16 x D 16-bit values held
    whole by every warp for its 16 rows below 64 rows (D / 4 registers); the scores R x tile
    fp32. The d=128 kernel of 16 rows uses 135 registers of which q and the accumulator take 48:
    about 90 go to addresses, masks and the pipeline whatever the head dim.
    """
    if interpreting():
        # The interpreter runs programs one by one: few, wide tiles keep the tests fast.
        return KernelConfig(tile=32, num_warps=4, num_stages=1, programs_per_sm=1)
    if head_dim > 256:
        # d=512 (HEAD_DIM_PAD 512). Shared memory: 32-token tiles, 2 x 32 x 512 x 2 B = 64 KiB a
        # stage for fp16/bf16 (32 KiB for fp8), the bytes of the d=256 config's 64-token tiles;
        # 3 stages: 128 KiB in flight, 192 KiB even as 3 whole stages, plus q (16 x 512 x 2 B =
        # 16 KiB) when it is staged there: 209 KiB <= 227 KiB, one program per SM. 64-token
        # tiles (128 KiB a stage) would fit only 1 stage in flight. Registers, 8 warps (256
        # threads, 255 each): q 16 x 512 x 2 B / (32 threads x 4 B) = 128 a thread (every warp
        # holds the 16 rows whole: fewer warps do not shrink it), the accumulator 16 x 512 / 256
        # = 32, the scores 16 x 32 / 256 = 2, about 90 for the rest: ~250, the budget's edge.
        # So 16 rows at most (ROW_LIMITS): 32 rows add 32 accumulator registers (~280, spills);
        # 4 warps would double the accumulator's share (64). fp8 uses the same tiles: 32 KiB a
        # stage (64 KiB if they were held as fp16, the 16-bit budget). A step reads one 64 KiB
        # K+V tile pair (16-bit), like the d=256 config, which reads at 89% of the plain-read
        # floor (benchmarks/NOTES.md, 4 x 16k 32/8 d=256).
        return KernelConfig(tile=32, num_warps=8, num_stages=3, programs_per_sm=1, target_share=4)
    if head_dim > 128 or rows > 32:
        # d=192 and 256 (HEAD_DIM_PAD 256): K+V tiles of 64 x 256 take 64 KiB a stage (128 KiB in
        # flight, 192 KiB as 3 whole stages). Registers of 8 warps: the accumulator rows x 256 /
        # 256 = R a thread, the scores R x 64 / 256, q 64 below 64 rows: ~174 at 16 rows, ~230
        # at 32. Over 32 rows (any head dim here) the accumulator takes (rows x head_dim) fp32
        # registers: at d=256 and 128 rows (MAX_QUERY_ROWS) 128 a thread and the scores 32, more
        # than the rest leaves. Measured on an H200 at HEAD_DIM_PAD 256: 148 spill stores at 64
        # rows, ~540 at 128 rows (32-token tiles or 3 stages change little; 4 warps triple them),
        # none at 32 rows and below. The limit stays 128: spills cost time there, never results
        # (tests/test_gpu.py checks the values at 128 rows). One program per SM, more
        # warps to issue. At HEAD_DIM_PAD 256 over 32 rows q's dot operand (rows x 256 x 2 bytes,
        # 64 KiB at 128 rows) joins the stages in shared memory: 3 stages asked for 256 KiB at
        # 128 rows (over the 227 KiB limit), so 2 stages.
        stages = 2 if head_dim > 128 and rows > 32 else 3
        return KernelConfig(tile=64, num_warps=8, num_stages=stages, programs_per_sm=1, target_share=4)
    if kv_dtype.itemsize == 1:
        # fp8: 128-token tiles move the bytes of a 64-token fp16 tile, so the per-tile work (page
        # numbers, softmax, conversions) is spread over as many bytes (docs/decisions.md, fp8).
        # d=32 keeps them: 8 KiB a stage; 256-token tiles would double the scores' registers.
        return KernelConfig(tile=128, num_warps=4, num_stages=3, programs_per_sm=2, target_share=4)
    if head_dim <= 32:
        # d=32: 128-token tiles move the bytes of d=64's 64-token tiles (2 x 128 x 32 x 2 B =
        # 16 KiB a stage, 48 KiB as 3 whole stages, two programs an SM: 96 KiB), so the per-tile
        # work is spread over as many bytes. Registers of 4 warps: scores 16 x 128 / 128 = 16 a
        # thread (32 at 32 rows), q 8, the accumulator 4.
        return KernelConfig(tile=128, num_warps=4, num_stages=3, programs_per_sm=2, target_share=4)
    # fp16 and bf16 move the same bytes. The sweeps showed no clear effect of the group size up
    # to 8 rows. HEAD_DIM_PAD 128 (d = 80, 96, 128): 64 x 128 tiles, 32 KiB a stage; one program
    # an SM with 6 stages (192 KiB) keeps 5 tiles in flight, where two with 3 stages keep 2 each:
    # a small call's programs (4 tiles each at 16 MiB) have every byte requested from their
    # start. Measured in serving mode on an H200 (benchmarks/NOTES.md, the timeline): 1 x 32k
    # 8/1 16.8 -> 15.1 µs; 6 stages with two programs an SM (the second not resident) lost on
    # 8 x 8k 32/8 (87.7 against 80.6), 4 stages with one 96.3. Larger calls go back to two
    # programs of 3 stages (large_call). Only d=128: d=80 lost 10% (1 x 32k 8/8)
    # and d=96 4% (8 x 4k 16/16) in the same run; d=64 (16 KiB stages) was not measured. Paged
    # caches keep two programs of 3 stages: each tile's K/V addresses wait on a page number
    # (read a tile ahead), and one program an SM lost 15-49% on every paged shape measured.
    # Batch-invariant calls keep two programs too: every program of such a call ends a split at
    # the same moment and starts the next one's pipeline afresh, and a second program an SM keeps
    # bytes in flight meanwhile. Measured in serving mode (8 x 8k 32/8, splits of 512 / 1024 /
    # 2048 tokens): 99.9 / 91.6 / 83.6 µs with one program of 6 stages, 81.8 / 77.0 / 73.2 with
    # two of 3 (one program of 3 or 4 stages: 115-117 at 512); calls of 16 MiB alike. So do
    # large calls (large_call): six stages win only where a share is all in flight at once.
    if head_dim == 128 and not paged and not batch_invariant and not large:
        return KernelConfig(tile=_ONE_PROGRAM_TILE, num_warps=4, num_stages=6, programs_per_sm=1,
                            target_share=_ONE_PROGRAM_SHARE)
    # Paged calls deal shares of 2 tiles, not 4: a small one's slowest program ends ~2 µs after
    # the median one (pages lie anywhere, so equal shares are not equal in time; contiguous: 0.4
    # µs, benchmarks/NOTES.md), and twice the programs halve what one straggler holds. Measured in
    # serving mode on an H200 (same run): 1 x 4k 32/8 page 16 18.0 -> 15.4 µs, 1 x 32k 8/1 page 16
    # 16.1 -> 15.6; 64 x 2k 8/1 page 16 and 8 x 8k 32/8 page 64 (grid-bound) unchanged. Shares of
    # one tile lost on 1 x 32k (17.1); a third program an SM lost on both large calls. The same
    # for large calls (a plan's shares are the small config's: plan_decode). Batch-invariant
    # calls deal whole splits (the share does not change their bits): theirs stays 4, the
    # contiguous caches' config.
    share = 2 if paged and not batch_invariant else 4
    return KernelConfig(tile=64, num_warps=4, num_stages=3, programs_per_sm=2, target_share=share)


@dataclass(frozen=True)
class MLAConfig(KernelConfig):
    """How the MLA decode kernel is launched: a :class:`KernelConfig` plus the query rows of a
    block (``block_rows``: 16, 32 or 64; a block packs the q_len tokens of as many query heads as
    fit, and a request's blocks are dealt as the partition's heads); ``tma``: take the TMA tile
    loop where the call's cache allows it (16-bit, tiles within pages; ``kernels/mla_decode.py``),
    else the pointer loop, with the same warps and stages; ``gluon``: on Hopper, run a call whose
    cache has the TMA loop's 2-D view (16-bit, or fp8 with one scale or one a request; any
    ``block_rows``, whatever ``tma`` says) as ``kernels/mla_gluon.py``'s hand-pipelined kernel
    and a merge of the cut blocks (warps and stages its own): True always, False never, None
    (default) in CUDA-graph capture, and in eager calls where its kernel saves more than its
    longer host path costs (``_mla_call.GLUON_EAGER_BYTES``). ``timeline`` (tools, GPU only):
    mla_gluon's uniform and fp8 kernels count SM clocks by phase (``benchmarks/mla_timeline.py``)."""

    block_rows: int = 16
    tma: bool = False
    gluon: bool | None = None
    timeline: bool = False


def choose_mla_config(head_dim: int, head_dim_v: int, kv_dtype: torch.dtype, rows: int,
                      gluon: bool = False) -> MLAConfig:
    """Heuristic MLA launch configuration for a cache of ``head_dim`` values a token (latent
    ``head_dim_v`` then rope) and ``rows`` = q_len x q_heads query rows of a request; ``gluon``:
    the device runs ``kernels/mla_gluon.py``'s kernels (Hopper), whose tiles are 64 keys.

    Blocks of 16 rows up to 16, 32 up to 32, else 64: the products do no more rows' work per key
    than the call has, and 128 heads are 2 blocks streaming the same cache.

    Latent 512, 16-bit caches: 64-token tiles. Measured on an H200 (benchmarks/NOTES.md, MLA):
    - Up to 32 rows, the pointer loop with 8 warps, 3 stages at 16 rows (3 x 72 KiB of tiles; q
      held in registers) and 2 at 32: at 16 x 4k, 16 heads, 45.3 µs against 53.4 with 32-token
      tiles and 62.5 with the TMA loop; at 4 x 8k, 32 heads, 85.6 against the TMA loop's 129.1
      (4 warps; its merge of 512-wide partials spills, a suspect not yet confirmed).
    - 64 rows (compute-bound), the TMA loop with 8 warps (two warpgroups split the value
      columns) and 2 stages (3 do not fit with q in shared memory): at 64 x 4k, 128 heads, 674
      µs against 1013 for the pointer loop's 64-row blocks, which spill. Where the cache does not
      allow it, the pointer loop with 8 warps and 2 stages.
    fp8 caches keep 32-token tiles at 16 rows (8 warps, 3 stages), 64 above (the pointer loop:
    their tiles are converted to fp16 in registers); where ``gluon``, 64 at 16 rows too, the
    tile of mla_gluon's kernels, which take those calls in CUDA graphs (the Triton kernel, in
    the eager calls it keeps, measured faster with them too: 4 x 32k at 16 heads on an H200,
    eager with L2 flushed, 99.4 µs against 119.6). Under the interpreter, small tiles and the
    TMA loop where it applies, so both loops are tested there."""
    block_rows = 16 if rows <= 16 else 32 if rows <= 32 else 64
    if interpreting():
        return MLAConfig(tile=32, num_warps=4, num_stages=1, programs_per_sm=1, block_rows=block_rows, tma=True)
    wide = next_pow2(head_dim_v) >= 512
    if wide and kv_dtype.itemsize == 2:
        if block_rows <= 32:
            return MLAConfig(tile=64, num_warps=8, num_stages=3 if block_rows == 16 else 2, programs_per_sm=1,
                             target_share=4, block_rows=block_rows)
        return MLAConfig(tile=64, num_warps=8, num_stages=2, programs_per_sm=1, target_share=4, block_rows=64,
                         tma=True)
    if wide:
        if block_rows == 16 and not gluon:
            return MLAConfig(tile=32, num_warps=8, num_stages=3, programs_per_sm=1, target_share=4, block_rows=16)
        return MLAConfig(tile=64, num_warps=8, num_stages=2, programs_per_sm=1, target_share=4, block_rows=block_rows)
    # Narrower latents (down to the 16-wide ones tests use): 64-token tiles, 4 warps for 16 rows.
    return MLAConfig(tile=64, num_warps=4 if block_rows == 16 else 8, num_stages=2, programs_per_sm=1,
                     target_share=4, block_rows=block_rows)
