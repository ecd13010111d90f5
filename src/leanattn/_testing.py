"""The internals that tests and tools reach, gathered in one place. Not API: names here may change
with any release; everything a user needs is in ``leanattn``."""

from ._call import _DECODE_CALLS as DECODE_CALLS, ARRIVE_CHUNK
from .api import _KNOWN as DECODE_KNOWN
from ._checks import check_head_strides, check_page_strides
from ._features import window_bounds
from ._launch import DIRECT_LAUNCH_ERROR
from ._plan import launch_plan
from .mla import _KNOWN as MLA_KNOWN
from ._mla_call import _MLA_CALLS as MLA_CALLS, blocks_of, gluon_serves, heuristic as mla_heuristic, \
    tma_view as mla_tma_view
from ._workspace import WORKSPACES, Workspace, workspace_for
from .distributed._layout import key_bounds
from .kernels.interpreter import MIN_INTERPRETER_TRITON, triton_version
from .kernels.lean_decode import lean_decode_kernel, lean_merge_kernel
from .kernels.plan import BLOCK_B, PLAN_FIELDS, _live_range as live_range, _plan_row as plan_row
from .kernels.plan import ZERO_BLOCK, _share_of as share_of, lean_plan_kernel

__all__ = ["ARRIVE_CHUNK", "DECODE_CALLS", "DECODE_KNOWN", "wrapper_calls", "BLOCK_B", "DIRECT_LAUNCH_ERROR", "MIN_INTERPRETER_TRITON", "MLA_CALLS", "MLA_KNOWN", "PLAN_FIELDS", "WORKSPACES", "check_head_strides", "check_page_strides", "Workspace", "blocks_of", "gluon_serves", "mla_heuristic", "mla_tma_view",
           "launch_plan",
           "lean_decode_kernel", "lean_merge_kernel", "lean_plan_kernel", "live_range", "plan_row", "share_of", "triton_version",
           "key_bounds", "window_bounds", "workspace_for", "ZERO_BLOCK"]


def wrapper_calls(wrapper) -> list:
    """The kernel calls (``_call.Call``) a ``DecodeWrapper`` has built, one per call key."""
    return list(wrapper._calls.values())
