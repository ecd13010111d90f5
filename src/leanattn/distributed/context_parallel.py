"""``ContextParallelDecode`` and ``decode``: attention over a KV cache dealt across the ranks of a
process group (see the package's docstring)."""

from __future__ import annotations

import math
import struct

import torch
import torch.distributed as dist

from .._checks import SUPPORTED_DTYPES, check_plan_lengths, fixed_attribute, softmax_scale_of
from .._features import window_bounds
from ..merge import merge_states_into
from ..wrapper import DecodeWrapper
from . import _symmetric
from ._exchange import Buffers, all_gather, pack_views, padded_words
from ._layout import Positions, held_before, key_bounds

__all__ = ["ContextParallelDecode", "decode"]

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2}
EXCHANGES = ("all_gather", "symmetric")
_MAGIC = 0x1EA7C0DE
# Fields of the metadata every rank's plan contributes; all must agree.
_FIELDS = ("magic", "world_size", "batch", "q_len", "q_heads", "kv_heads", "head_dim", "dtype",
           "scatter_heads", "softmax_scale_bits", "page_size", "cache_leftpad", "causal", "window_left",
           "window_right", "exchange", "local_error")


class ContextParallelDecode:
    """Decode attention over a KV cache split across the ranks of a process group.

    Usage, on every rank of ``group``::

        cp = ContextParallelDecode(group, q_heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, device=dev)
        cp.plan(local_seqlens, capacity)       # once per step: checks every rank agrees
        for layer in layers:
            out = cp.run(q, k_cache[layer], v_cache[layer])   # (batch, 1, q_heads, head_dim)

    With several query tokens per sequence (or leftpad, or a window), plan with the global
    lengths and the round-robin page size instead, so that keys are masked by their position in
    the whole sequence: ``cp.plan(None, capacity, q_len=4, seqlens=seqlens, page_size=64)``.

    Each rank's local attention is a :class:`leanattn.DecodeWrapper`: the plan deals the rank's
    tiles to its programs once per step, and every layer's run reuses that.

    ``plan`` is a collective: it gathers a few integers from every rank (shapes, dtype, heads,
    scale, mode) and raises the same ValueError on every rank when they disagree, or when any
    rank's own arguments are bad, instead of leaving the others waiting in a collective.
    ``plan(..., check=False)`` skips that exchange (and its host sync) and only re-plans the local
    attention on the device: for steps whose shapes are those of the last checked plan, on every
    rank. ``run`` trusts the plan: it does no host synchronisation, allocates nothing but its
    outputs, and its collective buffers are allocated once per (batch, q_len) by ``plan``.

    CUDA graphs: run each layer once eagerly first (that compiles the kernels and warms NCCL),
    then capture ``plan(..., check=False)`` followed by the layers' ``run``. The graph reads the
    ``local_seqlens`` (or ``seqlens`` and ``cache_leftpad``) and ``block_table`` tensors planned
    at capture: to replay with new lengths, write them into those tensors (capturing only the
    runs works too if ``plan(..., check=False)`` is called eagerly before each replay). Plan the
    longest q_len before capturing: a longer one grows the local attention's workspace.

    Args:
        group: the process group (``None``: the default group). Its backend must handle tensors
            on ``device`` (NCCL for CUDA, gloo for CPU).
        q_heads, kv_heads, head_dim, dtype: the attention shape, the same on every rank.
        device: where q, the cache and the outputs live.
        scatter_heads: return only this rank's q_heads / world_size heads
            (heads [rank * q_heads / W, (rank + 1) * q_heads / W)) instead of all of them.
        softmax_scale: defaults to ``head_dim ** -0.5``.
        num_programs: the local attention's persistent grid size (see :func:`leanattn.decode`).
        exchange: how the partials meet. ``"all_gather"`` (default): a torch.distributed
            collective (``all_to_all`` with ``scatter_heads``), then the merge kernel; any
            backend. ``"symmetric"``: one kernel pushes the rank's partial into every rank's
            buffer in torch symmetric memory (CUDA), waits for the others' and merges (no
            collective in ``run``; ``merge.push_merge_kernel``). The same bits either way. Its
            buffers are allocated by the checked plan of each (batch, q_len) (a rendezvous), so
            keep one ContextParallelDecode for many steps (the one-shot :func:`decode` makes
            them every call). Every rank must make the same sequence of ``run`` calls: a rank
            that skips one leaves the others waiting inside the kernel, which has no timeout
            (NCCL's watchdog does not see it). Only unicast mappings are used; set
            TORCH_SYMM_MEM_DISABLE_MULTICAST=1 to keep torch from making multicast objects.

    The constructor's arguments, ``rank``, ``world_size`` and ``heads_out`` read back as
    attributes; none may be assigned (the local wrappers and buffers are built from them).
    """

    group, rank, world_size = (fixed_attribute(n) for n in ("group", "rank", "world_size"))
    q_heads, kv_heads, head_dim, dtype = (fixed_attribute(n) for n in ("q_heads", "kv_heads", "head_dim", "dtype"))
    device, scatter_heads, heads_out = (fixed_attribute(n) for n in ("device", "scatter_heads", "heads_out"))
    softmax_scale, num_programs = fixed_attribute("softmax_scale"), fixed_attribute("num_programs")
    exchange = fixed_attribute("exchange")

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        q_heads: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        scatter_heads: bool = False,
        softmax_scale: float | None = None,
        num_programs: int | None = None,
        exchange: str = "all_gather",
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ContextParallelDecode needs torch.distributed initialised (init_process_group)")
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
        self._exchange = exchange
        self._group = group
        self._rank = dist.get_rank(group)
        self._world_size = dist.get_world_size(group)
        self._q_heads, self._kv_heads, self._head_dim = int(q_heads), int(kv_heads), int(head_dim)
        self._dtype = dtype
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self._device = device
        self._scatter_heads = bool(scatter_heads)
        self._softmax_scale = softmax_scale_of(softmax_scale, int(head_dim))
        self._num_programs = num_programs
        self._heads_out = self._q_heads // self._world_size if self._scatter_heads else self._q_heads
        # Built by the first plan, where a bad shape becomes an error on every rank, not a hang.
        self._wrapper: DecodeWrapper | None = None  # the current plan's: one of _wrappers
        self._wrappers: dict[bool, DecodeWrapper] = {}  # by cache kind (paged or not)
        # Wrappers outgrown by a longer q_len: a CUDA graph captured with one still reads its plan
        # and workspace. Each raises its kind's longest q_len, so they are few (q_len is bounded);
        # switching cache kinds retires none.
        self._retired: list[DecodeWrapper] = []
        self._buffers: dict[tuple[int, int], Buffers] = {}
        self._checked: tuple | None = None  # what the last checked plan agreed on
        self._planned: tuple[int, int, torch.Tensor | None, Buffers] | None = None

    # -- plan -----------------------------------------------------------------------------------

    def _local_error(self, local_seqlens: torch.Tensor | None, capacity: int, batch: int | None, q_len: int,
                     block_table: torch.Tensor | None, positions: Positions) -> tuple[str | None, int]:
        """This rank's own argument problems (a message or None) and the batch size."""
        if self.scatter_heads and self.q_heads % self.world_size:
            return f"scatter_heads needs q_heads ({self.q_heads}) divisible by the world size ({self.world_size})", 0
        if self.dtype not in SUPPORTED_DTYPES:
            return f"dtype must be float16 or bfloat16, got {self.dtype}", 0
        if isinstance(q_len, bool) or not isinstance(q_len, int) or q_len < 1:
            return f"q_len must be a positive int, got {q_len!r}", 0
        paged = block_table is not None
        current = self._wrappers.get(paged)
        if current is None or current.max_q_len < q_len:
            if current is not None:
                self._retired.append(current)
            try:  # its workspace is sized for the longest q_len planned so far, of either kind
                self._wrappers[paged] = DecodeWrapper(
                    self.q_heads, self.kv_heads, self.head_dim, self.dtype, self.device,
                    max_q_len=max([q_len] + [w.max_q_len for w in self._wrappers.values()]),
                    num_programs=self.num_programs, softmax_scale=self.softmax_scale, paged=paged)
            except (ValueError, TypeError) as e:
                return str(e), 0
        self._wrapper = self._wrappers[paged]
        if not isinstance(capacity, int) or capacity < 0:
            return f"capacity must be a non-negative int, got {capacity!r}", 0
        if not positions.active:
            # Local lengths: any split of the tokens, but no key's global position.
            if q_len != 1 or positions.given():
                got = ", ".join([f"q_len {q_len}"] + positions.given())
                return "q_len > 1, cache_leftpad and window_size mask keys by their position in the whole " \
                       "sequence: pass seqlens= (global lengths) and page_size= (the round-robin page size) " \
                       f"instead of local_seqlens (got {got})", 0
            error, n = self._local_lengths_error(local_seqlens, capacity, batch)
        else:
            if local_seqlens is not None:
                return "give local_seqlens (any split of the tokens, one query token) or seqlens with page_size " \
                       "(round-robin pages, global positions), not both", 0
            try:
                n = positions.check(self.device)
            except (ValueError, TypeError) as e:
                return str(e), 0
            error = None if batch is None or batch == n else f"batch ({batch}) differs from seqlens' length ({n})"
            if error is None and n:
                # The tokens this rank's pages hold must fit its cache: past capacity the local
                # attention would clamp them away, silently. (A sync; the exchange has one anyway.)
                held = int(held_before(positions.seqlens.to(torch.int64).clamp_min(0), self.world_size, self.rank,
                                       positions.page_size).max())
                if held > capacity:
                    error = f"with pages of {positions.page_size} dealt over {self.world_size} ranks this rank holds " \
                            f"up to {held} tokens of a sequence, but its cache has capacity {capacity}"
        if error is not None:
            return error, n
        if block_table is not None and (
            not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2
            or block_table.shape[0] != n or block_table.device != self.device
            or (block_table.stride(-1) != 1 and block_table.shape[1] > 1)
        ):
            return f"block_table must be int32 (batch={n}, max_pages) on {self.device} with a unit last stride, " \
                   f"got {block_table.dtype} {tuple(block_table.shape)} on {block_table.device}, strides " \
                   f"{block_table.stride()}", n
        return None, n

    def _local_lengths_error(self, local_seqlens: torch.Tensor | None, capacity: int,
                             batch: int | None) -> tuple[str | None, int]:
        """Problems of ``plan``'s local lengths (a message or None) and the batch size."""
        if local_seqlens is None:
            if batch is None or batch < 0:
                return "give local_seqlens, or batch when every rank uses its full cache capacity", 0
            return None, batch
        if not isinstance(local_seqlens, torch.Tensor) or local_seqlens.dtype != torch.int32 or local_seqlens.dim() != 1:
            return f"local_seqlens must be an int32 (batch,) tensor, got {getattr(local_seqlens, 'dtype', type(local_seqlens))} " \
                   f"{tuple(getattr(local_seqlens, 'shape', ()))}", 0
        n = local_seqlens.shape[0]
        if batch is not None and batch != n:
            return f"batch ({batch}) differs from local_seqlens' length ({n})", 0
        try:  # the local plan's own checks, here so that every rank hears of a failure
            check_plan_lengths("ContextParallelDecode.plan", local_seqlens, None, n, capacity, self.device)
        except (ValueError, TypeError) as e:
            return f"local_seqlens: {e}", n
        return None, n

    def plan(
        self,
        local_seqlens: torch.Tensor | None,
        capacity: int,
        *,
        batch: int | None = None,
        q_len: int = 1,
        block_table: torch.Tensor | None = None,
        seqlens: torch.Tensor | None = None,
        page_size: int | None = None,
        cache_leftpad: torch.Tensor | None = None,
        causal: bool = True,
        window_size: tuple[int, int] = (-1, -1),
        check: bool = True,
    ) -> None:
        """Set this step's lengths (and block table), check every rank agrees, and plan the
        local attention.

        With ``check`` (the default) a collective over the group: every rank must call it. It
        raises ValueError on every rank if the ranks' shapes, dtype, heads, scale, mode, page
        size or window differ, or if any rank's arguments are bad. With ``check=False``: no
        collective and no host sync (so it can be captured in a CUDA graph); the batch, q_len,
        page size, window and which lengths are given must be those of the last checked plan,
        on every rank.

        The lengths come one of two ways:

        - ``local_seqlens``: the tokens of each sequence this rank holds, however they were
          dealt. One query token per sequence (``q_len=1``), no leftpad, no window: every key
          a rank holds is visible, so its global position does not matter.
        - ``seqlens`` and ``page_size``: the global lengths, with tokens dealt by pages of
          ``page_size`` round-robin (:func:`round_robin_lengths`; page j on rank j % world).
          The plan derives the local lengths and each key's global position, so it takes
          ``q_len`` up to :func:`leanattn.decode`'s limit (q_len x q_heads / kv_heads <= 128; 16
          at head dim 512), bottom-right causal over the whole sequence (the queries are the
          last q_len positions of each sequence), ``cache_leftpad`` and ``window_size`` in
          global positions: the results of :func:`leanattn.decode` on the whole cache.

        Args:
            local_seqlens: int32 (batch,) tokens of each sequence this rank holds (0 is fine),
                on ``device``; ``None`` means ``capacity`` for every sequence (then pass
                ``batch``), and must be ``None`` with ``seqlens`` (the plan derives them).
            capacity: positions per sequence of this rank's cache: its ``cache_len``, or
                ``max_pages * page_size`` when paged. Ranks may differ. With ``seqlens``, a
                checked plan refuses a capacity below the tokens the rank's dealt pages hold
                (a round-robin share is up to ``ceil(pages / world_size) * page_size``).
            batch: the batch size, when no lengths tensor is given.
            q_len: query tokens per sequence (1: decode; more needs ``seqlens``).
            block_table: int32 (batch, max_pages) of this rank's paged cache, or None.
            seqlens: int32 (batch,) global lengths on ``device``, the same on every rank.
            page_size: tokens per dealt page (not the paged cache's page size, which may differ).
            cache_leftpad: int32 (batch,) global position where each sequence's live tokens
                start (the same on every rank); the rank's cache holds its pages of the padding
                too. Needs ``seqlens``.
            causal, window_size: as in :func:`leanattn.decode`, over global positions; a
                bounded window (or ``causal=False`` with q_len > 1) needs ``seqlens``.
            check: exchange and check the metadata (see above).
        """
        positions = Positions(seqlens, page_size, cache_leftpad, causal, window_size)
        if not check:
            if self._checked is None:
                raise RuntimeError("plan(check=False) needs an earlier checked plan of the same shapes")
            if positions.active and not isinstance(seqlens, torch.Tensor):
                raise ValueError("plan(check=False) of a plan with page_size needs seqlens, as checked")
            given = local_seqlens if local_seqlens is not None else seqlens
            n = given.shape[0] if isinstance(given, torch.Tensor) else batch
            if (n, q_len) != self._checked[:2]:
                raise ValueError(f"plan(check=False) must keep the checked (batch, q_len) {self._checked[:2]}, "
                                 f"got {(n, q_len)}")
            if positions.fields() != self._checked[2]:
                raise ValueError("plan(check=False) must keep the checked (page_size, cache_leftpad given, causal, "
                                 f"window_size) {self._checked[2]}, got {positions.fields()}")
            batch = n
        else:
            error, batch = self._local_error(local_seqlens, capacity, batch, q_len, block_table, positions)
            self._exchange_metadata(error, batch, q_len, positions)
        key = (batch, q_len)
        if key not in self._buffers:  # a checked plan's (check=False keeps the checked key)
            self._buffers[key] = self._allocate(batch, q_len)
        if check:  # only once the buffers exist: a failed allocation leaves the last check
            self._checked = (batch, q_len, positions.fields())
        buf = self._buffers[key]
        if not positions.active:
            self._wrapper.plan(local_seqlens, capacity, batch=batch)
        else:
            left, right, _, _ = window_bounds(causal, window_size, q_len)
            end, start, bounds = key_bounds(seqlens, cache_leftpad, self.world_size, self.rank, page_size, q_len,
                                             left, right)
            buf.local_end.copy_(end)
            buf.local_start.copy_(start)
            buf.bounds.copy_(bounds)
            # The bounds replace the window's rows (causal=False, no window: no mask of its own).
            self._wrapper._plan_bounded(buf.local_end, capacity, batch=batch, cache_leftpad=buf.local_start,
                                        q_len=q_len, causal=False, window_size=(-1, -1), check=False,
                                        bounds=buf.bounds)
        self._planned = (batch, q_len, block_table, buf)

    def _exchange_metadata(self, error: str | None, batch: int, q_len: int, positions: Positions) -> None:
        """All-gather every rank's metadata and raise the same ValueError everywhere on a mismatch
        or on any rank's own error (after the exchange, so no rank is left waiting in it)."""
        scale_bits = struct.unpack("<q", struct.pack("<d", self.softmax_scale))[0]
        fields = positions.fields() if error is None else (0, 0, 0, 0, 0)  # may not be ints when bad
        mine = [_MAGIC, self.world_size, batch, q_len, self.q_heads, self.kv_heads, self.head_dim,
                _DTYPE_CODES.get(self.dtype, 0), int(self.scatter_heads), scale_bits, *fields,
                EXCHANGES.index(self.exchange), int(error is not None)]
        meta = torch.tensor(mine, dtype=torch.int64, device=self.device)
        gathered = torch.empty(self.world_size, len(mine), dtype=torch.int64, device=self.device)
        all_gather(gathered, meta, self.group)
        rows = gathered.tolist()  # the one host sync, once per checked plan
        if error is not None:
            raise ValueError(f"ContextParallelDecode.plan on rank {self.rank}: {error}")
        bad = [r for r, row in enumerate(rows) if row[-1]]
        if bad:
            raise ValueError(f"ContextParallelDecode.plan: rank(s) {bad} rejected their own arguments (see their errors)")
        differ = [i for i in range(len(_FIELDS)) if len({row[i] for row in rows}) > 1]
        if differ:
            table = "; ".join(f"{_FIELDS[i]}: " + ", ".join(f"rank {r}={row[i]}" for r, row in enumerate(rows)) for i in differ)
            raise ValueError(f"ContextParallelDecode.plan: the ranks disagree on {table}")

    def _allocate(self, batch: int, q_len: int) -> Buffers:
        """One (batch, q_len)'s buffers; with ``exchange="symmetric"`` a collective, which every
        rank leaves with the buffers or with an error (never one rank alone)."""
        error: Exception | None = None
        try:
            buf = self._local_buffers(batch, q_len)
        except Exception as e:  # noqa: BLE001  (raised below; with agree, on every rank)
            error = e
        if self.exchange == "symmetric":
            _symmetric.agree(error, self.group, self.device, "allocating the exchange's local buffers")
            buf.symmetric = _symmetric.allocate(self.group, self.device, self.world_size, batch, q_len,
                                                self.heads_out, self.head_dim, self.dtype)
        elif error is not None:
            raise error
        return buf

    def _local_buffers(self, batch: int, q_len: int) -> Buffers:
        w, h, d, dt = self.world_size, self.q_heads, self.head_dim, self.dtype
        kw = dict(dtype=torch.float32, device=self.device)
        ints = dict(dtype=torch.int32, device=self.device)
        positions = (torch.zeros(batch, **ints), torch.zeros(batch, **ints), torch.zeros(batch, q_len, 2, **ints))
        if not self.scatter_heads:
            shape_o, shape_l = (batch, q_len, h, d), (batch, h, q_len)
            words = padded_words(math.prod(shape_o), dt) + padded_words(math.prod(shape_l), torch.float32)
            send = torch.zeros(words, **kw)
            recv = torch.zeros(w, words, **kw)
            o_send, lse_send = pack_views(send, 1, words, shape_o, shape_l, dt)
            o_parts, lse_parts = pack_views(recv, w, words, shape_o, shape_l, dt)
            return Buffers(send, recv, o_send[0], lse_send[0], o_parts, lse_parts, None,
                            torch.empty(shape_l, **kw), *positions)
        # Scattered: the send buffer is W records, record p holding the heads rank p merges.
        hc = h // w
        shape_o, shape_l = (batch, q_len, hc, d), (batch, hc, q_len)
        words = padded_words(math.prod(shape_o), dt) + padded_words(math.prod(shape_l), torch.float32)
        send = torch.zeros(w * words, **kw)
        recv = torch.zeros(w, words, **kw)
        o_send, lse_send = pack_views(send, w, words, shape_o, shape_l, dt)
        o_parts, lse_parts = pack_views(recv, w, words, shape_o, shape_l, dt)
        staging = torch.empty(batch, q_len, h, d, dtype=dt, device=self.device)
        return Buffers(send, recv, o_send, lse_send, o_parts, lse_parts, staging, torch.empty(shape_l, **kw),
                        *positions)

    # -- run ------------------------------------------------------------------------------------

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        return_lse: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Context-parallel decode of one layer with the planned lengths.

        Args:
            q: (batch, q_len, q_heads, head_dim), the same on every rank.
            k_cache, v_cache: this rank's slice, (batch, cache_len, kv_heads, head_dim), or pages
                (num_pages, page_size, kv_heads, head_dim) when a block table was planned.
            return_lse: also return the merged LSE, float32 (batch, heads, q_len).
            out: optional (batch, q_len, heads, head_dim) tensor to write into.

        Returns:
            (batch, q_len, heads, head_dim) in q's dtype, where heads is q_heads, or
            q_heads / world_size (this rank's heads) with ``scatter_heads``; and the LSE.
        """
        if self._planned is None:
            raise RuntimeError("call plan() on every rank before run()")
        batch, q_len, _, buf = self._planned
        want = (batch, q_len, self.q_heads, self.head_dim)
        if tuple(q.shape) != want or q.dtype != self.dtype or q.device != self.device:
            # Only this rank can see this; the plan's check covered what the ranks share.
            raise ValueError(f"q must be {self.dtype} {want} on {self.device} as planned, "
                             f"got {q.dtype} {tuple(q.shape)} on {q.device}")
        if k_cache.dim() != 4 or tuple(k_cache.shape[2:]) != (self.kv_heads, self.head_dim):
            raise ValueError(f"k_cache must be (..., ..., kv_heads={self.kv_heads}, head_dim={self.head_dim}), "
                             f"got {tuple(k_cache.shape)}")
        out_shape = (batch, q_len, self.heads_out, self.head_dim)
        if out is None:
            out = torch.empty(out_shape, dtype=self.dtype, device=self.device)
        elif (tuple(out.shape) != out_shape or out.dtype != self.dtype or out.device != self.device
              or out.stride(-1) != 1):
            raise ValueError(f"out must be {self.dtype} {out_shape} on {self.device} with a unit last stride, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}, strides {out.stride()}")
        if return_lse:
            lse_out = torch.empty(batch, self.heads_out, q_len, dtype=torch.float32, device=self.device)
        else:
            lse_out = buf.lse_scratch

        self.merge(self.attend(q, k_cache, v_cache), out, lse_out)
        return (out, lse_out) if return_lse else out

    @property
    def planned(self) -> tuple:
        """(batch, q_len, block_table, buffers) of the last plan: the collective buffers ``run``
        exchanges (for benchmarks of other exchanges)."""
        if self._planned is None:
            raise RuntimeError("call plan() on every rank first")
        return self._planned

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """The first half of :meth:`run`, unchecked (benchmarks time it apart): the local decode,
        its output (and, replicated, its LSE) written where the exchange reads it. Returns the
        local LSE (batch, q_heads, q_len)."""
        _, _, block_table, buf = self._planned
        replicated = buf.staging is None
        local_out = buf.o_send if replicated else buf.staging
        _, lse = self._wrapper.run(q, k_cache, v_cache, block_table=block_table, out=local_out, return_lse=True,
                                   lse=buf.lse_send if replicated else None)
        return lse

    def merge(self, lse: torch.Tensor, out: torch.Tensor, lse_out: torch.Tensor) -> None:
        """The second half of :meth:`run`, unchecked: exchange the local partial that
        :meth:`attend` packed and merge the W partials into ``out``, ``lse_out``."""
        buf, w = self._planned[-1], self.world_size
        if buf.symmetric is not None:
            src = buf.o_send if buf.staging is None else buf.staging
            _symmetric.push_merge(buf.symmetric, self.rank, src, lse, out, lse_out, scatter=buf.staging is not None)
            return
        if buf.staging is None:
            all_gather(buf.recv, buf.send, self.group)  # the run wrote O and the LSE into send
        else:
            hc = self.heads_out
            # Record p of the send buffer gets heads [p * hc, (p + 1) * hc).
            buf.o_send.copy_(buf.staging.unflatten(2, (w, hc)).permute(2, 0, 1, 3, 4))
            buf.lse_send.copy_(lse.unflatten(1, (w, hc)).transpose(0, 1))
            dist.all_to_all_single(buf.recv.view(-1), buf.send, group=self.group)
        merge_states_into(buf.o_parts, buf.lse_parts, out, lse_out, check=False)


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    local_seqlens: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    block_table: torch.Tensor | None = None,
    seqlens: torch.Tensor | None = None,
    page_size: int | None = None,
    cache_leftpad: torch.Tensor | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    softmax_scale: float | None = None,
    return_lse: bool = False,
    scatter_heads: bool = False,
    num_programs: int | None = None,
    exchange: str = "all_gather",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One-shot context-parallel decode: plan and run in one call (a collective; every rank of
    ``group`` calls it). Shapes and arguments as in :class:`ContextParallelDecode` and its
    ``plan`` (q_len > 1, ``cache_leftpad`` and windows need ``seqlens`` and ``page_size``
    instead of ``local_seqlens``); for many layers or CUDA graphs build one and call ``plan``
    once per step and ``run`` per layer instead."""
    cp = ContextParallelDecode(group, q.shape[2], k_cache.shape[2], q.shape[3], q.dtype, q.device,
                               scatter_heads=scatter_heads, softmax_scale=softmax_scale, num_programs=num_programs,
                               exchange=exchange)
    capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    cp.plan(local_seqlens, capacity, batch=q.shape[0], q_len=q.shape[1], block_table=block_table, seqlens=seqlens,
            page_size=page_size, cache_leftpad=cache_leftpad, causal=causal, window_size=window_size)
    result = cp.run(q, k_cache, v_cache, return_lse=return_lse)
    if exchange == "symmetric" and q.device.type == "cuda":
        # The exchange's buffers go with cp, and torch does not promise that freeing symmetric
        # memory waits for the kernel that uses it: wait here (a one-shot call syncs anyway).
        torch.cuda.current_stream(q.device).synchronize()
    return result
