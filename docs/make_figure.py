"""Draw which program computes which LeanTiles for a ragged batch (docs/schedule.png).

Run: python docs/make_figure.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from leanattn.schedule import plan  # noqa: E402

LENS = [1000, 3100, 260, 0, 1800]
KV_HEADS = 2
TILE = 128
PROGRAMS = 10


def main() -> None:
    s = plan(LENS, KV_HEADS, TILE, PROGRAMS)
    cmap = plt.get_cmap("tab10")
    heads = [(b, h) for b in range(len(LENS)) for h in range(KV_HEADS)]
    width = max(s.tiles)
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(11, 7.5), gridspec_kw={"height_ratios": [3, 1]})
    split = s.split_heads()
    for seg in s.segments:
        row = heads.index((seg.batch, seg.kv_head))
        for t in range(seg.tile_start, seg.tile_end):
            ax.add_patch(Rectangle((t, row), 0.95, 0.9, fc=cmap(seg.program % 10),
                                   ec="black" if not seg.whole else "none", lw=1.5))
            ax.text(t + 0.47, row + 0.45, str(seg.program), ha="center", va="center", fontsize=7, color="white")
    for (b, h), segs in split.items():
        row = heads.index((b, h))
        ax.text(s.tiles[b] + 0.2, row + 0.45, f"split: merged by the last of programs "
                f"{segs[0].program}..{segs[-1].program} (ticket {segs[0].ticket})", va="center", fontsize=7)
    ax.set_xlim(0, width + 9)
    ax.set_ylim(len(heads), 0)
    ax.set_yticks([i + 0.45 for i in range(len(heads))])
    ax.set_yticklabels([f"seq {b} (len {LENS[b]}) kv head {h}" for b, h in heads], fontsize=8)
    ax.set_xlabel(f"LeanTile index within the head ({TILE} tokens each); number = program")
    ax.set_title(f"Stream-K partition: {sum(s.shares())} tiles over {s.num_programs} programs "
                 f"(shares {min(s.shares())}-{max(s.shares())}); outlined = partial, merged exactly")
    # The same tiles laid end to end, as the partition sees them.
    g = 0
    for seg in s.segments:
        n = seg.tile_end - seg.tile_start
        bx.add_patch(Rectangle((g, 0), n, 1, fc=cmap(seg.program % 10), ec="none"))
        g += n
    first = 0
    for b, n in enumerate(s.tiles):
        for h in range(KV_HEADS):
            bx.axvline(first, color="black", lw=1.2, zorder=3)
            first += n
    bx.set_xlim(0, s.total_tiles)
    bx.set_ylim(0, 1)
    bx.set_yticks([])
    bx.set_xlabel("all tiles in (sequence, kv head, tile) order; black lines = head boundaries; colour = program")
    fig.tight_layout()
    out = Path(__file__).with_name("schedule.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
