"""A small 3-worker job for test_trace_rpc.py, run with ``thenable launch -n 3``.

``python _traced_job.py trace OUT.json``: rank 0 records the job with ``thenable.trace``;
``python _traced_job.py env``: the same work, recorded by ``THENABLE_TRACE``;
``python _traced_job.py stats OUT.json``: rank 0 writes ``rpc.get_stats`` snapshots instead.

The work: a plain call, an ``@async_execution`` call that calls on, an RRef made and fetched,
a call made from a forked task, and a 1 MiB array (sent through shared memory).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

import numpy as np

import thenable
from thenable import rpc

_RELEASE = threading.Event()


def add(a: int, b: int) -> int:
    time.sleep(0.002)
    return a + b


@rpc.functions.async_execution
def add_on(to: str, a: int, b: int) -> thenable.Future[int]:
    return rpc.rpc_async(to, add, (a, b)).then(lambda done: done.value() * 10)


def total(array: Any) -> float:
    return float(array.sum())


def wait_for_release() -> str:
    _RELEASE.wait(30)
    return "released"


def release() -> None:
    _RELEASE.set()


def work() -> None:
    assert rpc.rpc_sync("worker1", add, (1, 2)) == 3
    chained: object = rpc.rpc_sync("worker1", add_on, ("worker2", 1, 2))  # (the Future's value)
    assert chained == 30
    rref = rpc.remote("worker2", add, (3, 4))
    assert rref.to_here() == 7
    forked = thenable.fork(rpc.rpc_sync, "worker2", add, (5, 6))
    assert thenable.wait(forked) == 11
    assert rpc.rpc_sync("worker1", total, (np.ones(1 << 17),)) == float(1 << 17)


def stats(out: str) -> None:
    """Snapshots while a call is held in worker1's handler and an RRef lives on worker2."""
    held = rpc.rpc_async("worker1", wait_for_release)
    deadline = time.monotonic() + 30
    while rpc.get_stats("worker1")["requests_unanswered"] < 1:
        assert time.monotonic() < deadline, "the held call never started"
    rref = rpc.remote("worker2", add, (1, 1))
    assert rref.to_here() == 2
    snapshots: dict[str, Any] = {
        "local_during": rpc.get_stats(),
        "worker1_during": rpc.get_stats("worker1"),
        "worker2_during": rpc.get_stats("worker2"),
    }
    rpc.rpc_sync("worker1", release)
    assert held.wait() == "released"
    # (remote()'s creation call may still be answering: every call ends, within the deadline)
    while rpc.get_stats()["calls_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.001)
    snapshots["local_after"] = rpc.get_stats()
    del rref
    try:
        rpc.get_stats("nobody")
    except rpc.UnknownWorkerError as exc:
        snapshots["unknown"] = str(exc)
    with open(out, "w") as file:
        json.dump(snapshots, file)


def main() -> None:
    mode = sys.argv[1]
    rank = int(os.environ["RANK"])
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=3)
    if rank == 0:
        if mode == "trace":
            with thenable.trace(sys.argv[2]):
                work()
        elif mode == "env":
            work()
        else:
            stats(sys.argv[2])
    rpc.shutdown()


if __name__ == "__main__":
    main()
