"""Model features of a call (window, softcap, sinks, fp8 scales), checked and resolved once."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import FP8_DTYPES, check_dense_vector, check_tensor, fail
from ._workspace import outside_graph_pools
from .kernels import lean_decode

LOG2E = lean_decode.LOG2E
# The kernel's scale kinds as plain ints, read once here: torch.compile traces this module, and
# Dynamo cannot call int() on a tl.constexpr.
SCALE_NONE, SCALE_HEAD, SCALE_SEQ, SCALE_TOKEN = (
    int(lean_decode.SCALE_NONE), int(lean_decode.SCALE_HEAD), int(lean_decode.SCALE_SEQ), int(lean_decode.SCALE_TOKEN))

# An unbounded window side, as an int the kernel compares with.
UNBOUNDED = 2**30


@dataclass(frozen=True)
class Features:
    """A call's model features, normalised for the kernel (see :func:`resolve_features`)."""

    q_len: int
    window_left: int  # keys before the query a row sees; UNBOUNDED when unbounded
    window_right: int  # keys after it; 0 when causal
    has_window: bool  # window_left bounded: tiles before every row's window are skipped
    has_mask: bool  # some row sees fewer than all live keys
    softcap: float  # 0: off
    has_sinks: bool
    k_scale_kind: int  # the kernel's K_SCALE_KIND: SCALE_NONE (fp16/bf16 cache) ... SCALE_TOKEN
    v_scale_kind: int

    @property
    def fp8(self) -> bool:
        """An fp8 cache: it has dequantisation scales (of any kind)."""
        return self.k_scale_kind != SCALE_NONE


def window_bounds(causal: bool, window_size: tuple[int, int], q_len: int) -> tuple[int, int, bool, bool]:
    """(window_left, window_right, has_window, has_mask) of :class:`Features` from the API's
    ``causal`` and ``window_size``."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and w >= -1 for w in window_size)):
        fail(ValueError, f"window_size must be (left, right), ints >= -1 (-1: unbounded), got {window_size!r}")
    left, right = window_size
    # A side of UNBOUNDED or more (INT_MAX is a common spelling of "unbounded") bounds nothing:
    # as -1, so that the kernel's int32 position arithmetic cannot overflow.
    left = UNBOUNDED if left < 0 or left > UNBOUNDED else left
    right = 0 if causal else (UNBOUNDED if right < 0 or right > UNBOUNDED else right)  # causal: flash-attn's right = 0
    # A row sees fewer than all live keys when the window cuts it, or when a later query's key
    # lies past its right bound.
    return left, right, left < UNBOUNDED, left < UNBOUNDED or q_len - 1 > right


def resolve_features(
    q: torch.Tensor, k_cache: torch.Tensor, causal: bool, window_size: tuple[int, int], softcap: float,
    sinks: torch.Tensor | None, k_scale: float | torch.Tensor | None, v_scale: float | torch.Tensor | None,
) -> tuple[Features, torch.Tensor | None, torch.Tensor | None]:
    """Check the model-feature arguments; return the features and the fp8 cache's
    dequantisation scales as given (None for fp16/bf16 caches): a float (default 1.0; the launch
    makes (kv_heads,) tensors of floats) or a float32 tensor of one of the kinds of
    :func:`scale_kind`."""
    q_len, q_heads = q.shape[1], q.shape[2]
    left, right, has_window, has_mask = window_bounds(causal, window_size, q_len)
    if not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        fail(ValueError, f"softcap must be a finite float >= 0 (0: off), got {softcap!r}")
    if sinks is not None:
        check_tensor("sinks", sinks)
        if sinks.dtype != torch.float32 or sinks.shape != (q_heads,) or sinks.device != q.device:
            fail(ValueError, f"sinks must be float32 ({q_heads},) on {q.device}, one logit per query head, "
                              f"got {sinks.dtype} {tuple(sinks.shape)} on {sinks.device}")
        check_dense_vector("sinks", sinks)
    fp8 = k_cache.dtype in FP8_DTYPES
    scales, kinds = [], []
    for name, x in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not fp8:
            if x is not None:
                fail(ValueError, f"{name} dequantises an fp8 cache; this cache is {k_cache.dtype}")
            continue
        x = 1.0 if x is None else x
        _check_scale(name, x, q, k_cache)
        scales.append(x)
        kinds.append(scale_kind(x))
    k_kind, v_kind = kinds or (SCALE_NONE, SCALE_NONE)
    features = Features(q_len, left, right, has_window, has_mask, float(softcap), sinks is not None, int(k_kind),
                        int(v_kind))
    return features, *(scales or (None, None))


def scale_kind(x: float | torch.Tensor) -> int:
    """The kind (the kernel's K_SCALE_KIND / V_SCALE_KIND) of a checked fp8 scale: SCALE_HEAD for a
    float or a (kv_heads,) tensor, SCALE_SEQ for (batch, kv_heads), SCALE_TOKEN for a tensor shaped
    like the cache without head_dim. Its number of dimensions decides, so a call key that holds
    the scales' shapes holds their kinds."""
    if not isinstance(x, torch.Tensor):
        return SCALE_HEAD
    return (SCALE_HEAD, SCALE_SEQ, SCALE_TOKEN)[x.dim() - 1]


def _check_scale(name: str, x: object, q: torch.Tensor, k_cache: torch.Tensor, cache_name: str = "k_cache") -> None:
    """``x`` is a finite float or a float32 scale tensor of one of ``scale_kind``'s kinds for the
    cache ``k_cache``, named ``cache_name`` in errors."""
    batch, kv_heads, device = q.shape[0], k_cache.shape[2], q.device
    tokens = tuple(k_cache.shape[:3])
    kinds = (f"a float, or a float32 tensor on {device} of shape ({kv_heads},) (per kv head), ({batch}, "
             f"{kv_heads}) (per sequence and kv head) or {tokens} (per token and kv head: {cache_name}'s shape "
             "without head_dim, indexed like its rows)")
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.float32 or x.device != device or x.shape not in ((kv_heads,), (batch, kv_heads), tokens):
            fail(ValueError, f"{name} must be {kinds}, got {x.dtype} {tuple(x.shape)} on {x.device}")
        check_dense_vector(name, x)
    elif isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        fail(ValueError, f"{name} must be {kinds}; a float must be finite, got {x!r}")


_SCALES: dict[tuple, torch.Tensor] = {}


def scale_tensor(x: float | torch.Tensor, kv_heads: int, device: torch.device) -> torch.Tensor:
    """A (kv_heads,) float32 tensor of dequantisation multipliers from a float or a tensor."""
    if isinstance(x, torch.Tensor):
        return x
    key = (float(x), kv_heads, device)
    if key not in _SCALES:  # kept: a CUDA graph may hold it
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"an fp8 scale of {float(x)} seen first inside a CUDA-graph capture: make the same "
                               "call once eagerly before capturing (or pass the scales as float32 tensors)")
        # Outside any graph's private pool (torch.compile's reduce-overhead warm-up routes the
        # thread's allocations there), as the workspace: it outlives the step.
        _SCALES[key] = outside_graph_pools(
            device, lambda: (torch.full((kv_heads,), float(x), dtype=torch.float32, device=device),))[0]
    return _SCALES[key]


def kernel_scale(softmax_scale: float, features: Features) -> float:
    """The kernel's ``scale``: natural units under softcap (it applies tanh first), else log2."""
    return softmax_scale if features.softcap > 0 else softmax_scale * LOG2E
