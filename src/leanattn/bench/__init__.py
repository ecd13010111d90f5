"""``leanattn bench``: leanattn against its peers, same process, same inputs."""

from .run import run_suite
from .shapes import Shape, default_suite, parse_shape

__all__ = ["Shape", "default_suite", "parse_shape", "run_suite"]
