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

import math

import torch

from . import api
from .api import (
    Features,
    _fail,
    _static_config,
    _validate,
    _Workspace,
    check_layer_shape,
    check_lengths,
    check_lse_out,
    check_num_programs,
    check_pages,
    check_plan_lengths,
    check_finite_values,
    check_tile_count,
    default_num_programs,
    kernel_constexprs,
    kernel_scale,
    launch_cached,
    launch_plan,
    layout_of,
    refuse_grad,
    resolve_features,
    run_direct,
    scale_tensor,
    use_pdl,
    window_bounds,
)
from .kernels.config import interpreting
from .kernels.lean_decode import lean_decode_kernel
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
            for it); q_len x (q_heads / kv_heads) <= 128.
        num_programs: persistent grid size; default SMs x programs per SM of the launch config
            that ``leanattn.decode`` picks for the planned q_len.
        softmax_scale: default ``head_dim ** -0.5``.

    The wrapper owns its workspace and plan buffers (allocated here, never again), so calls of
    different wrappers may run concurrently on different streams. One wrapper's calls must be
    ordered on one stream (as the layers of a step are).
    """

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
    ) -> None:
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            _fail(RuntimeError, "create the DecodeWrapper before capturing a CUDA graph: it allocates its buffers")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        kv_dtype = dtype if kv_dtype is None else kv_dtype
        check_layer_shape(q_heads, kv_heads, head_dim, dtype, kv_dtype, max_q_len, device)
        check_num_programs(num_programs)
        scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
        if not math.isfinite(scale):
            _fail(ValueError, f"softmax_scale must be finite, got {softmax_scale}")
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.dtype, self.kv_dtype, self.device, self.max_q_len = dtype, kv_dtype, device, max_q_len
        self.softmax_scale = scale
        group = q_heads // kv_heads
        # The launch config (and with it the default grid) follows q_len x group, as in decode, so
        # each plan picks its own; the buffers are sized for the largest grid and q_len.
        self._grid = num_programs
        self._config = _static_config(head_dim, kv_dtype, group)[0]
        self.num_programs = num_programs or default_num_programs(device, self._config)
        longest, _, rows, head_dim_pad, _ = _static_config(head_dim, kv_dtype, max_q_len * group)
        most = max(self.num_programs, num_programs or default_num_programs(device, longest))
        ws = _Workspace()
        self._acc, self._stats, self._tickets, self._chunk_tickets = ws.get(device, most, rows, head_dim_pad)
        self._plan = torch.zeros(most, PLAN_FIELDS.value, dtype=torch.int32, device=device)
        self._pdl = use_pdl(device)
        self._seqlens: torch.Tensor | None = None
        self._leftpad: torch.Tensor | None = None
        self._capacity = 0
        self._batch = -1
        self._q_len = 1
        self._causal, self._window_size = True, (-1, -1)
        self._plan_layout: tuple = ()
        # Compiled runs by layout (see api.launch_cached) and the features resolved for them;
        # the buffers above are the wrapper's own, so they need no place in the key (the plan's
        # grid and config are in its part of it).
        self._direct: dict[tuple, tuple] = {}
        self._features: dict[tuple, Features] = {}

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
        and plan again after changing them.
        """
        batch, _ = check_plan_lengths("DecodeWrapper.plan", cache_seqlens, cache_leftpad, batch, capacity, self.device)
        if not isinstance(q_len, int) or not 1 <= q_len <= self.max_q_len:
            _fail(ValueError, f"q_len must be in [1, max_q_len={self.max_q_len}], got {q_len!r}")
        # Nothing is allocated here: plan is captured in CUDA graphs.
        window_left, _, has_window, _ = window_bounds(causal, window_size, q_len)
        if check:
            check_lengths(cache_seqlens, cache_leftpad, capacity)
        self._config = _static_config(self.head_dim, self.kv_dtype, q_len * (self.q_heads // self.kv_heads))[0]
        self.num_programs = self._grid or default_num_programs(self.device, self._config)
        check_tile_count(batch, self.kv_heads, capacity, self._config.tile)
        self._seqlens, self._leftpad, self._capacity, self._batch = cache_seqlens, cache_leftpad, capacity, batch
        self._q_len, self._causal, self._window_size = q_len, causal, tuple(window_size)
        # What the run's compiled kernel depends on in the plan's inputs.
        self._plan_layout = (layout_of(cache_seqlens, cache_leftpad), batch, capacity, q_len, causal, self._window_size,
                             self.num_programs, self._config)
        launch_plan(self._plan, self.num_programs, cache_seqlens, cache_leftpad, batch, self.kv_heads, capacity, q_len,
                    window_left, has_window, self._config.tile, self._config.target_share, self._pdl)

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
            _fail(RuntimeError, "DecodeWrapper.run before plan: call plan(cache_seqlens, capacity) once per step")
        refuse_grad(q, k_cache, v_cache)
        if out is None:
            out = torch.empty_like(q)
        if lse is None:
            lse_layout = return_lse  # the default LSE: contiguous, from the allocator
            lse_strides = (self.q_heads * q.shape[1], q.shape[1], 1) if return_lse else (0, 0, 0)
            if return_lse:
                lse = torch.empty(q.shape[0], self.q_heads, q.shape[1], dtype=torch.float32, device=q.device)
        else:
            check_lse_out(lse, q, return_lse)
            lse_layout, lse_strides = layout_of(lse), lse.stride()
        # Everything the compiled kernel depends on (see launch_cached), read once: this is the
        # per-layer host path, so no attribute is read twice.
        qs, ks, vs, os_ = q.stride(), k_cache.stride(), v_cache.stride(), out.stride()
        ptrs = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr())
        # Triton specialises each pointer on 16-byte alignment: one bool when all are aligned.
        aligned = (ptrs[0] | ptrs[1] | ptrs[2] | ptrs[3]) % 16 == 0 or tuple(p % 16 == 0 for p in ptrs)
        layout = (q.shape, qs, q.dtype, q.device, k_cache.shape, ks, k_cache.dtype, k_cache.device,
                  v_cache.shape, vs, v_cache.dtype, v_cache.device, out.shape, os_, out.dtype, out.device,
                  aligned, lse_layout, layout_of(block_table), self._plan_layout, self._pdl, softcap,
                  None if sinks is None else layout_of(sinks),
                  k_scale if not isinstance(k_scale, torch.Tensor) else layout_of(k_scale),
                  v_scale if not isinstance(v_scale, torch.Tensor) else layout_of(v_scale))
        features = self._features.get(layout)
        if features is None:  # a layout not seen yet (or the interpreter): the full checks
            self._check(q, k_cache, v_cache, block_table, out)
            features, _, _ = resolve_features(q, k_cache, self._causal, self._window_size, softcap, sinks,
                                              k_scale, v_scale)
            if not interpreting():
                self._features[layout] = features
        if check:
            if block_table is not None:
                check_pages(block_table, k_cache.shape[0], k_cache.shape[1], self._seqlens, self._leftpad)
            check_finite_values(sinks, k_scale, v_scale)
        if self._batch == 0:
            return (out, lse) if return_lse else out
        if block_table is None:
            page_size, bt, stride_btb, num_pages = 0, self._tickets, 0, 0
        else:
            page_size, bt, stride_btb, num_pages = k_cache.shape[1], block_table, block_table.stride(0), k_cache.shape[0]
        if features.fp8:
            k_scale, v_scale = (scale_tensor(1.0 if x is None else x, self.kv_heads, self.device) for x in (k_scale, v_scale))
        dummy = self._acc
        args = (
            q, k_cache, v_cache, out, lse if lse is not None else dummy,
            self._seqlens if self._seqlens is not None else self._tickets,
            self._leftpad if self._leftpad is not None else self._tickets,
            bt, sinks if sinks is not None else dummy, k_scale if features.fp8 else dummy,
            v_scale if features.fp8 else dummy,
            self._plan, self._acc, self._stats, self._tickets, self._chunk_tickets,
            qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], os_[0], os_[1], os_[2],
            *lse_strides,
            stride_btb,
            self._batch, self.kv_heads, self._capacity, num_pages, features.window_left, features.window_right,
            kernel_scale(self.softmax_scale, features), features.softcap,
        )
        hit = self._direct.get(layout)
        if hit is not None:
            try:
                run_direct(hit, self.num_programs, self.device, args)
                return (out, lse) if return_lse else out
            except (TypeError, AttributeError) as e:  # a Triton whose launcher differs
                api.DIRECT_LAUNCH_ERROR.append(repr(e))
                self._direct.clear()
        launch_cached(
            lean_decode_kernel, self.num_programs, layout, args,
            lambda: kernel_constexprs(
                q, k_cache, page_size, self._config, features, has_seqlens=self._seqlens is not None,
                has_leftpad=self._leftpad is not None, planned=True, return_lse=return_lse, pdl=self._pdl,
            ),
            self._config, self._pdl, self.device, cache=self._direct,
        )
        return (out, lse) if return_lse else out

    def _check(self, q, k_cache, v_cache, block_table, out) -> None:
        """Every input check of ``leanattn.decode``, plus agreement with the wrapper and the plan."""
        _validate(q, k_cache, v_cache, None, block_table, out)
        shape = (q.shape[2], k_cache.shape[2], q.shape[3], q.dtype, k_cache.dtype, q.device)
        want = (self.q_heads, self.kv_heads, self.head_dim, self.dtype, self.kv_dtype, self.device)
        if shape != want:
            _fail(ValueError, "this DecodeWrapper is for (q_heads, kv_heads, head_dim, dtype, kv_dtype, device) = "
                  f"{want}, got {shape}")
        if q.shape[0] != self._batch:
            _fail(ValueError, f"planned for batch {self._batch}, got q of batch {q.shape[0]}")
        if q.shape[1] != self._q_len:
            _fail(ValueError, f"planned for q_len {self._q_len}, got q of q_len {q.shape[1]}")
        capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
        if capacity != self._capacity:
            what = "k_cache.shape[1]" if block_table is None else "block_table.shape[1] * page_size"
            _fail(ValueError, f"planned for capacity {self._capacity}, got {what} = {capacity}")
