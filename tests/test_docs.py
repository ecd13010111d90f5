"""README.md's signature lines against the code: names, order, kinds and defaults.

A signature line is a backticked ``name(params)`` span in the README's prose (code blocks are
examples, not signatures) naming a leanattn callable: ``leanattn.X.Y(...)``, or a bare name in
``BARE``. Spans with ``...`` abbreviate a call and are not signatures. Each one must list every
parameter of the real callable, in order, with its kind (positional, or keyword-only after the
``*`` marker) and its default written as the default's repr.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pytest

import leanattn

README = Path(__file__).parents[1] / "README.md"

# Bare names the README uses for leanattn callables (the DecodeWrapper section writes ``plan(...)``
# and ``run(...)``, the functional section ``plan_decode(...)``).
BARE: dict[str, Callable[..., Any]] = {
    "DecodeWrapper": leanattn.DecodeWrapper,
    "plan": leanattn.DecodeWrapper.plan,
    "run": leanattn.DecodeWrapper.run,
    "plan_decode": leanattn.plan_decode,
}
# Lines the README must keep: dropping one is drift too.
REQUIRED = {"leanattn.decode", "DecodeWrapper", "plan", "run", "plan_decode", "leanattn.reserve_workspace",
            "leanattn.merge_states", "leanattn.mla_decode", "leanattn.MLAWrapper", "leanattn.MLAWrapper.plan",
            "leanattn.MLAWrapper.run"}
_NO_DEFAULT = None


class Param(NamedTuple):
    name: str
    kind: str  # "positional-only", "positional", "*args", "keyword-only" or "**kwargs"
    default: str | None  # as written (normalised by ast); None: no default


def _prose(text: str) -> str:
    """The README without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _spans(text: str) -> list[str]:
    """Every backticked span of the prose, whitespace collapsed (a span may wrap a line)."""
    return [" ".join(m.group(1).split()) for m in re.finditer(r"`([^`]+)`", _prose(text))]


def _documents_leanattn(name: str) -> bool:
    return name in BARE or name.startswith("leanattn.")


def _resolve(name: str) -> Callable[..., Any]:
    """The callable a README name documents (AttributeError: the README names a missing one)."""
    if name in BARE:
        return BARE[name]
    obj: Any = leanattn
    for part in name.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def signature_lines(text: str) -> list[tuple[str, str]]:
    """(name, parameter text) of every README signature line, in order."""
    found = []
    for span in _spans(text):
        m = re.fullmatch(r"([A-Za-z_][\w.]*)\((.*)\)", span)
        if m and "..." not in span and _documents_leanattn(m.group(1)):
            found.append((m.group(1), m.group(2)))
    return found


def _norm(source: str) -> str:
    """A default's text in one spelling: ``"cuda"`` and ``'cuda'`` read the same."""
    try:
        return ast.unparse(ast.parse(source, mode="eval"))
    except SyntaxError:  # a repr that is no expression: compare it as it is
        return source


def readme_params(params: str) -> list[Param]:
    """The parameters of README text ``params``, read as a Python parameter list."""
    args = ast.parse(f"def _({params}): pass").body[0].args
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    out = [Param(a.arg, "positional-only" if a in args.posonlyargs else "positional",
                 None if d is None else _norm(ast.unparse(d))) for a, d in zip(positional, defaults)]
    if args.vararg:
        out.append(Param(args.vararg.arg, "*args", _NO_DEFAULT))
    out += [Param(a.arg, "keyword-only", None if d is None else _norm(ast.unparse(d)))
            for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        out.append(Param(args.kwarg.arg, "**kwargs", _NO_DEFAULT))
    return out


_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional-only",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
    inspect.Parameter.VAR_POSITIONAL: "*args",
    inspect.Parameter.KEYWORD_ONLY: "keyword-only",
    inspect.Parameter.VAR_KEYWORD: "**kwargs",
}


def code_params(fn: Callable[..., Any]) -> list[Param]:
    """The parameters of ``fn`` (a method's ``self`` left out), defaults as their repr."""
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    return [Param(p.name, _KINDS[p.kind], None if p.default is inspect.Parameter.empty else _norm(repr(p.default)))
            for p in params]


_TEXT = README.read_text()
_LINES = signature_lines(_TEXT)


def test_readme_has_every_signature_line():
    assert REQUIRED <= {name for name, _ in _LINES}, f"found {[name for name, _ in _LINES]}"


@pytest.mark.parametrize("name,params", _LINES, ids=[f"{i}-{name}" for i, (name, _) in enumerate(_LINES)])
def test_signature_line_matches_the_code(name, params):
    assert readme_params(params) == code_params(_resolve(name)), f"README's `{name}(...)` differs from the code"


def test_reference_decode_differs_from_decode_as_the_readme_says():
    """The README's sentence on leanattn.reference.decode: decode's arguments, less the named
    ones, plus one keyword with its default."""
    m = re.search(r"`leanattn\.reference\.decode` takes the arguments of `leanattn\.decode` except (.*?), "
                  r"adds the keyword `(\w+)=([^`]+)`", " ".join(_prose(_TEXT).split()))
    assert m, "README lost its sentence on leanattn.reference.decode's arguments"
    dropped = re.findall(r"`(\w+)`", m.group(1))
    added = Param(m.group(2), "keyword-only", _norm(m.group(3)))
    decode, reference = code_params(leanattn.decode), code_params(leanattn.reference.decode)
    assert set(dropped) <= {p.name for p in decode}, f"README drops {dropped}, not all decode's"
    assert [p for p in decode if p.name not in dropped] == [p for p in reference if p.name != added.name]
    assert added in reference
