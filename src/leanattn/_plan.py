"""Planning on the host side: launching the plan kernel, and knowing which call a plan fits.

The partition itself is computed on the device (``kernels/plan.py``; ``schedule.py`` is its
plain-Python specification). A plan is an int32 (programs, PLAN_FIELDS) tensor, one row per
program of the runs' grid; ``plan_decode`` records what each eager plan was made for, so that a
``decode(plan=...)`` of other shapes is refused.
"""

from __future__ import annotations

import weakref

import torch

from ._checks import check_dense_vector, check_tensor, fail
from ._features import UNBOUNDED
from ._launch import launch
from .kernels.config import KernelConfig
from .kernels.plan import BLOCK_B, PLAN_FIELDS, lean_plan_kernel

# The plan kernel's launch options; its compiled kernels by what they are specialised on (the
# constexprs, each pointer's 16-byte alignment, each int's 32-bit range, device, PDL),
# launched directly after the first time: Triton's per-call argument binding costs the host
# more than the kernel takes.
PLAN_LAUNCH = KernelConfig(tile=1, num_warps=4, num_stages=1, programs_per_sm=0)
_PLAN_HITS: dict[tuple, tuple | None] = {}


def launch_plan(
    plan: torch.Tensor, programs: int, cache_seqlens: torch.Tensor | None, cache_leftpad: torch.Tensor | None,
    batch: int, kv_heads: int, capacity: int, q_len: int, window_left: int, has_window: bool, tile: int,
    target_share: int, pdl: bool, *, tickets: torch.Tensor | None,
) -> None:
    """Write the shares of a grid of ``programs`` into ``plan[:programs]``: int32 rows of
    ``PLAN_FIELDS`` (see ``lean_plan_kernel``); ``tile`` (tokens per unit dealt) and
    ``target_share`` from ``_call.unit_of`` of the runs' KernelConfig. Inputs already validated.

    ``tickets``: the contiguous int32 workspace tickets the plan's runs draw (None: none yet),
    set to zero by the plan kernel itself (no fill launch). They are zero between runs only if
    each run's lengths are the plan's: a run after the lengths changed without a plan counts
    arrivals that never come and leaves tickets raised, which would corrupt every later run; so
    each plan starts them at zero."""
    if batch == 0:
        if tickets is not None:
            tickets.zero_()
        return
    pointers = (cache_seqlens if cache_seqlens is not None else plan,
                cache_leftpad if cache_leftpad is not None else plan,
                plan, tickets if tickets is not None else plan)
    args = (*pointers, batch, kv_heads, capacity, window_left, 0 if tickets is None else tickets.numel())
    params = dict(HAS_SEQLENS=cache_seqlens is not None, HAS_LEFTPAD=cache_leftpad is not None, Q_LEN=q_len,
                  HAS_WINDOW=has_window, TILE=tile, TARGET_SHARE=target_share, BLOCK_B=BLOCK_B, USE_PDL=pdl,
                  ZERO_TICKETS=tickets is not None)
    # (Triton types an int argument i32 or i64 by its value, specialised or not.)
    key = (*params.values(), *(p.data_ptr() % 16 == 0 for p in pointers),
           *(-2**31 <= n < 2**31 for n in args[len(pointers):]), plan.device)  # (PDL is USE_PDL)
    _PLAN_HITS[key] = launch(lean_plan_kernel, programs, args, params, PLAN_LAUNCH, pdl, plan.device,
                             _PLAN_HITS.get(key))


def plan_key(batch: int, capacity: int, q_len: int, q_heads: int, kv_heads: int, head_dim: int,
             kv_dtype: torch.dtype, window_left: int, has_seqlens: bool, has_leftpad: bool,
             config: KernelConfig | None, split: int, tile: int) -> tuple:
    """What a plan's shares depend on besides the lengths' values; an unbounded window shows as
    -1, as the API takes it; ``config``: None for the heuristic's; ``split``: tokens per split in
    batch-invariant mode, else 0; ``tile``: the launch config's tile (the heuristic's depends on
    whether the cache is paged: a plan's tiles must be its runs')."""
    window_left = -1 if window_left >= UNBOUNDED else window_left
    return (("batch", batch), ("capacity", capacity), ("q_len", q_len), ("q_heads", q_heads),
            ("kv_heads", kv_heads), ("head_dim", head_dim), ("kv_dtype", kv_dtype), ("window_left", window_left),
            ("cache_seqlens given", has_seqlens), ("cache_leftpad given", has_leftpad), ("config", config),
            ("split_size", split or None), ("tile", tile))


# The plan_decode arguments each eager plan was made for (plans made under torch.compile are
# not recorded: their calls are not checked against them).
# Keyed by id (tensors compare elementwise, so no weak dict): each entry goes with its plan.
_MADE_FOR: dict[int, tuple] = {}


def remember(plan: torch.Tensor, key: tuple) -> None:
    _MADE_FOR[id(plan)] = key
    weakref.finalize(plan, _MADE_FOR.pop, id(plan), None)


# The last plan check passed, as (a weak reference to the plan, key, num_programs, device): a
# step's layers pass one plan with one key, so all but the first skip the checks. (decode's key of
# a known layout, which it passes here, covers the plan's shape and strides.)
_LAST_CHECKED: tuple = (lambda: None,)


def check_plan(plan: object, q: torch.Tensor, num_programs: int | None, key: tuple) -> None:
    """Raise ValueError if ``plan`` can't be this call's: not a plan tensor, or (for a plan made
    eagerly by ``plan_decode``) made for another ``key`` (see :func:`plan_key`)."""
    global _LAST_CHECKED
    compiling = torch.compiler.is_compiling()
    last = _LAST_CHECKED
    if not compiling and last[0]() is plan and last[1] is key and last[2] == num_programs and last[3] == q.device:
        return
    check_tensor("plan", plan)
    if plan.dtype != torch.int32 or plan.dim() != 2 or plan.shape[1] != PLAN_FIELDS.value or plan.shape[0] < 1:
        fail(ValueError, f"plan must be int32 (programs, {PLAN_FIELDS.value}) from leanattn.plan_decode, "
                         f"got {plan.dtype} {tuple(plan.shape)}")
    check_dense_vector("plan", plan)
    if plan.device != q.device:
        fail(ValueError, f"plan is on {plan.device}, q on {q.device}")
    if num_programs is not None and num_programs != plan.shape[0]:
        fail(ValueError, f"num_programs {num_programs} differs from the plan's grid of {plan.shape[0]}")
    if compiling:
        return
    made = _MADE_FOR.get(id(plan))
    if made is not None:
        wrong = [f"{name} {a!r} (planned {b!r})" for (name, a), (_, b) in zip(key, made) if a != b]
        if wrong:
            fail(ValueError, "plan was made for another call: " + ", ".join(wrong))
    _LAST_CHECKED = (weakref.ref(plan), key, num_programs, q.device)
