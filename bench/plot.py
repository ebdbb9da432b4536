"""The PNG beside the table: GB/s per block size for every system and case.

One panel per (client count, operation): put on the left, get on the right;
memcpy and loopback TCP (the limits) drawn in both. matplotlib is an optional
extra of the bench: without it the plot is skipped with a note.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.measure import Result
from bench.report import LIMIT_CASES, Index, is_kvstore, size_label

STYLE_LIMIT = {"memcpy": ("black", "--"), "loopback TCP": ("grey", "--")}
KVSTORE_COLORS = {
    "kvstore zero-copy (shm)": "tab:blue",
    "kvstore zero-copy (tcp)": "tab:orange",
    "kvstore inline": "tab:green",
}
PEER_COLORS = ["tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]


def unavailable() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    return None


def write_plot(results: list[Result], path: str | os.PathLike, *, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = Index(results)
    levels = index.levels
    panels = [(conc, op) for conc in levels for op in ("put", "get")]
    fig, axes = plt.subplots(len(levels), 2, figsize=(13, 4.6 * len(levels)), squeeze=False, sharex=True)
    peer_colors = {p: PEER_COLORS[i % len(PEER_COLORS)] for i, p in enumerate(index.peers)}
    for ax, (conc, op) in zip(axes.flat, panels):
        for system, row_op in index.rows():
            if system in LIMIT_CASES:
                color, style, marker, shown = *STYLE_LIMIT[system], "", system
            elif is_kvstore(system):
                if not (row_op == op or (op == "put" and row_op == "put (disk)")):
                    continue
                color = KVSTORE_COLORS.get(system, "tab:blue")
                style, marker = (":", "s") if row_op == "put (disk)" else ("-", "o")
                shown = f"{system} {row_op}"
            else:
                if row_op != op:
                    continue
                color, style, marker, shown = peer_colors[system], "-.", "^", system
            points = [(s, index.get(system, row_op, conc, s)) for s in index.sizes]
            points = [(s, r.gbps) for s, r in points if r is not None]
            if not points:
                continue
            xs, ys = zip(*points)
            ax.plot(xs, ys, linestyle=style, marker=marker, color=color, label=shown, linewidth=1.6, markersize=5)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(index.sizes)
        ax.set_xticklabels([size_label(s) for s in index.sizes])
        ax.set_title(f"{op}, {conc} client process{'es' if conc > 1 else ''}")
        ax.set_ylabel("GB/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in axes[-1]:
        ax.set_xlabel("block size")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
