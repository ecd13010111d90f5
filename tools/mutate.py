#!/usr/bin/env python
"""Mutation check: apply each mutant of ``tools/mutants.py`` to a copy of the tree and run the tests
that should kill it.

The working tree (uncommitted edits included; no .git, .venv or caches) is copied once into a
temporary directory; each mutant is applied to the copy, its tests run there with ``pytest -x -q``
(PYTHONPATH = the copy's src, so the copy's code is what gets imported), and the copy's files are
put back. The real tree is only read.

Results: killed (the tests failed; "killed (broken)": the mutant broke collection, an import),
SURVIVED (they passed: a gap in the tests), not applied (the mutant's text is not in the file, or
not on the expected number of lines), skipped (GPU-only, without --gpu or without CUDA), timeout
(not counted as survived, but check it), error (pytest could not run the selection: a test id
not found, nothing collected), baseline fails (the selection fails on the unmutated copy, so the
mutant proves nothing; --no-baseline skips that check).

    python tools/mutate.py                 # every CPU mutant
    python tools/mutate.py --only 'plan-*' --only merge-combine-acc-no-alpha
    python tools/mutate.py --gpu           # the GPU-only ones too (needs CUDA)
    python tools/mutate.py --list

Exit status: 1 if any applied mutant survived, 2 for usage errors, else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mutants import MUTANTS, Edit, Mutant  # noqa: E402

IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", "*.egg-info", ".pytest_cache",
                                ".hypothesis", "build", "dist", "*.pyc")


@dataclass
class Result:
    mutant: Mutant
    status: str
    seconds: float = 0.0
    detail: str = ""


def apply_edits(tree: Path, edits: tuple[Edit, ...]) -> tuple[dict[Path, str], str | None]:
    """Apply ``edits`` under ``tree``; return the files' original texts (to put back) and, if an
    edit does not apply, why (then nothing is changed)."""
    texts: dict[Path, str] = {}
    for e in edits:
        path = tree / e.file
        if path not in texts:
            if not path.exists():
                return {}, f"{e.file} not found"
            texts[path] = path.read_text()
    new_texts = dict(texts)
    for e in edits:
        path = tree / e.file
        lines = new_texts[path].splitlines(keepends=True)
        hits = [i for i, line in enumerate(lines) if e.old in line]
        if len(hits) != e.lines:
            where = f"lines {[i + 1 for i in hits]}" if hits else "no line"
            return {}, f"{e.file}: {e.old!r} on {where}, expected {e.lines}"
        for i in reversed(hits):
            if e.new is None:
                del lines[i]
            else:
                lines[i] = lines[i].replace(e.old, e.new)
        new_texts[path] = "".join(lines)
    for path, text in new_texts.items():
        path.write_text(text)
    return texts, None


def restore(texts: dict[Path, str]) -> None:
    for path, text in texts.items():
        path.write_text(text)


def pytest_command(m: Mutant) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests]
    if m.k:
        cmd += ["-k", m.k]
    return cmd


def run_tests(tree: Path, m: Mutant, timeout: float, env: dict[str, str]) -> tuple[str, float, str]:
    """Run the mutant's tests in ``tree``: ('passed' | 'failed' | 'error' | 'timeout', seconds, detail)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(pytest_command(m), cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the pytest process group this script started
        proc.communicate()
        return "timeout", time.monotonic() - t0, f"over {timeout:.0f} s"
    seconds = time.monotonic() - t0
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.MULTILINE)
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    if proc.returncode == 0:
        return "passed", seconds, summary
    if proc.returncode == 1:
        return "failed", seconds, failed[0] if failed else summary
    tail = " | ".join(line for line in out.strip().splitlines()[-3:])
    if proc.returncode == 2:  # interrupted: a collection error, such as a mutant that breaks an import
        return "broken", seconds, tail
    # 3: internal error, 4: usage error (a test id not found), 5: no tests collected
    return "error", seconds, f"pytest exit {proc.returncode}: {tail}"


def cuda_available(env: dict[str, str]) -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           env=env, capture_output=True, text=True)
    return probe.stdout.strip() == "True"


def copy_tree(dest: Path) -> Path:
    tree = dest / "tree"
    shutil.copytree(ROOT, tree, ignore=IGNORE, symlinks=True)
    return tree


def test_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "src"), str(tree / "tests")] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    return env


def check_import_path(tree: Path, env: dict[str, str]) -> None:
    """The copy's leanattn must be the one imported (not an installed or editable one)."""
    probe = subprocess.run([sys.executable, "-c", "import leanattn, sys; print(leanattn.__file__)"],
                           cwd=tree, env=env, capture_output=True, text=True)
    where = probe.stdout.strip()
    if probe.returncode != 0 or not Path(where).resolve().is_relative_to(tree.resolve()):
        sys.exit(f"mutate.py: the copy's leanattn is not the one imported ({where or probe.stderr.strip()})")


def selected(names: list[str] | None) -> list[Mutant]:
    if not names:
        return list(MUTANTS)
    pats = [p for n in names for p in n.split(",") if p]
    chosen = [m for m in MUTANTS if any(fnmatch.fnmatchcase(m.name, p) for p in pats)]
    unknown = [p for p in pats if not any(fnmatch.fnmatchcase(m.name, p) for m in MUTANTS)]
    if unknown:
        print(f"mutate.py: no mutant named {', '.join(unknown)} (see --list)", file=sys.stderr)
        sys.exit(2)
    return chosen


def print_table(results: list[Result]) -> None:
    rows = [("mutant", "where", "result", "time", "detail")]
    for r in results:
        files = sorted({Path(e.file).name for e in r.mutant.edits})
        kind = "gpu" if r.mutant.gpu else "cpu"
        rows.append((r.mutant.name, f"{','.join(files)} ({kind})", r.status,
                     f"{r.seconds:.0f}s" if r.seconds else "", r.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 6)


def list_mutants(mutants: list[Mutant]) -> None:
    with tempfile.TemporaryDirectory(prefix="leanattn-mutate-") as tmp:
        tree = copy_tree(Path(tmp))
        for m in mutants:
            texts, why = apply_edits(tree, m.edits)
            restore(texts)
            state = "applies" if why is None else f"NOT APPLIED: {why}"
            sel = " ".join(m.tests) + (f" -k {m.k!r}" if m.k else "")
            print(f"{m.name}{'  [gpu]' if m.gpu else ''}\n    {state}\n    tests: {sel}")
            if m.why:
                print(f"    why: {m.why}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only this mutant (shell pattern, comma-separated or repeated)")
    parser.add_argument("--gpu", action="store_true", help="also run the GPU-only mutants (needs CUDA)")
    parser.add_argument("--list", action="store_true", help="list the mutants, whether each applies, and exit")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per test run (default 300)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip running each test selection on the unmutated copy first")
    parser.add_argument("-k", dest="k", metavar="EXPR",
                        help="run the chosen mutants' test files with this -k expression instead of theirs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    args = parser.parse_args()

    mutants = selected(args.only)
    if args.k is not None:
        mutants = [dataclasses.replace(m, k=args.k) for m in mutants]
    if args.list:
        list_mutants(mutants)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="leanattn-mutate-"))
    results: list[Result] = []
    try:
        tree = copy_tree(tmp)
        env = test_env(tree)
        check_import_path(tree, env)
        has_cuda = args.gpu and cuda_available(env)
        if args.gpu and not has_cuda:
            print("mutate.py: --gpu without a CUDA device: GPU-only mutants are skipped", file=sys.stderr)
        baseline: dict[tuple, tuple[str, str]] = {}
        for m in mutants:
            texts, why = apply_edits(tree, m.edits)
            restore(texts)  # only a check so far: the baseline runs on the clean copy
            if why is not None:
                results.append(Result(m, "not applied", detail=why))
                print(f"[{m.name}] not applied: {why}", flush=True)
                continue
            if m.gpu and not has_cuda:
                results.append(Result(m, "skipped", detail="GPU-only" + ("" if args.gpu else " (use --gpu)")))
                continue
            key = (m.tests, m.k)
            if not args.no_baseline and key not in baseline:
                status, secs, detail = run_tests(tree, m, args.timeout, env)
                baseline[key] = (status, detail)
                print(f"[baseline {' '.join(m.tests)} -k {m.k!r}] {status} in {secs:.0f}s", flush=True)
            if not args.no_baseline and baseline[key][0] != "passed":
                results.append(Result(m, "baseline fails", detail=baseline[key][1]))
                continue
            texts, _ = apply_edits(tree, m.edits)
            try:
                status, secs, detail = run_tests(tree, m, args.timeout, env)
            finally:
                restore(texts)
            verdict = {"failed": "killed", "passed": "SURVIVED", "timeout": "timeout", "broken": "killed (broken)",
                       "error": "error"}[status]
            results.append(Result(m, verdict, secs, detail))
            print(f"[{m.name}] {verdict} in {secs:.0f}s: {detail}", flush=True)
    finally:
        if args.keep:
            print(f"copy kept at {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print_table(results)
    survived = [r for r in results if r.status == "SURVIVED"]
    if survived:
        print(f"\n{len(survived)} mutant(s) survived: {', '.join(r.mutant.name for r in survived)}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
