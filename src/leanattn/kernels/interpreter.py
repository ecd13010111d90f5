"""CPU mode: without a CUDA device, leanattn's kernels run under Triton's interpreter.

Triton picks interpreted or compiled functions when it decorates them, reading
``TRITON_INTERPRET`` then. ``import leanattn`` sets the variable before its own kernels are
decorated; but when Triton itself was imported first (by ``torch._dynamo``, ``transformers``
or the user), its standard library (``tl.zeros_like``, ``tl.max``, ``tl.cumsum``, ...) was
already decorated for the GPU, and an interpreted kernel cannot call it. On a machine with no GPU
those compiled functions can never run, so they are re-decorated for the interpreter.
"""

from __future__ import annotations

import os
import sys

__all__ = ["enable_cpu_mode", "interpreter_problem"]

_PROBLEM: str | None = None


def enable_cpu_mode() -> None:
    """Run kernels under the interpreter (no CUDA device): set ``TRITON_INTERPRET=1`` unless the
    environment says otherwise, and make Triton's already decorated library interpretable."""
    global _PROBLEM
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] in ("", "0") or "triton.language" not in sys.modules:
        return  # compiled mode asked for, or Triton not loaded yet: it will decorate for the interpreter
    try:
        _reinterpret_triton_library()
    except Exception as e:  # a Triton whose internals differ
        _PROBLEM = (
            "Triton was imported before leanattn without TRITON_INTERPRET=1, so its library was built "
            f"for a GPU and could not be switched to the interpreter ({e!r}). On a machine without a "
            "GPU, set TRITON_INTERPRET=1 in the environment before Python starts, or import leanattn "
            "before triton, torch._dynamo, torch._inductor or transformers"
        )


def _reinterpret_triton_library() -> None:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    import triton.language as tl

    made: dict[int, InterpretedFunction] = {}

    def convert(f: JITFunction) -> InterpretedFunction:
        # One replacement per function, so every name bound to it gets the same object.
        if id(f) not in made:
            made[id(f)] = InterpretedFunction(f.fn, do_not_specialize=f.do_not_specialize, noinline=f.noinline)
        return made[id(f)]

    namespaces = [vars(m) for name, m in list(sys.modules.items()) if name.startswith("triton.language") and m]
    for ns in namespaces:
        for name, value in list(ns.items()):
            if isinstance(value, JITFunction):
                ns[name] = convert(value)
    for name, value in list(vars(tl.core.tensor).items()):  # tensor methods: x.max(), x.to(...)
        if isinstance(value, JITFunction):
            setattr(tl.core.tensor, name, convert(value))
    if not isinstance(tl.zeros_like, InterpretedFunction):
        raise RuntimeError("tl.zeros_like is still compiled")


# The oldest Triton whose interpreter runs the kernels (3.6's fails on a loop bound taken from a
# kernel argument: "only 0-dimensional arrays can be converted to Python scalars").
MIN_INTERPRETER_TRITON = (3, 7)


def triton_version() -> tuple[int, ...]:
    """(major, minor) of the Triton in use."""
    import triton

    return tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:2] if p.isdigit())


def interpreter_problem() -> str | None:
    """Why the interpreter can't run leanattn's kernels in this process, or None."""
    import triton

    if _PROBLEM is not None:
        return _PROBLEM
    if triton_version() < MIN_INTERPRETER_TRITON:
        want = ".".join(map(str, MIN_INTERPRETER_TRITON))
        return (f"leanattn runs its kernels on the CPU under Triton's interpreter, which needs Triton >= {want}; "
                f"this is Triton {triton.__version__}: pip install 'triton>={want}'")
    return None
