"""Draw a merged trace to a picture: one row per worker thread, spans as bars.

For the documentation's timelines and a quick look without a trace viewer; Perfetto remains
the tool to explore a trace.  Needs matplotlib (imported here only).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["plot_trace"]

# Bar colours by span category; flow arrows are drawn in grey.
_COLOURS = {
    "rpc": "#4c72b0",
    "fork": "#55a868",
    "callback": "#dd8452",
    "wait": "#c8c8c8",
    "shm": "#8172b3",
    "autograd": "#c44e52",
}


def plot_trace(
    trace: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    categories: tuple[str, ...] | None = None,
    last_ms: float | None = None,
) -> Path:
    """Draw ``trace`` (a merged Chrome trace) to ``path`` (PNG, SVG...: by its suffix).

    Args:
        title: the picture's title.
        categories: span categories to draw (default: all); rows without spans are left out.
        last_ms: draw only the trace's last milliseconds (the steady state of a run, past its
            start-up); None draws it all.

    Raises:
        ImportError: matplotlib is not installed (``pip install matplotlib``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise ImportError("drawing a trace needs matplotlib: pip install matplotlib") from exc

    names: dict[tuple[int, int], str] = {}
    processes: dict[int, str] = {}
    order: dict[int, int] = {}
    spans: dict[tuple[int, int], list[tuple[float, float, str]]] = defaultdict(list)
    flows: dict[Any, dict[str, tuple[float, tuple[int, int]]]] = defaultdict(dict)
    finishes = [e["ts"] + e.get("dur", 0) for e in trace["traceEvents"] if e["ph"] != "M"]
    since = max(finishes, default=0) - last_ms * 1000 if last_ms is not None else float("-inf")
    for event in trace["traceEvents"]:
        phase, key = event["ph"], (event["pid"], event["tid"])
        if phase == "M":
            if event["name"] == "process_name":
                processes[event["pid"]] = event["args"]["name"]
            elif event["name"] == "process_sort_index":
                order[event["pid"]] = event["args"]["sort_index"]
            elif event["name"] == "thread_name":
                names[key] = event["args"]["name"]
        elif phase == "X" and (categories is None or event.get("cat") in categories):
            begin, end = max(event["ts"], since), event["ts"] + event["dur"]
            if end >= since:
                spans[key].append((begin, end - begin, event.get("cat", "")))
        elif phase in ("s", "f") and event["ts"] >= since:
            flows[event["id"]][phase] = (event["ts"], key)
    rows = sorted(spans, key=lambda k: (order.get(k[0], k[0]), k[0], min(s[0] for s in spans[k])))
    index = {key: i for i, key in enumerate(rows)}
    figure, axes = plt.subplots(figsize=(12, 0.9 + 0.42 * max(1, len(rows))))
    for key, row in index.items():
        drawn = sorted(spans[key], key=lambda span: -span[1])  # nested, shorter spans on top
        bars = [(start / 1000, max(duration / 1000, 0.002)) for start, duration, _ in drawn]
        colours = [_COLOURS.get(category, "#937860") for _, _, category in drawn]
        axes.broken_barh(bars, (row - 0.35, 0.7), facecolors=colours, edgecolors="none")
    for ends in flows.values():
        if "s" in ends and "f" in ends and ends["s"][1] in index and ends["f"][1] in index:
            (t0, a), (t1, b) = ends["s"], ends["f"]
            if a[0] != b[0]:  # only the arrows between workers: within one they crowd the rows
                axes.annotate(
                    "",
                    xy=(t1 / 1000, index[b]),
                    xytext=(t0 / 1000, index[a]),
                    arrowprops={"arrowstyle": "->", "color": "#777777", "lw": 0.6},
                )
    labels = [f"{processes.get(pid, pid)}: {names.get((pid, tid), tid)}" for pid, tid in rows]
    axes.set_yticks(range(len(rows)), labels, fontsize=7)
    axes.set_ylim(len(rows) - 0.5, -0.5)
    axes.set_xlabel("time (ms)")
    used = sorted({category for key in rows for _, _, category in spans[key]})
    handles = [Patch(color=_COLOURS.get(c, "#937860"), label=c) for c in used]
    axes.legend(
        handles=handles,
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=7,
        ncol=len(handles) or 1,
        frameon=False,
    )
    axes.grid(axis="x", alpha=0.3)
    if title:
        axes.set_title(title, fontsize=10, loc="left")
    figure.tight_layout()
    target = Path(path)
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target
