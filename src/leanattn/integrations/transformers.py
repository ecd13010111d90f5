"""``attn_implementation="leanattn"`` for Hugging Face transformers.

``import leanattn.integrations.transformers`` registers the name with transformers'
``AttentionInterface`` (and the SDPA mask builder under the same name with
``AttentionMaskInterface``), so ``from_pretrained(..., attn_implementation="leanattn")`` and
``model.set_attn_implementation("leanattn")`` work; ``"leanattn_batch_invariant"`` runs the
decode steps in batch-invariant mode (``register`` names other split sizes).

DeepSeek-V3 models (``DeepseekV3Attention``) run their decode steps on
``leanattn.mla_decode`` over the latent cache instead (``transformers_mla``). Other models' decode
steps run on leanattn: one query token per sequence, or up to ``MAX_QUERY_TOKENS``
(speculative decoding's verification, short prompts), reading the cache in place: transformers
keeps K/V as (batch, kv_heads, len, head_dim) and the kernel takes (batch, len, kv_heads,
head_dim) with any strides, so ``key.transpose(1, 2)`` is passed, no copy. The keys each
sequence may see are read off the attention mask on the device (first and last live position;
a model's sliding window applies per query token), never on the host, so the static-cache path
is free of host syncs and compiles without graph breaks. Eager steps plan a
:class:`leanattn.DecodeWrapper` once per mask and run it in every layer. Soft-capping (Gemma 2)
and attention sinks (gpt-oss's ``s_aux``) are passed to the kernel. Every other call (long
prefills, fp32, a head size or a feature the kernel lacks) goes to transformers' own
``sdpa_attention_forward`` unchanged, or, for a call with soft-capping or sinks, which SDPA
lacks, to the model's own eager attention.
"""

from __future__ import annotations

import collections
import sys
import weakref

import torch

try:
    from transformers import AttentionInterface
except ImportError as e:  # say how to get the tested range
    raise ImportError(f"{e}: leanattn.integrations.transformers needs transformers: pip install 'leanattn[transformers]'") from e
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import leanattn
from leanattn._checks import split_of
from leanattn.kernels.config import interpreting, next_pow2

__all__ = ["NAME", "NAME_BATCH_INVARIANT", "MAX_QUERY_TOKENS", "attention_forward", "decode_refusal", "mask_refusal",
           "live_range",
           "calls", "register"]

NAME = "leanattn"
# Decode steps in batch-invariant mode with the default split (``register`` makes others).
NAME_BATCH_INVARIANT = "leanattn_batch_invariant"


class Invariance(collections.namedtuple("Invariance", "batch_invariant split_size")):
    """A registered name's batch-invariant mode, as ``leanattn.decode`` takes it."""

    @property
    def kwargs(self) -> dict:
        return {"batch_invariant": True, "split_size": self.split_size} if self.batch_invariant else {}


_DEFAULT = Invariance(False, None)

# Score features the kernel lacks: such a call falls back to SDPA, which takes position biases.
_SCORE_FEATURES = ("position_bias", "sinks")
# Score features SDPA lacks (some transformers versions would ignore them): a call with one that
# the kernel can't take goes to the model's own eager attention, never to SDPA.
_SDPA_LACKS = ("softcap", "s_aux", "sinks")

# Query tokens per sequence a call may have and still run on leanattn: decode steps, speculative
# decoding's verification, short prompts. Longer calls are prefills, for SDPA.
MAX_QUERY_TOKENS = 16

# Eager calls by path: "leanattn", or "sdpa: <reason>". For tests and for a user asking "did my
# decode steps run on leanattn?". Not counted while torch.compile traces (a trace is not a call).
calls: collections.Counter[str] = collections.Counter()


def decode_refusal(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    kwargs: dict,
    module: torch.nn.Module | None = None,
) -> str | None:
    """Why leanattn can't take this call (a short reason), or ``None`` if it can.

    query (batch, q_heads, q_len, head_dim); key, value (batch, kv_heads, kv_len, head_dim);
    attention_mask None or (batch or 1, 1, q_len, kv_len). Decided from shapes, dtypes and
    Python values only: no tensor is read.
    """
    batch, q_heads, q_len, head_dim = query.shape
    if q_len < 1:
        return "empty query"
    if dropout:
        return "dropout"
    if query.dtype not in leanattn.SUPPORTED_DTYPES:
        return f"{query.dtype}: the kernel takes float16 and bfloat16"
    if key.dtype != query.dtype or value.dtype != query.dtype:
        return "query, key and value dtypes differ"
    if head_dim not in leanattn.SUPPORTED_HEAD_DIMS or key.shape[-1] != head_dim or value.shape[-1] != head_dim:
        return f"head_dim {head_dim}/{key.shape[-1]}/{value.shape[-1]}: the kernel takes {leanattn.SUPPORTED_HEAD_DIMS}"
    kv_heads = key.shape[1]
    if key.shape[0] != batch or value.shape[:3] != key.shape[:3] or kv_heads == 0 or q_heads % kv_heads:
        return "key/value shapes don't match the query"
    rows, most = q_len * (q_heads // kv_heads), leanattn.max_query_rows(head_dim)
    if q_len > MAX_QUERY_TOKENS or (q_len > 1 and rows > most):
        return "prefill"
    if rows > most:
        return f"{rows} query rows a kv head: the kernel takes {most} at head_dim {head_dim}"
    if q_len > 1:
        causal = kwargs.get("is_causal")
        if not (causal if causal is not None else getattr(module, "is_causal", True)):
            return "not causal"
        if getattr(getattr(module, "config", None), "attention_chunk_size", None):
            return "chunked attention"  # per-chunk masks: no start and end per sequence
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        return "query, key or value without a unit last stride"
    if query.device.type != "cuda" and not interpreting():
        return f"tensors on {query.device.type}"
    for name in _SCORE_FEATURES:
        if kwargs.get(name) is not None:
            return name
    if kwargs.get("cache") is not None:  # continuous batching's paged cache updates K/V in SDPA's path
        return "paged cache"
    if kwargs.get("output_attentions"):
        return "output_attentions"
    return mask_refusal(attention_mask, batch, q_len, key.shape[2])


def mask_refusal(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int) -> str | None:
    """Why ``live_range`` can't read this mask (a short reason), or None: it takes None or a bool
    (batch or 1, 1, q_len, kv_len) tensor."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool:
        return "attention mask is not a boolean tensor"
    shape = attention_mask.shape
    if len(shape) != 4 or shape[0] not in (1, batch) or shape[1] != 1 or shape[2] != q_len or shape[3] != kv_len:
        return f"attention mask of shape {tuple(shape)}"
    return None


def live_range(
    attention_mask: torch.Tensor, batch: int, window_left: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sequence's live keys, from a (batch or 1, 1, q_len, kv_len) bool mask.

    The kernel lets query row i (of q_len) of sequence b see keys [lo, hi): hi = end - (q_len -
    1 - i), lo = max(start, hi - 1 - window_left) (start without a window), bottom-right causal.
    ``start`` and ``end`` are the first and one-past-last key any row sees (a sequence with no
    key gets start == end == 0). Returns them as int32 (batch,) (the kernel's
    ``cache_leftpad`` and ``cache_seqlens``) and bool (batch,) ``bad``: sequences whose mask is
    not the kernel's (padding inside a sequence, say). All on the mask's device, with no host
    sync.
    """
    rows = attention_mask[:, 0].expand(batch, -1, -1)  # (batch, q_len, kv_len)
    q_len, kv_len = rows.shape[-2:]
    live = rows.any(1)
    pos = torch.arange(1, kv_len + 1, dtype=torch.int32, device=rows.device)
    end = (pos * live).amax(-1)  # last live index + 1; 0 when none
    start = kv_len - ((kv_len + 1 - pos) * live).amax(-1)  # first live index; kv_len when none
    start = torch.minimum(start, end)
    hi = end[:, None] - torch.arange(q_len - 1, -1, -1, dtype=torch.int32, device=rows.device)
    lo = start[:, None].expand_as(hi)
    if window_left >= 0:
        lo = torch.maximum(lo, hi - 1 - window_left)
    key = pos - 1
    seen = (key >= lo[..., None]) & (key < hi[..., None])
    bad = (seen != rows).flatten(1).any(-1)
    return start.to(torch.int32), end.to(torch.int32), bad


# Eager decode steps plan once per step. A forward pass hands every layer of a kind the same
# mask tensor (one for full attention, one per sliding window), so the first layer that sees a
# mask computes its live range and plans a DecodeWrapper; the others only run it, which costs
# the host about half of a one-shot ``leanattn.decode``. Entries are keyed by the mask object
# (checked through a weak reference and its version counter; see _version for inference
# tensors) and the call's shapes. Entries whose
# mask is gone (last step's), then the least recently used, give their wrappers back to a pool,
# so a model keeps about one wrapper per mask kind.
_MAX_PLANS = 8
_MAX_SPARE = 2  # wrappers kept per kind beyond the planned ones


def _version(mask: torch.Tensor | None) -> int | None:
    """The mask's version counter; -1 for None and for an inference tensor this integration's mask
    function made (made for one forward pass: nothing changes it); None for another inference
    tensor, which has no counter: its caller may change it in place between steps unseen, so a
    plan for it is never reused (every layer plans)."""
    if mask is None:
        return -1
    if not torch.is_inference(mask):
        return mask._version
    return -1 if hasattr(mask, _MARK) else None


class _Plan:
    __slots__ = ("mask", "version", "wrapper", "poison")

    def __init__(self, mask: torch.Tensor | None, wrapper: leanattn.DecodeWrapper, poison: torch.Tensor | None):
        self.mask = None if mask is None else weakref.ref(mask)
        self.version = _version(mask)
        self.wrapper, self.poison = wrapper, poison

    def fits(self, mask: torch.Tensor | None) -> bool:
        if mask is None:
            return self.mask is None
        return (self.mask is not None and self.mask() is mask and self.version is not None
                and self.version == _version(mask))

    def stale(self) -> bool:
        """Planned for a mask that no longer exists."""
        return self.mask is not None and self.mask() is None


_plans: collections.OrderedDict[tuple, _Plan] = collections.OrderedDict()
_spare: dict[tuple, list[leanattn.DecodeWrapper]] = collections.defaultdict(list)


def _planned(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
    window_left: int, invariant: Invariance,
) -> tuple[leanattn.DecodeWrapper, torch.Tensor | None]:
    """A DecodeWrapper planned for this step's mask and shapes, and the query's poison factor
    (see ``_lengths``; None without a mask). query (batch, q_heads, q_len, head_dim); key
    (batch, kv_heads, kv_len, head_dim)."""
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    # Wrappers serve q_len up to a power of two (their workspace grows with it).
    most = next_pow2(q_len)
    kind = (q_heads, kv_heads, head_dim, query.dtype, key.dtype, query.device, scaling, most, invariant)
    slot = (kind, q_len, batch, kv_len, window_left, id(attention_mask))
    plan = _plans.get(slot)
    if plan is not None and plan.fits(attention_mask):
        _plans.move_to_end(slot)
        return plan.wrapper, plan.poison
    for old_slot in [other for other, entry in _plans.items() if other == slot or entry.stale()]:
        _give_back(old_slot[0], _plans.pop(old_slot).wrapper)
    while len(_plans) >= _MAX_PLANS:
        (old_kind, *_), old = _plans.popitem(last=False)
        _give_back(old_kind, old.wrapper)
    wrapper = _spare[kind].pop() if _spare[kind] else leanattn.DecodeWrapper(
        q_heads, kv_heads, head_dim, query.dtype, query.device, kv_dtype=key.dtype, max_q_len=most,
        softmax_scale=scaling, **invariant.kwargs)
    leftpad, seqlens, poison = _lengths(attention_mask, batch, q_len, window_left, query.dtype, query.device)
    _reserve_decode_workspace(query, key, q_len, invariant)  # for steps of this shape captured later
    wrapper.plan(seqlens, kv_len, batch=batch, cache_leftpad=leftpad, q_len=q_len, window_size=(window_left, 0))
    _plans[slot] = _Plan(attention_mask, wrapper, poison)
    return wrapper, poison


def _give_back(kind: tuple, wrapper: leanattn.DecodeWrapper) -> None:
    if len(_spare[kind]) < _MAX_SPARE:
        _spare[kind].append(wrapper)


def _lengths(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, window_left: int, dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The kernel's (cache_leftpad, cache_seqlens) for a call's mask, and the query's ``poison``
    factor (batch, 1, 1, 1) in the query's ``dtype``: 1, or NaN for a sequence the kernel can't
    express (which gets the whole cache). Without a mask (no poison), transformers means SDPA's
    ``is_causal``, aligned top-left: one query token sees every key, several see the keys before
    them (the first q_len: the rest of a static cache is empty)."""
    if attention_mask is not None:
        start, end, bad = live_range(attention_mask, batch, window_left)
        # A sequence the kernel can't express sees the whole cache, so that every one of its
        # rows reads at least one key with the NaN query attention_forward gives it.
        poison = torch.where(bad, float("nan"), 1.0).to(dtype).view(-1, 1, 1, 1)
        return torch.where(bad, 0, start), torch.where(bad, attention_mask.shape[-1], end), poison
    if q_len == 1:
        return None, None, None
    return None, torch.full((batch,), q_len, dtype=torch.int32, device=device), None


# Compiled steps compute the live range, and plan the shares, once per step too. The
# integration's mask function marks each mask it makes with an empty ``_leanattn_lengths``
# attribute; the first layer that meets the mask stores its lengths and plan there and the other
# layers of its kind take them, so the traced graph holds one live-range computation and one plan
# per mask instead of one per layer (torch.compile does not merge identical ops of an inference
# graph), and each layer's kernel reads its share instead of locating it. A mask made elsewhere (a
# 4-D mask passed by the caller, which it may change in place between steps) carries no mark and
# is read by every layer, whose kernels then locate their own shares.
_MARK = "_leanattn_lengths"


def _mask(*args, **kwargs) -> torch.Tensor | None:
    """transformers' SDPA mask, marked as made for one forward pass."""
    mask = sdpa_mask(*args, **kwargs)
    if isinstance(mask, torch.Tensor):
        setattr(mask, _MARK, None)
    return mask


def _step_plan(
    attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, window_left: int,
    invariant: Invariance,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``_lengths`` and a ``leanattn.plan_decode`` plan for them (None for an unmarked mask),
    computed once per marked mask and call shape. query (batch, q_heads, q_len, head_dim); key
    (batch, kv_heads, kv_len, head_dim)."""
    batch, q_heads, q_len, head_dim = query.shape
    if attention_mask is None or not hasattr(attention_mask, _MARK):
        return *_lengths(attention_mask, batch, q_len, window_left, query.dtype, query.device), None
    kv_heads, kv_len = key.shape[1], key.shape[2]
    shape = (batch, q_len, window_left, query.dtype, q_heads, kv_heads, head_dim, key.dtype, kv_len, invariant)
    memo = getattr(attention_mask, _MARK)
    if memo is None or memo[0] != shape:
        leftpad, seqlens, poison = _lengths(attention_mask, batch, q_len, window_left, query.dtype, query.device)
        plan = leanattn.plan_decode(seqlens, kv_len, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                                    kv_dtype=key.dtype, batch=batch, cache_leftpad=leftpad, q_len=q_len,
                                    window_size=(window_left, 0), device=query.device, **invariant.kwargs)
        memo = (shape, (leftpad, seqlens, poison, plan))
        setattr(attention_mask, _MARK, memo)
    return memo[1]


_reserved: set[tuple] = set()


def _reserve_decode_workspace(query: torch.Tensor, key: torch.Tensor, q_len: int, invariant: Invariance) -> None:
    """Allocate the workspace steps of ``q_len`` query tokens will use, from an eager call (a
    prefill, an eager step), so a step captured in a CUDA graph by hand never needs to allocate
    it (torch.compile's CUDA graphs need no reservation: they run each new graph eagerly first).
    Batch-invariant steps need one for this batch and cache length."""
    if not query.is_cuda or query.dtype not in leanattn.SUPPORTED_DTYPES or torch.cuda.is_current_stream_capturing():
        return
    q_heads, head_dim, kv_heads = query.shape[1], query.shape[-1], key.shape[1]
    sized = dict(batch=query.shape[0], capacity=key.shape[2]) if invariant.batch_invariant else {}
    kind = (query.device, q_heads, kv_heads, head_dim, key.dtype, q_len, invariant, *sized.values())
    if kind in _reserved or head_dim not in leanattn.SUPPORTED_HEAD_DIMS or kv_heads == 0 or q_heads % kv_heads:
        return
    if q_len * (q_heads // kv_heads) > leanattn.max_query_rows(head_dim):  # steps the kernel refuses
        return
    leanattn.reserve_workspace(query.device, q_heads, kv_heads, head_dim, key.dtype, q_len=q_len,
                               **invariant.kwargs, **sized)
    _reserved.add(kind)


def _count(path: str) -> None:
    if not torch.compiler.is_compiling():
        calls[path] += 1


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract.

    query (batch, q_heads, q_len, head_dim); key, value (batch, kv_heads, kv_len, head_dim), the
    cache itself after its update; attention_mask None (every key is live) or a bool
    (batch, 1, q_len, kv_len) mask from ``sdpa_mask``. Returns (batch, q_len, q_heads, head_dim)
    and no attention weights.
    """
    return _forward(_DEFAULT, module, query, key, value, attention_mask, dropout, scaling, kwargs)


def _forward(
    invariant: Invariance, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float, scaling: float | None, kwargs: dict,
) -> tuple[torch.Tensor, None]:
    """:func:`attention_forward`, with leanattn's decode steps in ``invariant``'s mode."""
    reason = decode_refusal(query, key, value, attention_mask, dropout, kwargs, module)
    if reason == "prefill" and not torch.compiler.is_compiling():
        _reserve_decode_workspace(query, key, 1, invariant)  # for one-token steps captured later
    if reason is not None:
        lacking = [name for name in _SDPA_LACKS if kwargs.get(name) is not None]
        if lacking:
            eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
            if eager is None:
                raise NotImplementedError(
                    f"{type(module).__name__} asks for {', '.join(lacking)}, which SDPA does not compute, and its "
                    "module has no eager_attention_forward to fall back to; use attn_implementation='eager'"
                )
            _count(f"eager: {reason}")
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
                # The mask built for this name is SDPA's boolean one; eager attention adds its mask.
                attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                    ~attention_mask, torch.finfo(query.dtype).min)
            return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        _count(f"sdpa: {reason}")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    _count(NAME)
    # (B, Hq, T, D) -> (B, T, Hq, D) and (B, Hkv, N, D) -> (B, N, Hkv, D): views, no copies. Left
    # padding shows in the mask as a row's first live key, and so does a sliding window when
    # there is one query token; several query tokens each see their own window (transformers'
    # ``sliding_window`` W keeps keys after q - W: flash-attn's left window W - 1).
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    window_left = int(kwargs.get("sliding_window") or 0) - 1 if query.shape[2] > 1 else -1
    if torch.compiler.is_compiling() or (query.is_cuda and torch.cuda.is_current_stream_capturing()):
        # Traced or captured: the custom ops, which keep no state (the step's plan is a tensor).
        leftpad, seqlens, poison, plan = _step_plan(attention_mask, query, key, window_left, invariant)
        wrapper = None
    else:
        wrapper, poison = _planned(query, key, attention_mask, scaling, window_left, invariant)
    if poison is not None:
        # A sequence whose mask the kernel can't express (padding inside it, another mask
        # shape) has no exact answer here: a NaN query turns its rows to NaN rather than to a
        # plausible wrong value, without a host sync. On the query, not the output, so that a
        # compiled step fuses it into the kernel that makes the query (rotary embedding); a
        # product (q x 1 is exact), one kernel, where masked_fill copies and then fills.
        q = q * poison
    softcap = float(kwargs.get("softcap") or 0.0)
    sinks = kwargs.get("s_aux")
    sinks = None if sinks is None else sinks.float().contiguous()  # the kernel reads a packed vector
    if wrapper is None:
        out = leanattn.decode(q, k, v, seqlens, cache_leftpad=leftpad, softmax_scale=scaling,
                              window_size=(window_left, 0), softcap=softcap, sinks=sinks, plan=plan,
                              **invariant.kwargs)
    else:
        out = wrapper.run(q, k, v, softcap=softcap, sinks=sinks)
    return out, None


def register(name: str, *, batch_invariant: bool = False, split_size: int | None = None) -> None:
    """Register leanattn under another ``attn_implementation`` name, its decode steps in
    batch-invariant mode with ``split_size`` tokens per split (see ``leanattn.decode``); e.g.
    ``register("leanattn_split_2048", batch_invariant=True, split_size=2048)``. Prefills and
    other calls leanattn doesn't take go to SDPA, as with ``"leanattn"``, and are not batch
    invariant."""
    invariant = Invariance(batch_invariant, split_size)
    if split_size is not None:
        split_of(batch_invariant, split_size, 1)  # the type and sign; each call checks it against its tile
    NAMES[name] = invariant

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        return _forward(invariant, module, query, key, value, attention_mask, dropout, scaling, kwargs)

    forward.__doc__ = attention_forward.__doc__
    AttentionInterface.register(name, forward if invariant != _DEFAULT else attention_forward)
    AttentionMaskInterface.register(name, _mask)


# Every registered name and its mode (DeepSeek-V3's latent attention reads it at each call).
NAMES: dict[str, Invariance] = {NAME: _DEFAULT}
AttentionInterface.register(NAME, attention_forward)
AttentionMaskInterface.register(NAME, _mask)
register(NAME_BATCH_INVARIANT, batch_invariant=True)

# DeepSeek-V3: decode steps on mla_decode (its module imports nothing from here).
from .transformers_mla import install as _install_mla  # noqa: E402

_install_mla(NAMES, _lengths, mask_refusal, _count)
