"""What every benchmark's parent and children share to run processes side by side: a free
port, the children's reports, the end of a worker's log, and reaping what a run started."""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ("Reporter", "free_port", "reap", "tail")


class Reporter:
    """Sends (rank, kind, payload) tuples to the parent and remembers the current phase."""

    def __init__(self, q: Any, rank: int) -> None:
        self.q = q
        self.rank = rank
        self.phase = "start"

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.q.put((self.rank, "phase", phase))

    def value(self, name: str, value: float) -> None:
        self.q.put((self.rank, "value", (name, float(value))))

    def error(self, text: str) -> None:
        self.q.put((self.rank, "error", f"rank {self.rank}, during {self.phase}: {text}"))

    def done(self) -> None:
        self.q.put((self.rank, "done", None))


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a worker's log."""
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def reap(procs: Sequence[Any], grace_s: float) -> None:
    """Join, then terminate, then kill: nothing outlives its run."""
    end = time.perf_counter() + grace_s
    for p in procs:
        p.join(timeout=max(0.1, end - time.perf_counter()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=3.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=3.0)
