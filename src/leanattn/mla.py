"""Multi-head latent attention decode (DeepSeek-V3 style): ``mla_decode`` and ``MLAWrapper``.

Every query head attends to one latent KV head of ``head_dim`` values a token (576 in DeepSeek:
512 latent, then 64 rope); V is the first ``head_dim_v`` values of the same rows, read from the
same bytes. The stream-K partition deals tiles of (request, block of query rows, keys) over a
persistent grid, as ``decode`` deals (sequence, kv head, keys).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _call, _mla_call, ops
from ._checks import (
    FP8_DTYPES, MLA_MAX_Q_LEN, capacity_of, check_finite_values, check_lengths, check_lse_out, check_num_programs,
    check_pages, check_plan_lengths, check_planned, check_tile_count, fail, fixed_attribute, refuse_grad,
    softmax_scale_of, split_of, wrapper_device, validate_mla,
)
from ._features import _check_scale
from ._plan import launch_plan
from ._workspace import Workspace, workspace_for
from .kernels.config import MLAConfig, choose_mla_config
from .kernels.plan import PLAN_FIELDS

__all__ = ["mla_decode", "MLAWrapper"]


class _Known(NamedTuple):
    """What a call of an already-checked argument layout needs (see :func:`_arguments_key`)."""

    call: _mla_call.MLACall
    slots: int  # workspace slots
    rows: int  # query rows of a block
    fp8: bool
    capacity: int


# mla_decode's calls by the layout of their arguments: every check but the per-call ones (grad,
# values) depends only on it, so a layout seen before skips them (as decode's do).
_KNOWN: dict[tuple, _Known] = {}


def _arguments_key(
    q, kv_cache, rope_cache, cache_seqlens, block_table, cache_leftpad, head_dim_v, softmax_scale, causal,
    return_lse, out, lse, kv_scale, batch_invariant, num_programs, split_size,
) -> tuple | None:
    """Shapes, strides, dtypes, devices and 16-byte alignment of the tensors, and the options
    with their types; None for arguments it can't describe (the full checks say why)."""
    try:
        scale_tensor = kv_scale if isinstance(kv_scale, torch.Tensor) else None
        key = (_call.layout_of(q, kv_cache, rope_cache, out, lse, cache_seqlens, cache_leftpad, block_table,
                               scale_tensor),
               type(head_dim_v), head_dim_v, type(softmax_scale), softmax_scale, type(causal), causal,
               type(return_lse), return_lse, type(batch_invariant), batch_invariant, type(num_programs), num_programs,
               type(split_size), split_size, None if scale_tensor is not None else (type(kv_scale), kv_scale))
        hash(key)
    except (AttributeError, TypeError):
        return None
    return key


def _check_options(q: torch.Tensor, kv_cache: torch.Tensor, kv_scale: object, causal: object) -> None:
    """``causal`` a bool; ``kv_scale`` only for an fp8 cache, of one of decode's k_scale kinds."""
    if not isinstance(causal, bool):
        fail(TypeError, f"causal must be a bool, got {type(causal).__name__}")
    if kv_cache.dtype in FP8_DTYPES:
        _check_scale("kv_scale", 1.0 if kv_scale is None else kv_scale, q, kv_cache, "kv_cache")
    elif kv_scale is not None:
        fail(ValueError, f"kv_scale dequantises an fp8 kv_cache; this cache is {kv_cache.dtype}")


def _check_values(kv_cache, cache_seqlens, cache_leftpad, block_table, kv_scale, batch: int, capacity: int) -> None:
    """``check=True``'s host-side checks of the lengths, live pages and scales (a device sync)."""
    check_lengths(cache_seqlens, cache_leftpad, capacity)
    if block_table is not None:
        check_pages(block_table, kv_cache.shape[0], kv_cache.shape[1], cache_seqlens, cache_leftpad)
    check_finite_values(None, kv_scale, None, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad,
                        block_table=block_table, batch=batch, capacity=capacity, scale_names=("kv_scale", ""))


def _outputs(q, head_dim_v, out, lse, return_lse) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch, q_len, q_heads, _ = q.shape
    if out is None:
        out = torch.empty(batch, q_len, q_heads, head_dim_v, dtype=q.dtype, device=q.device)
    if return_lse and lse is None:
        lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device)
    return out, lse


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | None,
    *,
    rope_cache: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    head_dim_v: int = 512,
    softmax_scale: float | None = None,
    causal: bool = True,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    kv_scale: float | torch.Tensor | None = None,
    batch_invariant: bool = False,
    check: bool = False,
    num_programs: int | None = None,
    split_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact multi-head latent attention decode with LeanAttention's stream-K partition.

    Args:
        q: (batch, q_len, q_heads, head_dim), fp16 or bf16: the absorbed queries, latent part
            then rope part; q_len 1 to 16. head_dim a multiple of 16 (576 in DeepSeek-V3).
        kv_cache: (batch, cache_len, 1, head_dim), any strides but a unit last stride; or, with
            ``block_table``, pages (num_pages, page_size, 1, head_dim). q's dtype, or fp8
            (float8_e4m3fn / float8_e5m2) with ``kv_scale``. V is ``kv_cache[..., :head_dim_v]``,
            read from the same bytes as K.
        cache_seqlens: int32 (batch,), contiguous, the live length of each sequence (clamped to
            [0, capacity]); ``None`` means the capacity.
        rope_cache: the keys' rope part in a tensor of its own, rows like ``kv_cache``'s: (batch,
            cache_len, 1, head_dim - head_dim_v) or pages (num_pages, page_size, 1, head_dim -
            head_dim_v) (FlashInfer's ckv/kpe, transformers' DeepSeek cache). ``kv_cache`` then
            holds the latent only (head_dim_v values a token). ``None``: the rope part follows the
            latent in ``kv_cache``.
        block_table: int32 (batch, max_pages_per_seq) page indices for a paged cache.
        cache_leftpad: int32 (batch,), where each sequence's live keys start (clamped to [0,
            cache_seqlens]): they are cache positions [cache_leftpad, cache_seqlens), as in
            ``decode`` (left-padded batches); ``None``: 0.
        head_dim_v: V's (and the output's) head dim: a multiple of 16, at most head_dim (512).
        softmax_scale: defaults to ``head_dim ** -0.5`` (DeepSeek passes its own).
        causal: query i of a sequence of L keys sees keys [0, L - q_len + i] (bottom-right, as
            in ``decode``); False: every key.
        return_lse: also return the natural-log log-sum-exp, float32 (batch, q_heads, q_len);
            -inf for a query that sees no key (FlashMLA writes +inf there), as
            :func:`leanattn.merge_states` expects of an empty part.
        out: optional (batch, q_len, q_heads, head_dim_v) tensor in q's dtype to write into.
        lse: optional float32 (batch, q_heads, q_len) tensor for the LSE (with ``return_lse``).
        kv_scale: an fp8 cache's dequantisation multiplier (real row = stored row x kv_scale),
            for its scores and values alike: a float (default 1) or a float32 tensor (1,),
            (batch, 1), or per token shaped like the cache without head_dim ((batch, cache_len,
            1), or (num_pages, page_size, 1) when paged). Refused for fp16/bf16 caches.
        batch_invariant, split_size: as in :func:`leanattn.decode`: each (sequence, block) is
            cut into splits of ``split_size`` tokens (default 512, a multiple of the launch
            config's tile) merged in split order, so a sequence's bits do not depend on the batch
            or the grid.
        check: validate the values of ``cache_seqlens``, the live slots of ``block_table`` and a
            per-token ``kv_scale`` on the host (a device sync), raising ValueError. Without it,
            lengths are clamped and an out-of-range page gives NaN rows where it is attended to.
        num_programs: persistent grid size; defaults to SMs x programs per SM.

    Returns:
        (batch, q_len, q_heads, head_dim_v) in q's dtype, and the LSE when ``return_lse``.
    """
    compiling = torch.compiler.is_compiling()
    key = None if compiling else _arguments_key(
        q, kv_cache, rope_cache, cache_seqlens, block_table, cache_leftpad, head_dim_v, softmax_scale, causal,
        return_lse, out, lse, kv_scale, batch_invariant, num_programs, split_size)
    known = _KNOWN.get(key) if key is not None else None
    if known is not None:  # arguments of a layout checked before: only the per-call checks
        refuse_grad(q, kv_cache, rope_cache, names=("q", "kv_cache", "rope_cache"))  # grad is not layout
        if check:
            _check_values(kv_cache, cache_seqlens, cache_leftpad, block_table, kv_scale, q.shape[0], known.capacity)
        out, lse = _outputs(q, head_dim_v, out, lse, return_lse)
        bufs = _call.buffers(workspace_for(q.device), q.device, known.slots, head_dim_v, known.rows)
        known.call.launch(bufs, q, kv_cache, rope_cache, out, lse, cache_seqlens, cache_leftpad, block_table,
                          (1.0 if kv_scale is None else kv_scale) if known.fp8 else None, None)
        return (out, lse) if return_lse else out

    validate_mla(q, kv_cache, cache_seqlens, block_table, out, head_dim_v, cache_leftpad, rope_cache)
    refuse_grad(q, kv_cache, rope_cache, names=("q", "kv_cache", "rope_cache"))
    _check_options(q, kv_cache, kv_scale, causal)
    check_num_programs(num_programs)
    check_lse_out(lse, q, return_lse)
    batch, q_len, q_heads, head_dim = q.shape
    capacity = capacity_of(kv_cache, block_table)
    if check:
        _check_values(kv_cache, cache_seqlens, cache_leftpad, block_table, kv_scale, batch, capacity)
    scale = softmax_scale_of(softmax_scale, head_dim)
    if compiling:  # the uncached forms: torch.compile traces them
        config = choose_mla_config(head_dim, head_dim_v, kv_cache.dtype, q_len * q_heads, _mla_call.gluon_device(q.device))
        blocks = _mla_call.packing(q_len, q_heads, config.block_rows)[1]
    else:
        config = _mla_call.heuristic(head_dim, head_dim_v, kv_cache.dtype, q_len * q_heads, q.device)
        blocks = _mla_call.blocks_of(q_len, q_heads, config.block_rows)[1]
    split = split_of(batch_invariant, split_size, config.tile)
    check_tile_count(batch, blocks, capacity, config.tile)
    out, lse = _outputs(q, head_dim_v, out, lse, return_lse)
    fp8 = kv_cache.dtype in FP8_DTYPES
    if compiling:
        ops.mla_decode_into(q, kv_cache, rope_cache, out, lse, cache_seqlens, cache_leftpad, block_table,
                            kv_scale if isinstance(kv_scale, torch.Tensor) else None,
                            float(kv_scale) if isinstance(kv_scale, (int, float)) else 1.0,
                            head_dim_v, scale, causal, num_programs or 0, split)
    else:
        launched = _mla_call.mla_decode_into(
            q, kv_cache, rope_cache, out, lse, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad,
            block_table=block_table, kv_scale=(1.0 if kv_scale is None else kv_scale) if fp8 else None,
            head_dim_v=head_dim_v, softmax_scale=scale, causal=causal, num_programs=num_programs, split=split,
            workspace=workspace_for(q.device))
        if launched is not None and key is not None:
            _KNOWN[key] = _Known(*launched, fp8, capacity)
    return (out, lse) if return_lse else out


class MLAWrapper:
    """MLA decode for one model's shape, planned once per step and run once per layer (as
    :class:`leanattn.DecodeWrapper`)::

        w = leanattn.MLAWrapper(q_heads=128, head_dim=576, head_dim_v=512, dtype=torch.bfloat16, device="cuda")
        w.plan(cache_seqlens, capacity)            # once per step (cache_leftpad= for left-padded batches)
        for layer in range(num_layers):
            w.run(q[layer], kv_cache[layer], block_table=block_table, out=out[layer])

    Args:
        q_heads, head_dim, head_dim_v: the layers' shape (head_dim: latent + rope values a token).
        dtype: q and output dtype (float16 or bfloat16).
        device: where everything lives.
        kv_dtype: the caches' dtype: ``dtype`` (default), or float8_e4m3fn / float8_e5m2.
        max_q_len: the most query tokens per sequence a step will have (1 to 16).
        num_programs: persistent grid size; default SMs x programs per SM.
        softmax_scale: default ``head_dim ** -0.5``.
        batch_invariant, split_size: as in :func:`mla_decode` (the workspace grows with batch x
            capacity: make the largest plan before capturing a CUDA graph).
        config: an ``MLAConfig`` (``kernels/config.py``) for every plan and run instead of the
            heuristic's ``choose_mla_config`` (for probes of launch variants).

    Neither ``plan`` nor ``run`` syncs with the host or allocates (outside batch-invariant
    growth), so a CUDA graph can hold a step's plan and runs. ``run`` gives the bits of
    :func:`mla_decode` with the same grid.

    The constructor's arguments read back as attributes (``q_heads``, ``softmax_scale``, ...) and
    ``num_programs`` as the last plan's grid; none may be assigned.
    """

    q_heads, head_dim, head_dim_v, max_q_len = (fixed_attribute(n) for n in ("q_heads", "head_dim", "head_dim_v",
                                                                              "max_q_len"))
    dtype, kv_dtype, device = (fixed_attribute(n) for n in ("dtype", "kv_dtype", "device"))
    softmax_scale, num_programs = fixed_attribute("softmax_scale"), fixed_attribute("num_programs")

    def __init__(
        self, q_heads: int, head_dim: int, head_dim_v: int, dtype: torch.dtype, device: torch.device | str, *,
        kv_dtype: torch.dtype | None = None, max_q_len: int = 1, num_programs: int | None = None,
        softmax_scale: float | None = None, batch_invariant: bool = False, split_size: int | None = None,
        config: MLAConfig | None = None,
    ) -> None:
        device = wrapper_device(device, "MLAWrapper")
        kv_dtype = dtype if kv_dtype is None else kv_dtype
        if not isinstance(q_heads, int) or not isinstance(head_dim, int) or not isinstance(max_q_len, int):
            fail(TypeError, "q_heads, head_dim and max_q_len must be ints")
        if q_heads < 1:
            fail(ValueError, f"q_heads must be at least 1, got {q_heads}")
        if not 1 <= max_q_len <= MLA_MAX_Q_LEN:
            fail(ValueError, f"max_q_len must be in [1, {MLA_MAX_Q_LEN}], got {max_q_len}")
        # The layers' shape, checked as mla_decode checks it, on probes of batch 1.
        validate_mla(torch.empty(1, max_q_len, q_heads, head_dim, dtype=dtype, device=device),
                     torch.empty(1, 1, 1, head_dim, dtype=kv_dtype, device=device), None, None, None, head_dim_v)
        check_num_programs(num_programs)
        if config is not None and not isinstance(config, MLAConfig):
            fail(TypeError, f"config must be a leanattn.kernels.config.MLAConfig, got {type(config).__name__}")
        if config is not None and (not isinstance(config.block_rows, int) or config.block_rows < MLA_MAX_Q_LEN):
            # A block packs all q_len tokens of at least one head (_mla_call.packing).
            fail(ValueError, f"config.block_rows must be an int >= {MLA_MAX_Q_LEN} (the most query tokens), "
                             f"got {config.block_rows!r}")
        self._given_config = config
        self._q_heads, self._head_dim, self._head_dim_v = q_heads, head_dim, head_dim_v
        self._dtype, self._kv_dtype, self._device, self._max_q_len = dtype, kv_dtype, device, max_q_len
        self._softmax_scale = softmax_scale_of(softmax_scale, head_dim)
        self._grid = num_programs
        self._batch_invariant, self._split_size = batch_invariant, split_size
        q_lens = range(1, max_q_len + 1)
        configs = [self._config_for(n) for n in q_lens]
        for config in configs:
            split_of(batch_invariant, split_size, config.tile)
        most = max(_call.grid(device, c, num_programs) for c in configs)
        # A block's rows are not monotonic in q_len (17 heads: 17 rows at q_len 1, 34 at 2, 4
        # at 4, one head a block): every q_len a plan may take bounds the workspace's rows.
        self._rows = max(_mla_call.rows_of(n, q_heads, c) for n, c in zip(q_lens, configs))
        self._workspace = Workspace()
        self._bufs = _call.buffers(self._workspace, device, _mla_call.mla_slots(most, 0, 0, 0, 0), head_dim_v,
                                   self._rows)
        self._plan = torch.zeros(most, PLAN_FIELDS.value, dtype=torch.int32, device=device)
        self._config = configs[0]
        self._num_programs = _call.grid(device, self._config, num_programs)
        self._seqlens: torch.Tensor | None = None
        self._leftpad: torch.Tensor | None = None
        self._capacity, self._batch, self._q_len, self._causal, self._split = 0, -1, 1, True, 0
        self._plan_layout: tuple = ()
        self._calls: dict[tuple, _mla_call.MLACall] = {}

    def _config_for(self, q_len: int) -> MLAConfig:
        """The runs' launch config for plans of ``q_len``: the one given, else the heuristic's."""
        return self._given_config or _mla_call.heuristic(self.head_dim, self.head_dim_v, self.kv_dtype,
                                                         q_len * self.q_heads, self._device)

    def plan(
        self, cache_seqlens: torch.Tensor | None, capacity: int, *, batch: int | None = None, q_len: int = 1,
        causal: bool = True, cache_leftpad: torch.Tensor | None = None, check: bool = False,
    ) -> None:
        """Compute every program's share for this step's lengths, on the device (no host sync).

        Args:
            cache_seqlens: int32 (batch,), each sequence's live length (clamped to [0,
                capacity]); ``None``: every sequence is ``capacity`` long (then ``batch`` is
                required). ``run`` reads the same tensor again: change it only between steps, and
                plan again after changing it (a run after a change without a plan gives
                garbage; the next plan puts the wrapper right again).
            capacity: cache positions per sequence (cache_len, or max_pages_per_seq x
                page_size); ``run`` checks it.
            batch: number of sequences, when ``cache_seqlens`` is ``None``.
            q_len: query tokens per sequence (at most ``max_q_len``).
            causal: as in :func:`mla_decode`.
            cache_leftpad: int32 (batch,), where each sequence's live keys start, as in
                :func:`mla_decode`; ``run`` reads it again (change it only between steps).
            check: validate the lengths' values on the host (a device sync).
        """
        batch, _ = check_plan_lengths("MLAWrapper.plan", cache_seqlens, cache_leftpad, batch, capacity, self.device)
        if not isinstance(q_len, int) or not 1 <= q_len <= self.max_q_len:
            fail(ValueError, f"q_len must be in [1, max_q_len={self.max_q_len}], got {q_len!r}")
        if not isinstance(causal, bool):
            fail(TypeError, f"causal must be a bool, got {type(causal).__name__}")
        if check:
            check_lengths(cache_seqlens, cache_leftpad, capacity)
        # Every check before any state changes: a refused plan leaves the last one in force.
        config = self._config_for(q_len)
        blocks = _mla_call.blocks_of(q_len, self.q_heads, config.block_rows)[1]
        check_tile_count(batch, blocks, capacity, config.tile)
        split = split_of(self._batch_invariant, self._split_size, config.tile)
        programs = _call.grid(self.device, config, self._grid)
        bufs = self._bufs
        if split:  # one workspace slot per split (growing it may fail: before any state changes)
            bufs = _call.buffers(self._workspace, self.device,
                                 _mla_call.mla_slots(programs, split, batch, blocks, capacity), self.head_dim_v,
                                 self._rows)
        self._config, self._split, self._num_programs, self._bufs = config, split, programs, bufs
        self._seqlens, self._leftpad, self._capacity, self._batch, self._q_len, self._causal = (
            cache_seqlens, cache_leftpad, capacity, batch, q_len, causal)
        self._plan_layout = (self.head_dim_v, self.softmax_scale, causal, batch, capacity, self.num_programs,
                             self._split, q_len)
        launch_plan(self._plan, self.num_programs, cache_seqlens, cache_leftpad, batch, blocks, capacity, q_len, 0,
                    False,
                    *_call.unit_of(self._config, self._split), _call.pdl_of(self._config, self.device),
                    tickets=self._workspace.tickets)

    def run(
        self, q: torch.Tensor, kv_cache: torch.Tensor, *, rope_cache: torch.Tensor | None = None,
        block_table: torch.Tensor | None = None, kv_scale: float | torch.Tensor | None = None,
        out: torch.Tensor | None = None, return_lse: bool = False, lse: torch.Tensor | None = None, check: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One layer's MLA decode over the planned lengths.

        Args:
            q: (batch, q_len, q_heads, head_dim) in the wrapper's dtype (q_len as planned).
            kv_cache: (batch, capacity, 1, head_dim), or pages (num_pages, page_size, 1,
                head_dim) with ``block_table`` int32 (batch, capacity / page_size).
            rope_cache: the rope part apart, as in :func:`mla_decode` (kv_cache then holds
                head_dim_v values a token).
            kv_scale, out, return_lse, lse: as in :func:`mla_decode`.
            check: validate the live slots of ``block_table`` and a per-token ``kv_scale`` on
                the host (a device sync).

        Returns:
            (batch, q_len, q_heads, head_dim_v), and the LSE when ``return_lse``.
        """
        if self._batch < 0:
            fail(RuntimeError, "MLAWrapper.run before plan: call plan(cache_seqlens, capacity) once per step")
        refuse_grad(q, kv_cache, rope_cache, names=("q", "kv_cache", "rope_cache"))
        if lse is not None:
            check_lse_out(lse, q, return_lse)
        out, lse = _outputs(q, self.head_dim_v, out, lse, return_lse)
        fp8 = self.kv_dtype in FP8_DTYPES
        scale = (1.0 if kv_scale is None else kv_scale) if fp8 else kv_scale
        key = _mla_call.call_key(q, kv_cache, rope_cache, out, lse, self._seqlens, self._leftpad, block_table, scale,
                                 self._plan, self._plan_layout)
        call = self._calls.get(key)
        if call is None:  # a layout not seen yet: the full checks
            self._check(q, kv_cache, rope_cache, block_table, out)
            _check_options(q, kv_cache, kv_scale, self._causal)
            call = self._calls[key] = _mla_call.MLACall(
                q, kv_cache, rope_cache, out, lse, block_table=block_table, kv_scale=scale,
                has_seqlens=self._seqlens is not None, has_leftpad=self._leftpad is not None, planned=True,
                causal=self._causal, softmax_scale=self.softmax_scale, head_dim_v=self.head_dim_v, batch=self._batch,
                capacity=self._capacity, programs=self.num_programs, config=self._config, split=self._split)
        if check:
            _check_values(kv_cache, self._seqlens, self._leftpad, block_table, kv_scale, self._batch, self._capacity)
        if self._batch > 0:
            call.launch(self._bufs, q, kv_cache, rope_cache, out, lse, self._seqlens, self._leftpad, block_table, scale,
                        self._plan)
        return (out, lse) if return_lse else out

    def _check(self, q, kv_cache, rope_cache, block_table, out) -> None:
        """Every input check of :func:`mla_decode`, plus agreement with the wrapper and the plan."""
        validate_mla(q, kv_cache, None, block_table, out, self.head_dim_v, None, rope_cache)
        shape = (q.shape[2], q.shape[3], q.dtype, kv_cache.dtype, q.device)
        want = (self.q_heads, self.head_dim, self.dtype, self.kv_dtype, self.device)
        if shape != want:
            fail(ValueError, f"this MLAWrapper is for (q_heads, head_dim, dtype, kv_dtype, device) = {want}, "
                              f"got {shape}")
        check_planned(q, "kv_cache", kv_cache, block_table, self._batch, self._q_len, self._capacity)
