"""Benchmark shapes and their text form.

A shape is written ``LENS@HQ/HKV[:opt...]``: ``LENS`` is ``BATCHxCTX`` (every sequence ``CTX``
long) or an explicit ``+``-joined list of lengths for a ragged batch; lengths take ``k`` (x1024).
Options: ``d=N`` (head dim, default 128), ``fp16``/``bf16`` (default bf16), ``page=N`` (paged
cache with that page size); model features (``leanattn bench --mode graph`` only): ``fp8`` (an
fp8 e4m3 cache), ``q=N`` (N query tokens per sequence), ``win=N`` (a causal sliding window of N
keys before each query), ``softcap=X``, ``sinks``, ``split=N`` (leanattn in batch-invariant mode
with N tokens per split; FlashInfer's tensor-core decode with the same fixed split),
``scales=head|seq|token`` (with ``fp8``: the fp8 scales as float32 tensors per kv head, per
(sequence, kv head) or per token and kv head, each layer its own). Examples: ``1x32k@32/8``,
``4x16k@16/16:d=64``, ``4x8k@32/8:d=512``, ``1k+2k+4k@32/8:page=16``, ``1x128k@32/8:win=4k``, ``8x32k@32/8:fp8:page=16``.

A shape ``leanattn.decode`` would refuse is refused here too, checked against the library's own
limits (``leanattn.MAX_PAGE_SIZE``, ``leanattn.max_query_rows`` and their neighbours), so a bad ``--shapes`` fails before any GPU work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import leanattn

__all__ = ["SUITES", "Shape", "default_suite", "parse_shape", "suite"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_SYNTAX = "expected LENS@HQ/HKV[:opt...], e.g. 1x32k@32/8:d=128:bf16:page=16"


@dataclass(frozen=True)
class Shape:
    lens: tuple[int, ...]
    q_heads: int
    kv_heads: int
    head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16
    page_size: int = 0  # 0: contiguous cache
    fp8: bool = False  # the cache in float8_e4m3fn
    q_len: int = 1
    window: int = -1  # keys before each query it sees; -1: all
    softcap: float = 0.0
    sinks: bool = False
    split: int = 0  # batch-invariant mode's tokens per split; 0: off
    scales: str = ""  # fp8 scale tensors: "head", "seq" or "token"; "": the float 1

    def __post_init__(self) -> None:
        check_shape(self)

    @property
    def has_features(self) -> bool:
        return self.fp8 or self.q_len > 1 or self.window >= 0 or self.softcap > 0 or self.sinks or self.split > 0 or bool(self.scales)

    def seen(self, length: int) -> int:
        """Keys of a sequence of ``length`` that some query sees."""
        return length if self.window < 0 else min(length, self.window + self.q_len)

    @property
    def batch(self) -> int:
        return len(self.lens)

    @property
    def ragged(self) -> bool:
        return len(set(self.lens)) > 1

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V read once: the floor every method must move (only the keys some query
        sees)."""
        bits = 8 if self.fp8 else torch.finfo(self.dtype).bits
        return 2 * sum(self.seen(n) for n in self.lens) * self.kv_heads * self.head_dim * bits // 8

    @property
    def name(self) -> str:
        if self.ragged:
            lens = "+".join(_fmt_len(n) for n in self.lens)
        else:
            lens = f"{self.batch}x{_fmt_len(self.lens[0])}"
        opts = "" if self.head_dim == 128 else f":d={self.head_dim}"
        opts += ":fp16" if self.dtype == torch.float16 else ""
        opts += f":page={self.page_size}" if self.page_size else ""
        opts += ":fp8" if self.fp8 else ""
        opts += f":q={self.q_len}" if self.q_len > 1 else ""
        opts += f":win={_fmt_len(self.window)}" if self.window >= 0 else ""
        opts += f":softcap={self.softcap:g}" if self.softcap else ""
        opts += ":sinks" if self.sinks else ""
        opts += f":split={self.split}" if self.split else ""
        opts += f":scales={self.scales}" if self.scales else ""
        return f"{lens}@{self.q_heads}/{self.kv_heads}{opts}"

    @property
    def family(self) -> str:
        """Everything but the context length: one plot line per method per family."""
        if self.ragged:
            return self.name
        return self.name.replace(f"x{_fmt_len(self.lens[0])}@", "xN@", 1)


def _page_size_ok(page_size: int) -> bool:
    """The page sizes ``leanattn.decode`` takes: 1 to ``leanattn.MAX_PAGE_SIZE``."""
    return 1 <= page_size <= leanattn.MAX_PAGE_SIZE


def _page_error(page_size: int) -> str:
    return f"page size must be 1 to {leanattn.MAX_PAGE_SIZE}, got page={page_size}"


def check_shape(shape: Shape) -> None:
    """Raise ValueError, saying what is expected, for a shape ``leanattn.decode`` would refuse
    (or that is no batch at all). The limits are read from ``leanattn`` at call time, never
    copied, so the parser cannot drift from the kernel's checks."""
    if not shape.lens or min(shape.lens) < 0:
        raise ValueError(f"needs at least one sequence and lengths >= 0, got lengths {list(shape.lens)}")
    if shape.q_heads < 1 or shape.kv_heads < 1 or shape.q_heads % shape.kv_heads:
        raise ValueError(f"q heads must be a positive multiple of kv heads, got {shape.q_heads}/{shape.kv_heads}")
    if shape.head_dim not in leanattn.SUPPORTED_HEAD_DIMS:
        dims = ", ".join(map(str, leanattn.SUPPORTED_HEAD_DIMS))
        raise ValueError(f"head dim must be one of {dims}, got d={shape.head_dim}")
    if shape.dtype not in leanattn.SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be fp16 or bf16, got {shape.dtype}")
    # 0 is the contiguous cache; an explicit page= must be a size decode takes.
    if shape.page_size != 0 and not _page_size_ok(shape.page_size):
        raise ValueError(_page_error(shape.page_size))
    rows = shape.q_len * (shape.q_heads // shape.kv_heads)
    most = leanattn.max_query_rows(shape.head_dim)
    if shape.q_len < 1 or rows > most:
        raise ValueError(f"q_len x (q heads / kv heads) must be 1 to {most} at d={shape.head_dim}, got q={shape.q_len} with "
                         f"{shape.q_heads}/{shape.kv_heads} heads: {rows}")
    if shape.window < -1:
        raise ValueError(f"window must be >= 0 keys (-1: none), got win={shape.window}")
    if shape.scales and (shape.scales not in ("head", "seq", "token") or not shape.fp8):
        raise ValueError(f"scales must be head, seq or token, with fp8, got scales={shape.scales}")
    if shape.split < 0 or shape.split % 128:
        raise ValueError(f"split must be a positive multiple of 128 tokens (every launch config's tile divides it), "
                         f"got split={shape.split}")
    if not math.isfinite(shape.softcap) or shape.softcap < 0:
        raise ValueError(f"softcap must be a finite number >= 0 (0: off), got softcap={shape.softcap:g}")


def _fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def _parse_len(text: str) -> int:
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def parse_shape(text: str) -> Shape:
    """Parse ``LENS@HQ/HKV[:opt...]`` (see the module docstring). Raises ValueError naming the
    text and what is expected, for bad syntax or for a shape ``leanattn.decode`` would refuse."""
    try:
        main, *opts = text.strip().split(":")
        lens_text, at, heads = main.partition("@")
        if not at or heads.count("/") != 1:
            raise ValueError("heads must follow the lengths as @HQ/HKV")
        hq, hkv = (int(x) for x in heads.split("/"))
        if "+" in lens_text:
            lens = tuple(_parse_len(x) for x in lens_text.split("+"))
        elif lens_text.lower().count("x") == 1:
            batch, ctx = lens_text.lower().split("x")
            lens = (_parse_len(ctx),) * int(batch)
        else:
            raise ValueError(f"lengths {lens_text!r} are neither BATCHxCTX nor a +-joined list")
        kw: dict = {}
        for opt in opts:
            if opt in _DTYPES:
                kw["dtype"] = _DTYPES[opt]
            elif opt.startswith("d="):
                kw["head_dim"] = int(opt[2:])
            elif opt.startswith("page="):
                kw["page_size"] = int(opt[5:])
            elif opt == "fp8":
                kw["fp8"] = True
            elif opt.startswith("q="):
                kw["q_len"] = int(opt[2:])
            elif opt.startswith("win="):
                kw["window"] = _parse_len(opt[4:])
            elif opt.startswith("softcap="):
                kw["softcap"] = float(opt[8:])
            elif opt == "sinks":
                kw["sinks"] = True
            elif opt.startswith("split="):
                kw["split"] = int(opt[6:])
            elif opt.startswith("scales="):
                kw["scales"] = opt[7:]
            else:
                raise ValueError(f"unknown option {opt!r}")
    except ValueError as e:
        raise ValueError(f"bad shape {text!r}: {e}; {_SYNTAX}") from e
    try:
        if kw.get("page_size") == 0:  # Shape reads 0 as a contiguous cache; written out, it is a bad page
            raise ValueError(_page_error(0))
        return Shape(lens, hq, hkv, **kw)
    except ValueError as e:  # well written, but leanattn.decode would refuse it
        raise ValueError(f"bad shape {text!r}: {e}") from e


_SUITE = """
1x4k@32/32 1x16k@32/32 1x64k@32/32 1x256k@32/32 1x512k@32/32
1x4k@32/8 1x32k@32/8 1x128k@32/8 1x512k@32/8
8x8k@32/8 8x32k@32/8 32x4k@32/8 64x2k@32/8 16x8k@64/8
1x32k@8/1 1x128k@8/1 1x512k@8/1
4x16k@16/16:d=64 4x16k@32/8:d=256
4x16k@16/16:d=32 4x16k@16/8:d=192 4x8k@32/8:d=512 1x64k@16/8:d=512
3x8k@40/40 3x64k@40/40
1x32k@32/8:fp16 8x8k@32/8:fp16
1k+2k+4k+8k+16k+32k+64k+128k@32/8
8x32k@32/8:page=1 8x32k@32/8:page=16 8x32k@32/8:page=64
1k+2k+4k+8k+16k+32k+64k+128k@32/8:page=16
"""

# Head dims 64, 80, 96 and 256 and groups 3, 5, 6 and 7 (q heads per kv head), contiguous and
# paged, 20-256 MiB: what the table above leaves out.
_COVERAGE = """
4x16k@40/8:d=64 16x4k@14/2:d=64:page=16
1x32k@8/8:d=80 4x8k@16/8:d=80:page=16
1x64k@7/1:d=96 4x16k@24/8:d=96:page=64
4x8k@10/2 16x2k@12/2:page=16
4x8k@56/8:d=256 2x16k@10/2:d=256:page=16
"""

# One GPU's share of a model under tensor parallelism, 16-256 MiB of KV per call: the issue's
# d=128 shards (8/1, 32/8, 64/8), four of them paged; groups 3, 5, 6 and 7 at d=128; and head dims
# 64, 80, 96 and 256, each contiguous and paged, with groups 1 to 8 among them.
_SERVING = """
1x32k@8/1 1x4k@32/8 4x8k@8/1 1x128k@8/1 64x2k@8/1 1x32k@32/8 8x8k@32/8 16x4k@64/8
1x32k@8/1:page=16 1x4k@32/8:page=16 64x2k@8/1:page=16 8x8k@32/8:page=64
2x32k@7/1 4x8k@10/2 16x2k@12/2:page=16 8x4k@24/8
1x64k@8/1:d=64 4x16k@40/8:d=64 16x4k@14/2:d=64:page=16
1x64k@4/1:d=80 1x32k@8/8:d=80 4x8k@16/8:d=80:page=16
1x64k@7/1:d=96 8x4k@16/16:d=96 4x16k@24/8:d=96:page=64
1x16k@8/1:d=256 4x8k@16/8:d=256 2x16k@10/2:d=256:page=16 4x8k@56/8:d=256
1x32k@8/1:split=512 1x4k@32/8:split=256 8x8k@32/8:split=512 8x8k@32/8:split=512:page=16
"""

# name: (what it is, its shapes' text)
SUITES: dict[str, tuple[str, str]] = {
    "eager": ("the baseline table, large batches, head dims 32-512, fp16, paged and ragged rows, and every "
              "head dim 64-256 and group 1-8 (the --mode eager default)", _SUITE + _COVERAGE),
    "serving": ("tensor-parallel shards of 16-256 MiB: head dims 64, 80, 96, 128, 256, groups 1-8, contiguous "
                "and paged, and batch-invariant rows (the --mode graph default)", _SERVING),
    "serving-full": ("the eager suite and the serving suite together", _SUITE + _COVERAGE + _SERVING),
}


def suite(name: str) -> list[Shape]:
    """The shapes of the suite ``name`` (a key of ``SUITES``), each once, in order."""
    if name not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}, got {name!r}")
    return [parse_shape(s) for s in dict.fromkeys(SUITES[name][1].split())]


def default_suite() -> list[Shape]:
    """The eager suite: every shape of the baseline table, plus large-batch, 70B-style GQA, head
    dims 32, 64, 80, 96, 192, 256 and 512 (the 512 ones 512 MiB of K and V), groups 1 to 8, fp16,
    and paged rows."""
    return suite("eager")
