"""LeanAttention: exact decode attention with a stream-K partition, in Triton."""

from . import ops as _ops  # noqa: F401  (registers torch.ops.leanattn.decode_into)
from . import reference, schedule
from .api import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, decode

__all__ = ["decode", "reference", "schedule", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS"]
__version__ = "0.1.0"
