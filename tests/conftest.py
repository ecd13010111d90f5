"""Run the Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before Triton decorates the kernels, hence here, before any test
module imports leanattn.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
