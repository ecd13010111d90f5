"""``attn_implementation="leanattn"`` for Hugging Face transformers.

``import leanattn.integrations.transformers`` registers the name with transformers'
``AttentionInterface`` (and the SDPA mask builder under the same name with
``AttentionMaskInterface``), so ``from_pretrained(..., attn_implementation="leanattn")`` and
``model.set_attn_implementation("leanattn")`` work.

Decode steps (one query token per sequence) run on :func:`leanattn.decode`, reading the cache in
place: transformers keeps K/V as (batch, kv_heads, len, head_dim) and the kernel takes
(batch, len, kv_heads, head_dim) with any strides, so ``key.transpose(1, 2)`` is passed, no copy.
The keys each row may see are read off the attention mask on the device (first and last live
position), never on the host, so the static-cache path is free of host syncs and compiles
without graph breaks. Soft-capping (Gemma 2) and attention sinks (gpt-oss's ``s_aux``) are
passed to the kernel. Every other call (prefill, several query tokens, fp32, a head size or a
feature the kernel lacks) goes to transformers' own ``sdpa_attention_forward`` unchanged, or, for
a call with soft-capping or sinks, which SDPA lacks, to the model's own eager attention.
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
from leanattn.kernels.config import interpreting

__all__ = ["NAME", "attention_forward", "decode_refusal", "live_range", "calls"]

NAME = "leanattn"

# Score features the kernel lacks: such a call falls back to SDPA, which takes position biases.
_SCORE_FEATURES = ("position_bias", "sinks")
# Score features SDPA lacks (some transformers versions would ignore them): a call with one that
# the kernel can't take goes to the model's own eager attention, never to SDPA.
_SDPA_LACKS = ("softcap", "s_aux", "sinks")

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
) -> str | None:
    """Why ``leanattn.decode`` can't take this call (a short reason), or ``None`` if it can.

    query (batch, q_heads, q_len, head_dim); key, value (batch, kv_heads, kv_len, head_dim);
    attention_mask None or (batch or 1, 1, q_len, kv_len). Decided from shapes, dtypes and
    Python values only: no tensor is read.
    """
    batch, q_heads, q_len, head_dim = query.shape
    if q_len != 1:
        return "prefill" if q_len > 1 else "empty query"
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
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool:
            return "attention mask is not a boolean tensor"
        shape = attention_mask.shape
        if len(shape) != 4 or shape[0] not in (1, batch) or shape[1] != 1 or shape[2] != 1 or shape[3] != key.shape[2]:
            return f"attention mask of shape {tuple(shape)}"
    return None


def live_range(attention_mask: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First and one-past-last attended key of each row, from a (batch or 1, 1, 1, kv_len) bool mask.

    Returns int32 (batch,) ``start`` and ``end`` (the kernel's ``cache_leftpad`` and
    ``cache_seqlens``; a row with no key gets start == end == 0) and bool (batch,) ``holes``: rows
    whose live keys are not one contiguous run, which the kernel can't express. All on the
    mask's device, with no host sync.
    """
    live = attention_mask[:, 0, 0, :].expand(batch, -1)
    kv_len = live.shape[-1]
    pos = torch.arange(1, kv_len + 1, dtype=torch.int32, device=live.device)
    end = (pos * live).amax(-1)  # last live index + 1; 0 when none
    start = kv_len - ((kv_len + 1 - pos) * live).amax(-1)  # first live index; kv_len when none
    start = torch.minimum(start, end)
    holes = live.sum(-1, dtype=torch.int32) != end - start
    return start.to(torch.int32), end.to(torch.int32), holes


# Eager decode steps plan once per step. A forward pass hands every layer of a kind the same
# mask tensor (one for full attention, one per sliding window), so the first layer that sees a
# mask computes its live range and plans a DecodeWrapper; the others only run it, which costs
# the host about half of a one-shot ``leanattn.decode``. Entries are keyed by the mask object
# (checked through a weak reference and its version counter) and the call's shapes. Entries whose
# mask is gone (last step's), then the least recently used, give their wrappers back to a pool,
# so a model keeps about one wrapper per mask kind.
_MAX_PLANS = 8


def _version(mask: torch.Tensor | None) -> int:
    """The mask's version counter (-1 for None, and for inference tensors, which have none)."""
    return -1 if mask is None or torch.is_inference(mask) else mask._version


class _Plan:
    __slots__ = ("mask", "version", "wrapper", "holes")

    def __init__(self, mask: torch.Tensor | None, wrapper: leanattn.DecodeWrapper, holes: torch.Tensor | None):
        self.mask = None if mask is None else weakref.ref(mask)
        self.version = _version(mask)
        self.wrapper, self.holes = wrapper, holes

    def fits(self, mask: torch.Tensor | None) -> bool:
        if mask is None:
            return self.mask is None
        return self.mask is not None and self.mask() is mask and self.version == _version(mask)

    def stale(self) -> bool:
        """Planned for a mask that no longer exists."""
        return self.mask is not None and self.mask() is None


_plans: collections.OrderedDict[tuple, _Plan] = collections.OrderedDict()
_spare: dict[tuple, list[leanattn.DecodeWrapper]] = collections.defaultdict(list)


def _planned(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
) -> tuple[leanattn.DecodeWrapper, torch.Tensor | None]:
    """A DecodeWrapper planned for this step's mask and shapes, and the rows with holes (or None).
    query (batch, q_heads, 1, head_dim); key (batch, kv_heads, kv_len, head_dim)."""
    batch, q_heads, _, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    kind = (q_heads, kv_heads, head_dim, query.dtype, key.dtype, query.device, scaling)
    slot = (kind, batch, kv_len, id(attention_mask))
    plan = _plans.get(slot)
    if plan is not None and plan.fits(attention_mask):
        _plans.move_to_end(slot)
        return plan.wrapper, plan.holes
    for old_slot in [other for other, entry in _plans.items() if other == slot or entry.stale()]:
        _spare[old_slot[0]].append(_plans.pop(old_slot).wrapper)
    while len(_plans) >= _MAX_PLANS:
        (old_kind, *_), old = _plans.popitem(last=False)
        _spare[old_kind].append(old.wrapper)
    wrapper = _spare[kind].pop() if _spare[kind] else leanattn.DecodeWrapper(
        q_heads, kv_heads, head_dim, query.dtype, query.device, kv_dtype=key.dtype, softmax_scale=scaling)
    holes = None
    if attention_mask is None:
        wrapper.plan(None, kv_len, batch=batch)
    else:
        start, end, holes = live_range(attention_mask, batch)
        wrapper.plan(end, kv_len, cache_leftpad=start)
    _plans[slot] = _Plan(attention_mask, wrapper, holes)
    return wrapper, holes


_reserved: set[tuple] = set()


def _reserve_decode_workspace(query: torch.Tensor, key: torch.Tensor) -> None:
    """Allocate the workspace compiled decode steps will use, from an eager call (a prefill, an
    eager decode step): torch.compile's CUDA graphs refuse one first allocated while they record."""
    if not query.is_cuda or query.dtype not in leanattn.SUPPORTED_DTYPES or torch.cuda.is_current_stream_capturing():
        return
    q_heads, head_dim, kv_heads = query.shape[1], query.shape[-1], key.shape[1]
    kind = (query.device, q_heads, kv_heads, head_dim, key.dtype)
    if kind in _reserved or head_dim not in leanattn.SUPPORTED_HEAD_DIMS or kv_heads == 0 or q_heads % kv_heads:
        return
    leanattn.reserve_workspace(query.device, q_heads, kv_heads, head_dim, key.dtype)
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
    reason = decode_refusal(query, key, value, attention_mask, dropout, kwargs)
    if reason in (None, "prefill") and not torch.compiler.is_compiling():
        _reserve_decode_workspace(query, key)
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
    # (B, Hq, 1, D) -> (B, 1, Hq, D) and (B, Hkv, N, D) -> (B, N, Hkv, D): views, no copies. Left
    # padding and sliding windows both show in the mask as a row's first live key.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    softcap = float(kwargs.get("softcap") or 0.0)
    sinks = kwargs.get("s_aux")
    sinks = None if sinks is None else sinks.float()
    if torch.compiler.is_compiling() or (query.is_cuda and torch.cuda.is_current_stream_capturing()):
        # Traced or captured: the one-shot custom op, which allocates nothing and keeps no state.
        seqlens = leftpad = holes = None
        if attention_mask is not None:
            leftpad, seqlens, holes = live_range(attention_mask, query.shape[0])
        out = leanattn.decode(q, k, v, seqlens, cache_leftpad=leftpad, softmax_scale=scaling, softcap=softcap,
                              sinks=sinks)
    else:
        wrapper, holes = _planned(query, key, attention_mask, scaling)
        out = wrapper.run(q, k, v, softcap=softcap, sinks=sinks)
    if holes is not None:
        # A row whose mask has gaps (padding inside the sequence) has no exact answer from the
        # kernel; it turns to NaN rather than to a plausible wrong value, without a host sync.
        out.masked_fill_(holes.view(-1, 1, 1, 1), float("nan"))
    return out, None


AttentionInterface.register(NAME, attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
