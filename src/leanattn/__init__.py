"""LeanAttention: exact decode attention with a stream-K partition, in Triton."""

import torch as _torch

from .kernels.interpreter import enable_cpu_mode as _enable_cpu_mode

# Without a GPU the same kernels run under Triton's interpreter; this must be decided before
# Triton decorates them.
if not _torch.cuda.is_available():
    _enable_cpu_mode()

from . import reference, schedule
from .api import (
    FP8_DTYPES, MAX_PAGE_SIZE, MAX_QUERY_ROWS, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, KernelConfig, choose_config,
    decode, default_num_programs, max_query_rows, plan_decode, reserve_workspace,
)
from .wrapper import DecodeWrapper
from .mla import MLAWrapper, mla_decode
from .merge import merge_states
from . import distributed  # noqa: E402  (needs merge_states, decode and DecodeWrapper)

__all__ = ["decode", "plan_decode", "DecodeWrapper", "reference", "schedule", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS"]
__all__ += ["merge_states", "distributed", "reserve_workspace", "KernelConfig", "choose_config", "default_num_programs",
            "FP8_DTYPES", "MAX_QUERY_ROWS", "max_query_rows", "MAX_PAGE_SIZE", "mla_decode", "MLAWrapper"]
__version__ = "0.1.0"
