"""What every benchmark's report shares: the environment line, plain tables, and the median
and worst of per-round values (a round that measured nothing gives None, and is skipped)."""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections.abc import Iterable, Sequence

__all__ = ("environment", "median", "plain", "worst")


def environment() -> str:
    """Python, torch, machine, CPUs and load average, for the top and the end of a report."""
    try:
        import torch

        torch_version = str(torch.__version__)
    except ImportError:
        torch_version = "not installed"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return (
        f"Python {platform.python_version()}, torch {torch_version}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def plain(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table in aligned plain text."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None; None if there are none."""
    measured = [value for value in values if value is not None]
    return statistics.median(measured) if measured else None


def worst(values: Iterable[float | None], larger_is_worse: bool = True) -> float | None:
    """The worst of the values that are not None (the largest, or the smallest); None if there
    are none."""
    measured = [value for value in values if value is not None]
    if not measured:
        return None
    return max(measured) if larger_is_worse else min(measured)
