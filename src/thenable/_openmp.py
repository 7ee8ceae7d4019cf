"""OpenMP's idle workers, kept from spinning for milliseconds between torch's parallel ops.

torch's Linux CPU builds run intra-op parallel work (their own and MKL's) on GNU OpenMP.  After
each parallel region, libgomp's team workers spin, waiting for the next region, for up to
300,000 rounds (milliseconds) before they sleep; when libgomp manages more threads than the
process may use CPUs, they spin for 1,000 rounds only.  A process whose torch ops all run on one
thread (a trainer's main thread, say) has a single team, so between its ops one core per team
worker stays busy doing nothing: on a shared machine, or with a parameter server on the same
host, that takes the cores the other workers compute on.  torch's own RPC processes run ops on
several threads (its RPC pool, the distributed autograd engine), so they get the short spin by
accident.

``settle()`` makes sure of it: it starts one team more, in a thread that runs one parallel
region and then sleeps for the life of the process, which takes libgomp past the CPU count.
Nothing is done where the user chose how OpenMP waits (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``),
where torch is not imported (thenable never imports it), uses one intra-op thread, or runs on
another OpenMP than GNU's.
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ("THREAD_NAME", "settle")

THREAD_NAME = "openmp-parked-team"
"""The parked thread's name (not ``thenable-...``: it outlives RPC, as the process's)."""
_GRAIN = 32768  # elements per chunk below which torch's parallel_for runs serially
_USER_CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

_lock = threading.Lock()
_settled = False


def settle() -> bool:
    """Start the parked team if this process needs one and has none yet; whether one runs."""
    global _settled
    with _lock:
        if _settled:
            return True
        torch = sys.modules.get("torch")
        if torch is None or any(name in os.environ for name in _USER_CHOICES):
            return False
        threads = torch.get_num_threads()
        if threads < 2 or not _gnu_openmp_loaded():
            return False
        started = threading.Event()
        thread = threading.Thread(
            target=_park, args=(torch, threads, started), name=THREAD_NAME, daemon=True
        )
        thread.start()
        started.wait()
        _settled = True
        return True


def _park(torch: object, threads: int, started: threading.Event) -> None:
    """Run one parallel region of ``threads`` chunks (this thread's team forms), then sleep."""
    torch.empty(threads * _GRAIN).fill_(1.0)  # type: ignore[attr-defined]
    started.set()
    threading.Event().wait()


def _gnu_openmp_loaded() -> bool:
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            return any("libgomp" in line for line in maps)
    except OSError:  # not Linux
        return False
