"""LeanAttention: exact decode attention with a stream-K partition, in Triton."""

import os as _os

import torch as _torch

# Without a GPU the same kernel runs under Triton's interpreter; this must be decided before
# Triton decorates the kernels.
if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from . import ops as _ops  # noqa: F401  (registers torch.ops.leanattn.decode_into and plan_shares)
from . import reference, schedule
from .api import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, decode, plan_decode, reserve_workspace
from .wrapper import DecodeWrapper
from .merge import merge_states
from . import distributed  # noqa: E402  (needs merge_states, decode and DecodeWrapper)

__all__ = ["decode", "plan_decode", "DecodeWrapper", "reference", "schedule", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS"]
__all__ += ["merge_states", "distributed", "reserve_workspace"]
__version__ = "0.1.0"
