"""``leanattn bench``: leanattn against its peers, same process, same inputs."""

from .run import run_suite
from .shapes import SUITES, Shape, default_suite, parse_shape, suite

__all__ = ["SUITES", "Shape", "default_suite", "parse_shape", "run_suite", "suite"]
