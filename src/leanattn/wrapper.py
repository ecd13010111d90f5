"""Plan once per decode step, run once per layer.

A serving engine calls attention once per layer (32 to 80 times a step) with the same lengths
every time. ``DecodeWrapper.plan`` turns the step's lengths into every program's share once, on
the device; ``DecodeWrapper.run`` then only attends. Neither syncs with the host, so a CUDA graph
can capture a plan together with the layers' runs and each replay re-plans for the new lengths::

    w = leanattn.DecodeWrapper(q_heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, device="cuda")
    w.plan(cache_seqlens, capacity)            # once per step
    for layer in range(num_layers):
        w.run(q[layer], k_cache[layer], v_cache[layer], out=out[layer])

``run`` gives results bitwise equal to :func:`leanattn.decode` on the same inputs.
"""

from __future__ import annotations

import warnings

import torch

from . import _call
from ._checks import (
    check_finite_values, check_layer_shape, check_lengths, check_lse_out, check_num_programs,
    check_pages, check_plan_lengths, check_planned, check_tile_count, fail, fixed_attribute, refuse_grad,
    softmax_scale_of, split_of, wrapper_device, validate,
)
from ._features import resolve_features, window_bounds
from ._plan import launch_plan
from ._workspace import Workspace
from .kernels.config import KernelConfig
from .kernels.plan import PLAN_FIELDS

__all__ = ["DecodeWrapper"]


class DecodeWrapper:
    """Decode attention for one model's shape, planned once per step and run once per layer.

    Args:
        q_heads, kv_heads, head_dim: the attention layers' shape (q_heads a multiple of kv_heads).
        dtype: q and output dtype (float16 or bfloat16).
        device: where everything lives (a CUDA device, or the CPU under Triton's interpreter).
        kv_dtype: the caches' dtype: ``dtype`` (default), or float8_e4m3fn / float8_e5m2.
        max_q_len: the most query tokens per sequence a step will have (the workspace is sized
            for it); q_len x (q_heads / kv_heads) <= ``leanattn.max_query_rows(head_dim)``.
        num_programs: persistent grid size; default SMs x programs per SM of the launch config
            that ``leanattn.decode`` picks for the planned q_len, batch and capacity.
        softmax_scale: default ``head_dim ** -0.5``.
        config: a :class:`leanattn.KernelConfig` for every plan and run, instead of the
            heuristic's (``leanattn.choose_config``) for each plan's q_len.
        batch_invariant, split_size: as in :func:`leanattn.decode`: each sequence's results are
            the same bits whatever rides with it. Its workspace grows with batch x capacity:
            make the largest plan before capturing a CUDA graph.
        paged: the runs take paged caches (``block_table``). Paged and contiguous caches may
            have different launch configs (16-bit caches at d=64-128 do), so plans differ; a run of the
            other kind gives exact results on the planned config, with a warning (once) where
            its own config differs.

    The wrapper owns its workspace and plan buffers (allocated here; in batch-invariant mode
    grown by a plan that needs more), so calls of different wrappers may run concurrently on
    different streams. One wrapper's calls must be
    ordered on one stream (as the layers of a step are).

    The constructor's arguments read back as attributes (``q_heads``, ``softmax_scale``, ...) and
    ``num_programs`` as the last plan's grid; none may be assigned.
    """

    q_heads, kv_heads, head_dim, max_q_len = (fixed_attribute(n) for n in ("q_heads", "kv_heads", "head_dim", "max_q_len"))
    dtype, kv_dtype, device, paged = (fixed_attribute(n) for n in ("dtype", "kv_dtype", "device", "paged"))
    softmax_scale, num_programs = fixed_attribute("softmax_scale"), fixed_attribute("num_programs")

    def __init__(
        self,
        q_heads: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        kv_dtype: torch.dtype | None = None,
        max_q_len: int = 1,
        num_programs: int | None = None,
        softmax_scale: float | None = None,
        config: KernelConfig | None = None,
        batch_invariant: bool = False,
        split_size: int | None = None,
        paged: bool = False,
    ) -> None:
        device = wrapper_device(device, "DecodeWrapper")
        kv_dtype = dtype if kv_dtype is None else kv_dtype
        check_layer_shape(q_heads, kv_heads, head_dim, dtype, kv_dtype, max_q_len, device, "max_q_len")
        check_num_programs(num_programs)
        if config is not None and not isinstance(config, KernelConfig):
            fail(TypeError, f"config must be a leanattn.KernelConfig, got {type(config).__name__}")
        if not isinstance(paged, bool):
            fail(TypeError, f"paged must be a bool, got {type(paged).__name__}")
        if not isinstance(batch_invariant, bool):  # before the (cached) heuristic sees it
            fail(TypeError, f"batch_invariant must be a bool, got {type(batch_invariant).__name__}")
        self._q_heads, self._kv_heads, self._head_dim = q_heads, kv_heads, head_dim
        self._dtype, self._kv_dtype, self._device, self._max_q_len = dtype, kv_dtype, device, max_q_len
        self._softmax_scale = softmax_scale_of(softmax_scale, head_dim)
        group = q_heads // kv_heads
        # The launch config (and with it the default grid) follows q_len x group and the call's
        # size (large: heads and capacity), as in decode, so each plan picks its own; the buffers are sized for the
        # largest grid and q_len.
        self._grid, self._given_config, self._paged = num_programs, config, paged
        self._batch_invariant, self._split_size = batch_invariant, split_size
        self._config = self._config_for(1)
        self._num_programs = _call.grid(device, self._config, num_programs)
        # Plans of any q_len, batch and capacity (whose size may pick another config) fit.
        most = max(_call.grid(device, self._config_for(q_len, large=big), num_programs)
                   for q_len in (1, max_q_len) for big in (False, True))
        for q_len in (1, max_q_len):  # the configs' tiles bound the split (plan checks its own)
            split_of(batch_invariant, split_size, self._config_for(q_len).tile)
        self._split = 0
        self._workspace = Workspace()
        self._bufs = _call.buffers(self._workspace, device, _call.slots(most, 0, 0, 0, 0), head_dim, max_q_len * group)
        self._plan = torch.zeros(most, PLAN_FIELDS.value, dtype=torch.int32, device=device)
        self._seqlens: torch.Tensor | None = None
        self._leftpad: torch.Tensor | None = None
        self._bounds: torch.Tensor | None = None
        self._capacity = 0
        self._batch = -1
        self._q_len = 1
        self._causal, self._window_size = True, (-1, -1)
        # The plan's part of the runs' call key (see _call.call_key), as a small int: one per
        # distinct plan layout, so a run hashes an int rather than the layout's nested tuple.
        self._plan_layouts: dict[tuple, int] = {}
        self._plan_key = -1
        # Runs by call key (checked, with their features resolved); the buffers above are the
        # wrapper's own, so they need no place in the key (the plan's grid and config are in it).
        self._calls: dict[tuple, _call.Call] = {}
        self._told = False  # warned of a run with the other kind of cache

    def _config_for(self, q_len: int, paged: bool | None = None, large: bool = False) -> KernelConfig:
        """The runs' launch config for plans of ``q_len`` (of a ``large`` call or not: see
        ``_call.large``): the one given, else the heuristic's for the wrapper's kind of cache (or ``paged``)."""
        paged = self.paged if paged is None else paged
        return self._given_config or _call.heuristic(self.head_dim, self.kv_dtype, q_len * (self.q_heads // self.kv_heads),
                                                     paged, self._batch_invariant, large)

    @property
    def compiled_kernels(self) -> list:
        """The compiled kernels this wrapper launches directly (Triton ``CompiledKernel``s, for
        reports of registers, spills and shared memory): each call's decode kernel, its merge
        kernel if it has one, and its eager form's decode kernel if it has one
        (``_call.EAGER_ONE_LAUNCH_BYTES``); empty under the interpreter."""
        return [hit[0] for call in self._calls.values() for hit in (call.hit, call.merge_hit, call.eager_hit)
                if hit is not None]

    def plan(
        self, cache_seqlens: torch.Tensor | None, capacity: int, *, batch: int | None = None,
        cache_leftpad: torch.Tensor | None = None, q_len: int = 1, causal: bool = True,
        window_size: tuple[int, int] = (-1, -1), check: bool = False,
    ) -> None:
        """Compute every program's share for this step's lengths, on the device (no host sync).

        Args:
            cache_seqlens: int32 (batch,), where each sequence's live tokens end (clamped to
                [cache_leftpad, capacity]); ``None``: every sequence is ``capacity`` long (then
                ``batch`` is required).
            capacity: cache positions per sequence: ``cache_len`` of a contiguous cache, or
                ``max_pages_per_seq * page_size`` of a paged one. ``run`` checks it.
            batch: number of sequences, when ``cache_seqlens`` is ``None``.
            cache_leftpad: int32 (batch,), where each sequence's live tokens start; ``None``: 0.
            q_len: query tokens per sequence (at most ``max_q_len``).
            causal, window_size: as in :func:`leanattn.decode`; keys before every query's window
                are left out of the shares.
            check: validate the lengths' values on the host (a device sync: leave it off in
                CUDA graphs and fast paths); ValueError names the sequence and the value.

        ``run`` reads the lengths from the same tensors again: change them only between steps,
        and plan again after changing them (a run after a change without a plan gives garbage;
        the next plan puts the wrapper right again).
        """
        self._plan_bounded(cache_seqlens, capacity, batch=batch, cache_leftpad=cache_leftpad, q_len=q_len,
                           causal=causal, window_size=window_size, check=check, bounds=None)

    def _plan_bounded(
        self, cache_seqlens: torch.Tensor | None, capacity: int, *, batch: int | None,
        cache_leftpad: torch.Tensor | None, q_len: int, causal: bool, window_size: tuple[int, int], check: bool,
        bounds: torch.Tensor | None,
    ) -> None:
        """:meth:`plan`, plus ``bounds``: None, or int32 (batch, q_len, 2) contiguous on the
        device, query token j of sequence b seeing keys ``[bounds[b, j, 0], bounds[b, j, 1])``
        numbered from the sequence's first live key (cache_leftpad), in place of the window's
        rows (plan with ``causal=False`` and no window). Context-parallel decode gives them:
        there a key's place in the whole sequence is not its place in the rank's cache. Read by
        the runs like the lengths; the partition ignores them."""
        batch, _ = check_plan_lengths("DecodeWrapper.plan", cache_seqlens, cache_leftpad, batch, capacity, self.device)
        if not isinstance(q_len, int) or not 1 <= q_len <= self.max_q_len:
            fail(ValueError, f"q_len must be in [1, max_q_len={self.max_q_len}], got {q_len!r}")
        # Nothing is allocated here (plan is captured in CUDA graphs), except a batch-invariant
        # workspace grown for a larger batch x capacity.
        window_left, _, has_window, _ = window_bounds(causal, window_size, q_len)
        if check:
            check_lengths(cache_seqlens, cache_leftpad, capacity)
        # Every check before any state changes: a refused plan leaves the last one in force.
        big = _call.large(self.device, batch * self.kv_heads, capacity)
        config = self._config_for(q_len, large=big)
        check_tile_count(batch, self.kv_heads, capacity, config.tile)
        split = split_of(self._batch_invariant, self._split_size, config.tile)
        programs = _call.grid(self.device, config, self._grid)
        bufs = self._bufs
        if split:  # one workspace slot per split (growing it may fail: before any state changes)
            bufs = _call.buffers(self._workspace, self.device, _call.slots(programs, split, batch, self.kv_heads, capacity),
                                 self.head_dim, self.max_q_len * (self.q_heads // self.kv_heads))
        self._config, self._split, self._num_programs, self._bufs = config, split, programs, bufs
        self._seqlens, self._leftpad, self._capacity, self._batch = cache_seqlens, cache_leftpad, capacity, batch
        self._q_len, self._causal, self._window_size = q_len, causal, tuple(window_size)
        self._bounds = bounds
        layout = (_call.layout_of(cache_seqlens, cache_leftpad, bounds), batch, capacity, q_len, self.num_programs,
                  self._config, causal, self._window_size, self._split)
        self._plan_key = self._plan_layouts.setdefault(layout, len(self._plan_layouts))
        launch_plan(self._plan, self.num_programs, cache_seqlens, cache_leftpad, batch, self.kv_heads, capacity, q_len,
                    window_left, has_window, *_call.unit_of(self._config, self._split),
                    _call.pdl_of(self._config, self.device), tickets=self._workspace.tickets)

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        block_table: torch.Tensor | None = None,
        softcap: float = 0.0,
        sinks: torch.Tensor | None = None,
        k_scale: float | torch.Tensor | None = None,
        v_scale: float | torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        return_lse: bool = False,
        lse: torch.Tensor | None = None,
        check: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention of one layer over the planned lengths.

        Args:
            q: (batch, q_len, q_heads, head_dim) in the wrapper's dtype (q_len as planned).
            k_cache, v_cache: (batch, capacity, kv_heads, head_dim), any strides with a unit last
                stride; or pages (num_pages, page_size, kv_heads, head_dim) with ``block_table``
                int32 (batch, capacity / page_size).
            softcap, sinks, k_scale, v_scale: this layer's, as in :func:`leanattn.decode`.
            out: optional tensor like q to write into.
            return_lse: also return the natural-log LSE, float32 (batch, q_heads, q_len).
            lse: optional float32 (batch, q_heads, q_len) tensor, any strides, to write the LSE
                into (with ``return_lse`` only).
            check: validate the live slots of ``block_table``, the sinks and scales on the host (a device
                sync); without it an out-of-range page gives NaN rows where it is attended to.

        Returns:
            Like q, and the LSE when ``return_lse``.
        """
        if self._batch < 0:
            fail(RuntimeError, "DecodeWrapper.run before plan: call plan(cache_seqlens, capacity) once per step")
        refuse_grad(q, k_cache, v_cache)
        if lse is None and return_lse:
            lse = torch.empty(q.shape[0], self.q_heads, q.shape[1], dtype=torch.float32, device=q.device)
        elif lse is not None:
            check_lse_out(lse, q, return_lse)
        # An output allocated here is like q: the key's layout of q covers it.
        key = _call.call_key(q, k_cache, v_cache, out, lse, block_table, sinks, k_scale, v_scale, softcap,
                             self._plan_key)
        if out is None:
            out = torch.empty_like(q)
        call = self._calls.get(key)
        if call is None:  # a layout not seen yet: the full checks
            self._check(q, k_cache, v_cache, block_table, out)
            paged = block_table is not None
            big = _call.large(self.device, self._batch * self.kv_heads, self._capacity)
            if paged != self.paged and not self._told and self._config_for(self._q_len, paged, big) != self._config:
                self._told = True
                kind = "a paged" if paged else "a contiguous"
                warnings.warn(f"DecodeWrapper(paged={self.paged}) ran {kind} cache: exact, on the other kind's launch "
                              f"config; make the wrapper with paged={paged} for its own", stacklevel=2)
            features, _, _ = resolve_features(q, k_cache, self._causal, self._window_size, softcap, sinks,
                                              k_scale, v_scale)
            call = self._calls[key] = _call.Call(
                q, k_cache, v_cache, out, lse, block_table=block_table, k_scale=k_scale, v_scale=v_scale,
                has_seqlens=self._seqlens is not None, has_leftpad=self._leftpad is not None, planned=True,
                features=features, softmax_scale=self.softmax_scale, batch=self._batch, capacity=self._capacity,
                programs=self.num_programs, config=self._config, split=self._split,
                has_bounds=self._bounds is not None)
        if check:
            # (Keys before every query's window are not read; with per-query bounds, all are checked.)
            window = None if self._bounds is not None else (call.features.window_left, self._q_len)
            if block_table is not None:
                check_pages(block_table, k_cache.shape[0], k_cache.shape[1], self._seqlens, self._leftpad, window)
            check_finite_values(sinks, k_scale, v_scale, cache_seqlens=self._seqlens, cache_leftpad=self._leftpad,
                                block_table=block_table, batch=self._batch, capacity=self._capacity, window=window)
        if self._batch > 0:
            call.launch(self._bufs, q, k_cache, v_cache, out, lse, self._seqlens, self._leftpad, block_table, sinks,
                        k_scale, v_scale, self._plan, self._bounds)
        return (out, lse) if return_lse else out

    def _check(self, q, k_cache, v_cache, block_table, out) -> None:
        """Every input check of ``leanattn.decode``, plus agreement with the wrapper and the plan."""
        validate(q, k_cache, v_cache, None, block_table, out)
        shape = (q.shape[2], k_cache.shape[2], q.shape[3], q.dtype, k_cache.dtype, q.device)
        want = (self.q_heads, self.kv_heads, self.head_dim, self.dtype, self.kv_dtype, self.device)
        if shape != want:
            fail(ValueError, "this DecodeWrapper is for (q_heads, kv_heads, head_dim, dtype, kv_dtype, device) = "
                  f"{want}, got {shape}")
        check_planned(q, "k_cache", k_cache, block_table, self._batch, self._q_len, self._capacity)
