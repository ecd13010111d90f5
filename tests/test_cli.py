"""The ``leanattn`` command line and its shape parser, on the CPU (no kernel runs).

Arguments are checked before the GPU check, so these behave the same with or without a GPU:
``torch.cuda.is_available`` is replaced by a probe that records whether it was asked.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import leanattn
from leanattn import cli
from leanattn.bench.shapes import parse_shape, suite

# One shape per kind of refusal, with a word of what the message must say is expected.
REFUSED = [
    ("1x32k@32/7", "multiple of kv heads"),            # q_heads not a multiple of kv_heads
    ("1x32k@8/0", "multiple of kv heads"),             # no kv heads
    ("1x32k@32/8:d=72", "head dim must be one of"),    # unsupported head dim
    ("1x32k@32/8:d=1024", "head dim must be one of"),
    ("1x32k@32/8:d=48", "head dim must be one of"),
    ("1x32k@32/2:d=512:q=2", "must be 1 to 16 at d=512"),  # 32 rows > leanattn.max_query_rows(512)
    ("1x32k@32/8:page=257", "page size must be 1 to 256"),  # one over api.MAX_PAGE_SIZE
    ("1x32k@32/8:page=512", "page size must be 1 to"),
    ("1x32k@32/8:page=0", "page size must be 1 to"),   # page= written out must be a page size
    ("1x32k@64/1:q=3", "q_len x (q heads / kv heads)"),  # 192 query rows > api.MAX_QUERY_ROWS
    ("1x32k@32/8:q=33", "q_len x (q heads / kv heads)"),  # 132 rows: one over
    ("1x32k@32/8:q=0", "q_len x (q heads / kv heads)"),
    ("1x32k@32/8:win=-2", "window"),
    ("1x32k@32/8:softcap=-1", "softcap"),
    ("1x32k@32/8:softcap=nan", "softcap"),
    ("1x32k@32/8:softcap=inf", "softcap"),
    ("1x32k@32/8:scales=token", "scales must be head, seq or token, with fp8"),
    ("1x32k@32/8:fp8:scales=page", "scales must be head, seq or token"),
    ("1x32k@32/8:split=100", "split must be a positive multiple of 128"),
]
# At the limits, on the accepted side.
ACCEPTED = ["1x32k@128/1", "1x32k@32/8:q=32", "1x32k@32/8:page=1", "1x32k@32/8:page=3",
            "1x32k@32/8:page=24", "1x32k@32/8:page=129", "1x32k@32/8:page=256", "1x32k@32/8:d=80",
            "1x32k@32/8:d=32", "1x32k@32/8:d=192:q=16", "1x32k@32/16:d=512:q=8", "1x32k@16/1:d=512:fp8",
            "1x32k@32/8:win=0", "1x32k@32/8:softcap=0", "8x32k@32/8:fp8:page=16:sinks:q=4:win=4k:softcap=30",
            "8x32k@32/8:fp8:page=16:scales=token:split=512", "1x32k@8/1:fp8:scales=seq"]


@pytest.fixture
def gpu_probe(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Replace torch.cuda.is_available by a probe answering False; the list records each call."""
    calls: list[bool] = []

    def probe() -> bool:
        calls.append(True)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", probe)
    return calls


def _exit_code(argv: list[str]) -> int:
    """``cli.main(argv)``'s exit status, whether it returns it or argparse exits."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def test_bogus_shape_is_an_argument_error_before_the_gpu_check(gpu_probe, capsys):
    assert _exit_code(["bench", "--shapes", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "argument --shapes" in err and "'bogus'" in err and "expected LENS@HQ/HKV" in err
    assert "needs a CUDA GPU" not in err
    assert not gpu_probe, "the GPU was checked before the arguments"


@pytest.mark.parametrize("text,expected", REFUSED, ids=[t for t, _ in REFUSED])
def test_each_refused_shape_kind_is_an_argument_error(text, expected, gpu_probe, capsys):
    assert _exit_code(["bench", "--mode", "graph", "--shapes", "1x1k@8/8", text]) == 2
    err = capsys.readouterr().err
    assert f"bad shape {text!r}" in err and expected in err
    assert not gpu_probe


@pytest.mark.parametrize("text,expected", REFUSED, ids=[t for t, _ in REFUSED])
def test_parser_refuses_what_decode_refuses(text, expected):
    with pytest.raises(ValueError, match="bad shape") as info:
        parse_shape(text)
    assert expected in str(info.value)


@pytest.mark.parametrize("text", ACCEPTED)
def test_parser_accepts_shapes_at_the_limits(text):
    assert parse_shape(text) == parse_shape(parse_shape(text).name)


def _decode_refuses(monkeypatch: pytest.MonkeyPatch, *, q_heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                    page_size: int = 0, q_len: int = 1, window: int = -1, softcap: float = 0.0) -> bool:
    """Whether ``leanattn.decode`` refuses a one-sequence call of this shape (a cache of one
    token, so an accepted call runs in moments)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(1, q_len, q_heads, head_dim, device=dev).to(torch.bfloat16)
    k = torch.randn(1, max(page_size, 1), kv_heads, head_dim, device=dev).to(torch.bfloat16)
    table = torch.zeros(1, 1, dtype=torch.int32, device=dev) if page_size else None
    try:
        leanattn.decode(q, k, k, block_table=table, window_size=(window, -1), softcap=softcap)
    except ValueError:
        return True
    return False


# The same shapes as decode's arguments: the parser and decode agree on each side of each limit.
AGREEMENT = [
    ("1x1k@32/7", True, dict(kv_heads=7)),
    ("1x1k@8/0", True, dict(q_heads=8, kv_heads=0)),
    ("1x1k@32/8:d=72", True, dict(head_dim=72)),
    ("1x1k@32/8:d=80", False, dict(head_dim=80)),
    ("1x1k@32/8:page=12", False, dict(page_size=12)),
    ("1x1k@32/8:page=257", True, dict(page_size=257)),
    ("1x1k@32/8:page=256", False, dict(page_size=256)),
    ("1x1k@64/1:q=3", True, dict(q_heads=64, kv_heads=1, q_len=3)),
    ("1x1k@128/1", False, dict(q_heads=128, kv_heads=1)),
    ("1x1k@32/8:q=33", True, dict(q_len=33)),
    ("1x1k@32/8:q=32", False, dict(q_len=32)),
    ("1x1k@32/8:win=-2", True, dict(window=-2)),
    ("1x1k@32/8:win=0", False, dict(window=0)),
    ("1x1k@32/8:softcap=nan", True, dict(softcap=float("nan"))),
    ("1x1k@32/8:softcap=-1", True, dict(softcap=-1.0)),
]


@pytest.mark.parametrize("text,refused,call", AGREEMENT, ids=[t for t, _, _ in AGREEMENT])
def test_parser_and_decode_agree(text, refused, call, monkeypatch):
    assert _decode_refuses(monkeypatch, **call) == refused
    if refused:
        with pytest.raises(ValueError, match="bad shape"):
            parse_shape(text)
    else:
        parse_shape(text)


def test_limits_are_read_from_the_library(monkeypatch):
    """The parser reads the library's limits, not copies: lowering them moves the parser's."""
    parse_shape("1x1k@32/8:page=256:d=80:q=32")
    monkeypatch.setattr(leanattn, "MAX_PAGE_SIZE", 128)
    with pytest.raises(ValueError, match="1 to 128"):
        parse_shape("1x1k@32/8:page=256")
    monkeypatch.setattr(leanattn, "SUPPORTED_HEAD_DIMS", (64, 128))
    with pytest.raises(ValueError, match="head dim"):
        parse_shape("1x1k@32/8:d=80")
    monkeypatch.setattr(leanattn, "max_query_rows", lambda head_dim: 64)
    with pytest.raises(ValueError, match="1 to 64"):
        parse_shape("1x1k@32/8:q=32")


def test_valid_arguments_reach_the_gpu_check(gpu_probe, capsys):
    assert _exit_code(["bench", "--shapes", "1x1k@8/8", "--methods", "leanattn"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert gpu_probe


@pytest.mark.parametrize("argv,message", [
    (["bench", "--methods", "nope"], "unknown methods ['nope']"),
    (["bench", "--shapes", "1x1k@32/8:q=2"], "need --mode graph"),
    (["bench", "--suite", "serving", "--shapes", "1x1k@8/8"], "--shapes or --suite, not both"),
    (["bench", "--pattern", "plain"], "--pattern is for --mode graph"),
    (["bench", "--mode", "graph", "--pattern", "sideways"], "invalid choice: 'sideways'"),
    (["bench", "--suite", "everything"], "invalid choice: 'everything'"),
    (["bench", "--rounds", "0"], "must be an integer >= 1, got '0'"),
    (["bench", "--rounds", "two"], "must be an integer >= 1, got 'two'"),
])
def test_other_argument_errors_come_before_the_gpu_check(argv, message, gpu_probe, capsys):
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "needs a CUDA GPU" not in err
    assert not gpu_probe


@pytest.mark.parametrize("argv,expected", [
    (["bench"], (None, "eager", None, "append", 5)),
    (["bench", "--mode", "graph"], (None, "graph", None, "append", 5)),
    (["bench", "--mode", "graph", "--suite", "serving-full", "--pattern", "plain", "--rounds", "3"],
     (None, "graph", "serving-full", "plain", 3)),
    (["bench", "--suite", "serving", "--rounds", "7"], (None, "eager", "serving", "append", 7)),
])
def test_bench_flags_reach_the_run(argv, expected, monkeypatch):
    """Valid --suite, --pattern and --rounds reach the run as given (a stand-in runs nothing)."""
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli, "_bench", lambda shapes, methods, out, mode, suite, pattern, rounds:
                        seen.append((shapes, mode, suite, pattern, rounds)) or 0)
    assert _exit_code(argv) == 0
    assert seen == [expected]
    assert cli.DEFAULT_SUITES == {"eager": "eager", "graph": "serving"}


def test_bench_exits_1_when_an_output_missed_the_appended_token(monkeypatch, capsys):
    """The run's record (a stand-in for the GPU run) has one failed check: the exit status is 1
    and the failure is printed; the graph run gets the serving suite by default."""
    from leanattn.bench import run as run_mod

    asked = {}

    def fake_run(shapes, methods, device, checkpoint=None, mode="eager", pattern="append", rounds=5, suite=None):
        asked.update(names=[s.name for s in shapes], mode=mode, pattern=pattern, rounds=rounds, suite=suite)
        row = dict(shape="1x32k@8/1", family="f", ctx=1, kv_bytes=2**24, layers=32, mode="graph", pattern=pattern)
        return {"gpu": "G", "copy_gbs": 1.0, "datasheet_gbs": None, "rows": [
            {**row, "method": "leanattn", "ms": 0.01, "host_us": 9.0},
            {**row, "method": "sdpa_cudnn", "status": "FAILED: sdpa_cudnn: off the reference by 4.0e-01"}]}

    monkeypatch.setattr(run_mod, "run_suite", fake_run)
    assert cli._bench(None, ["leanattn", "sdpa_cudnn"], None, "graph") == 1
    assert asked["mode"] == "graph" and asked["suite"] == "serving" and asked["pattern"] == "append"
    assert "1x4k@32/8:page=16" in asked["names"] and len(asked["names"]) == len(suite("serving"))
    assert "sdpa_cudnn: FAILED: sdpa_cudnn: off the reference by 4.0e-01" in capsys.readouterr().err


def test_version(capsys):
    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out == f"leanattn {leanattn.__version__}\n"


@pytest.mark.parametrize("command,words", [("demo", "float64 reference"), ("bench", "peers in one process")])
def test_subcommand_help_has_a_description(command, words, capsys):
    assert _exit_code([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: leanattn {command}") and words in " ".join(out.split())


def test_entry_point_rejects_a_bogus_shape_without_a_gpu():
    """``python -m leanattn``, as installed, with no GPU visible."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "leanattn", "bench", "--shapes", "bogus"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2
    assert "bad shape 'bogus'" in run.stderr and "needs a CUDA GPU" not in run.stderr
