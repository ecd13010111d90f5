"""Triton kernels. ``lean_decode`` holds the decode kernel, ``config`` its launch heuristics."""
