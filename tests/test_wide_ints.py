"""Kernels compile when an int argument is past 32 bits (a GPU launch then types it i64: e.g. the
capacity of a block table of 2**23 pages of 256 tokens). The interpreter never types ints, so
``_wide_ints.py`` compiles the kernels' front end for sm_90, which needs no GPU (the Gluon
kernel's only with a Triton it is written for: 3.6, the GPU tests')."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_kernels_compile_with_64_bit_int_arguments():
    path = [str(TESTS.parent / "src"), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run([sys.executable, str(TESTS / "_wide_ints.py")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("0 failed"), done.stdout + done.stderr[-3000:]
