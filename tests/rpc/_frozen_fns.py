"""Worker-side commands for test_rpc_frozen_peer: calls to a peer that the test has frozen
(SIGSTOP), timed from the caller's side.

Each command returns plain data (times, outcome type names) for the parent to assert on.  The
calls are issued from a thread of their own that the command waits for with a bound, so that
a caller blocked inside ``rpc_async`` shows up as ``blocked`` instead of hanging the test.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from thenable import rpc
from thenable.futures import Future
from thenable.rpc._worker import agent as _agent


def init(
    rank: int,
    world_size: int,
    port: int,
    *,
    same_host_ipc: bool = True,
    rpc_timeout: float = 30.0,
    **options: Any,
) -> None:
    """init_rpc as ``worker{rank}``; ``options``: more RpcBackendOptions (heartbeat_s...)."""
    options.setdefault("heartbeat_s", 0.0)  # (default 10 s: longer than these tests' freezes)
    rpc.init_rpc(
        f"worker{rank}",
        rank=rank,
        world_size=world_size,
        rpc_backend_options=rpc.RpcBackendOptions(
            init_method=f"tcp://127.0.0.1:{port}",
            rpc_timeout=rpc_timeout,
            same_host_ipc=same_host_ipc,
            **options,
        ),
    )


def echo(*args: Any) -> tuple[Any, ...]:
    return args


def pattern(nbytes: int, seed: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Bytes that differ from call to call, so a stream mixed up anywhere shows."""
    return ((np.arange(nbytes, dtype=np.int64) * 7 + seed) % 251).astype(np.uint8)


def check_echoes(to: str, nbytes: int, count: int) -> bool:
    """``count`` echoes of distinct ``nbytes`` arrays come back equal to what was sent."""
    futures = [
        (seed, rpc.rpc_async(to, echo, args=(pattern(nbytes, seed),), timeout=30))
        for seed in range(count)
    ]
    return all(np.array_equal(f.wait()[0], pattern(nbytes, seed)) for seed, f in futures)


def _outcome(future: Future[Any], wait_s: float = 0.0) -> str:
    """How ``future`` ended ("ok" or its exception's type name), waiting up to ``wait_s``."""
    try:
        future.wait(wait_s) if wait_s else future.value()
    except BaseException as exc:
        return type(exc).__name__
    return "ok"


def issue_calls(
    to: str, count: int, nbytes: int, timeout: float, give_up_s: float
) -> dict[str, Any]:
    """From one thread, ``count`` rpc_async echoes of ``nbytes`` each with ``timeout``.

    Returns ``blocked`` (the thread was still inside rpc_async after ``give_up_s``), the
    longest single rpc_async call, each call's outcome, and how long after its own deadline
    each call completed (the latest of them).
    """
    done_at: dict[int, float] = {}
    issued_at: dict[int, float] = {}
    futures: dict[int, Future[Any]] = {}
    longest = [0.0]
    lock = threading.Lock()

    def completed(index: int) -> None:
        with lock:
            done_at[index] = time.monotonic()

    def issue() -> None:
        payload = np.ones(nbytes, np.uint8) if nbytes else 0
        for index in range(count):
            began = time.monotonic()
            future = rpc.rpc_async(to, echo, args=(payload,), timeout=timeout)
            took = time.monotonic() - began
            longest[0] = max(longest[0], took)
            issued_at[index] = began
            futures[index] = future
            future.add_done_callback(functools.partial(_completed_at, completed, index))

    thread = threading.Thread(target=issue, name="frozen-peer caller", daemon=True)
    thread.start()
    thread.join(give_up_s)
    if thread.is_alive():
        return {"blocked": True, "issued": len(futures)}
    outcomes = {_outcome(future, timeout + 30) for future in futures.values()}
    with lock:
        lateness = max(done_at[i] - issued_at[i] - timeout for i in futures)
    return {
        "blocked": False,
        "issued": len(futures),
        "longest_call_s": longest[0],
        "outcomes": outcomes,
        "late": lateness,
    }


def calls_to_unreachable(to: str, count: int, timeout: float) -> dict[str, Any]:
    """``count`` rpc_async no-ops to a worker that cannot be reached: the longest rpc_async,
    each outcome with its message, and when the last one failed (after the first was issued)."""
    longest = 0.0
    futures = []
    start = time.monotonic()
    for _ in range(count):
        began = time.monotonic()
        futures.append(rpc.rpc_async(to, echo, args=(1,), timeout=timeout))
        longest = max(longest, time.monotonic() - began)
    outcomes = set()
    for future in futures:
        try:
            future.wait(timeout + 30)
        except BaseException as exc:
            outcomes.add((type(exc).__name__, str(exc)))
        else:
            outcomes.add(("ok", ""))
    return {"longest_call_s": longest, "outcomes": outcomes, "all_s": time.monotonic() - start}


def sync_call(to: str, nbytes: int, timeout: float) -> tuple[str, float]:
    """One rpc_sync echo of ``nbytes`` with ``timeout``: its outcome and how long it took."""
    began = time.monotonic()
    try:
        rpc.rpc_sync(to, echo, args=(np.ones(nbytes, np.uint8),), timeout=timeout)
        outcome = "ok"
    except BaseException as exc:
        outcome = type(exc).__name__
    return outcome, time.monotonic() - began


def fill_queue(to: str, nbytes: int, count: int) -> dict[str, Any]:
    """``count`` rpc_async echoes of ``nbytes`` (no timeout) to a frozen peer: which failed
    at once, and the message of the first of them."""
    refused: list[int] = []
    message = ""
    futures = []
    for index in range(count):
        future = rpc.rpc_async(to, echo, args=(np.ones(nbytes, np.uint8),), timeout=0)
        futures.append(future)
        if future.done():
            try:
                future.value()
            except rpc.SendQueueFullError as exc:
                refused.append(index)
                message = message or str(exc)
                assert isinstance(exc, ConnectionError) and isinstance(exc, RuntimeError)
    _HELD.extend(futures)
    return {"refused": refused, "message": message}


_HELD: list[Future[Any]] = []


def held_outcomes(timeout: float) -> list[str]:
    """How the calls of ``fill_queue`` ended (waiting up to ``timeout`` for each)."""
    outcomes = [_outcome(future, timeout) for future in _HELD]
    _HELD.clear()
    return outcomes


def wait_for_connection_loss(to: str, timeout: float) -> tuple[str, str, float]:
    """A call with a long timeout to a frozen peer: how it failed, its message, and when."""
    began = time.monotonic()
    future = rpc.rpc_async(to, echo, args=(1,), timeout=timeout)
    try:
        future.wait(timeout + 30)
        return "ok", "", time.monotonic() - began
    except BaseException as exc:
        return type(exc).__name__, str(exc), time.monotonic() - began


def pending_calls() -> int:
    return _agent.require_agent().pending_count()


def shutdown(graceful: bool) -> None:
    rpc.shutdown(graceful=graceful)


def _completed_at(completed: Callable[[int], None], index: int, _: Future[Any]) -> None:
    """A done-callback: tell ``completed`` which call finished."""
    completed(index)
