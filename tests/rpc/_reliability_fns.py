"""What the workers of test_rpc_reliability.py run: commands (sent by the parent through the
harness) and the functions they call on each other through thenable.rpc.

Everything here is module-level so that it pickles by reference.  The module imports only the
standard library, thenable and the other test helpers; numpy is imported inside the functions
that need it.  Commands report small summaries (counts, seconds, type names), never the
payloads or the futures themselves.

Times that the parent compares with its own (the moment it sent SIGKILL) are
``time.monotonic()`` readings: on Linux that is CLOCK_MONOTONIC, one clock for every process
of the machine.
"""

from __future__ import annotations

import contextlib
import gc
import operator
import threading
import time
from collections import Counter as Tally
from typing import Any

import _harness
import _remote_fns
import _shm_fns
from _harness import Failure

import thenable.futures
from thenable import rpc
from thenable.rpc._worker import agent as _agent

MIB = 1 << 20
# A gated handler gives up after this long: far beyond any test (its worker is killed first).
GATE_S = 90.0

init_worker = _remote_fns.init_worker
memfd_mappings = _shm_fns.memfd_mappings
wait_for_no_mappings = _shm_fns.wait_for_no_mappings
owner_table_size = _remote_fns.owner_table_size
settle_references = _remote_fns.settle_references
shutdown_worker = _remote_fns.shutdown_worker


def pending_calls() -> int:
    return _agent.require_agent().pending_count()


def memory_kib() -> dict[str, int]:
    """This process's VmRSS, RssAnon and RssShmem (KiB, from /proc/self/status), after a
    garbage collection."""
    gc.collect()
    out: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                out[key] = int(rest.split()[0])
    return out


def _array(nbytes: int, seed: int) -> Any:
    """A uint8 array of ``nbytes`` whose bytes depend on ``seed`` (cheap to make and check)."""
    import numpy as np

    return (np.arange(nbytes, dtype=np.uint32) * 2654435761 + seed).astype(np.uint8)


def _same(a: Any, b: Any) -> bool:
    import numpy as np

    return bool(a.shape == b.shape and np.array_equal(a, b))


# -- handlers that block on a gate --------------------------------------------------------------

_ARRIVALS: Tally[str] = Tally()
_ARRIVALS_LOCK = threading.Lock()


def _arrive(tag: str, signal_at: int) -> None:
    """Count a gated handler's arrival; tell the parent when the ``signal_at``-th arrives."""
    with _ARRIVALS_LOCK:
        _ARRIVALS[tag] += 1
        arrived = _ARRIVALS[tag]
    if arrived == signal_at:
        _harness.signal(f"{tag}:running")


def gated(tag: str, signal_at: int, i: int) -> int:
    """Block until the gate ``tag`` opens (it never does in these tests); return ``i``."""
    _arrive(tag, signal_at)
    _remote_fns.wait_for_gate(tag, timeout=GATE_S)
    return i


def gated_large(tag: str, signal_at: int, payload: Any) -> int:
    """``gated`` for a call that carries a large array; return its size."""
    _arrive(tag, signal_at)
    _remote_fns.wait_for_gate(tag, timeout=GATE_S)
    return int(payload.nbytes)


def echo_value(value: Any) -> Any:
    return value


# -- calls kept pending across a kill -----------------------------------------------------------


class _Batch:
    """Futures of calls issued together, with the moment each completed."""

    def __init__(self) -> None:
        self.futures: list[thenable.futures.Future[Any]] = []
        self.done_at: dict[int, float] = {}
        self.all_done = threading.Condition()

    def watch(self, future: thenable.futures.Future[Any]) -> None:
        index = len(self.futures)
        self.futures.append(future)

        def on_done(_: thenable.futures.Future[Any]) -> None:
            with self.all_done:
                self.done_at[index] = time.monotonic()
                self.all_done.notify_all()

        future.add_done_callback(on_done)

    def wait(self, timeout: float) -> bool:
        with self.all_done:
            return self.all_done.wait_for(lambda: len(self.done_at) == len(self.futures), timeout)


_BATCHES: dict[str, _Batch] = {}


def start_gated_calls(
    tag: str, to: str, small: int, large: int, nbytes: int, signal_at: int
) -> dict[str, int]:
    """Issue ``small`` gated calls and ``large`` gated calls carrying ``nbytes`` each to
    ``to`` (``signal_at``: see ``gated``), all kept pending under ``tag``.  Returns how many
    were issued and how many of this worker's calls were pending just after."""
    batch = _BATCHES[tag] = _Batch()
    for i in range(small):
        batch.watch(rpc.rpc_async(to, gated, args=(tag, signal_at, i)))
    for i in range(large):
        payload = _array(nbytes, seed=i)
        batch.watch(rpc.rpc_async(to, gated_large, args=(tag, signal_at, payload)))
        del payload
    return {"issued": len(batch.futures), "pending": pending_calls()}


def gated_calls_not_done(tag: str) -> int:
    return sum(not future.done() for future in _BATCHES[tag].futures)


def finish_gated_calls(tag: str, since: float, timeout: float) -> dict[str, Any]:
    """Wait (at most ``timeout``) until every call of ``tag`` has completed; report how.

    Returns: ``total``; ``not_done``; ``succeeded``; ``types`` (type name: count of the
    failures); ``runtime_errors`` and ``connection_errors`` (failures that are instances of
    RuntimeError / ConnectionError); ``before`` (completed before ``since``, a monotonic
    time); ``last_s`` and ``first_s`` (seconds from ``since`` to the last and the first
    completion); ``sample`` (the Failure of one call).
    """
    batch = _BATCHES.pop(tag)
    batch.wait(timeout)
    types: Tally[str] = Tally()
    runtime = connection = succeeded = 0
    sample: Failure | None = None
    for future in batch.futures:
        if not future.done():
            continue
        try:
            future.value()
        except Exception as exc:
            types[_harness.qualified_name(type(exc))] += 1
            runtime += isinstance(exc, RuntimeError)
            connection += isinstance(exc, ConnectionError)
            if sample is None:
                sample = Failure.of(exc)
        else:
            succeeded += 1
    times = sorted(batch.done_at.values())
    return {
        "total": len(batch.futures),
        "not_done": len(batch.futures) - len(batch.done_at),
        "succeeded": succeeded,
        "types": dict(types),
        "runtime_errors": runtime,
        "connection_errors": connection,
        "before": sum(t < since for t in times),
        "last_s": times[-1] - since if times else float("nan"),
        "first_s": times[0] - since if times else float("nan"),
        "sample": sample,
    }


def timed_call(to: str) -> tuple[Any, float]:
    """A new small call to ``to``: (its value or Failure, seconds it took)."""
    start = time.monotonic()
    try:
        outcome: Any = rpc.rpc_sync(to, operator.add, args=(1, 1))
    except Exception as exc:
        outcome = Failure.of(exc)
    return outcome, time.monotonic() - start


def echo_large(to: str, nbytes: int, rounds: int) -> int:
    """``rounds`` echoes of ``nbytes`` through ``to``; how many came back wrong."""
    wrong = 0
    for i in range(rounds):
        payload = _array(nbytes, seed=i)
        wrong += not _same(rpc.rpc_sync(to, echo_value, args=(payload,)), payload)
    return wrong


# -- large payloads streamed from a thread ------------------------------------------------------


def start_stream(tag: str, to: str, nbytes: int, signal_after: int) -> None:
    """Echo ``nbytes`` through ``to`` from a thread, one round trip after another, until one
    fails (this worker or ``to`` is killed: the stream has no other end); signal
    ``{tag}:streaming`` after ``signal_after`` round trips.  Traffic only: what comes back is
    checked by echo_large and soak."""

    def loop() -> None:
        payload = _array(nbytes, seed=len(tag))
        rounds = 0
        with contextlib.suppress(Exception):
            while True:
                rpc.rpc_sync(to, echo_value, args=(payload,))
                rounds += 1
                if rounds == signal_after:
                    _harness.signal(f"{tag}:streaming")

    threading.Thread(target=loop, name=f"stream-{tag}", daemon=True).start()


# -- load ---------------------------------------------------------------------------------------


class _Hold:
    """Replies held back by the callee until ``expected`` calls have arrived."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.lock = threading.Lock()
        self.held: list[tuple[thenable.futures.Future[int], int]] = []
        self.released_at = 0.0


_HOLDS: dict[str, _Hold] = {}


def expect_held_calls(tag: str, expected: int) -> None:
    """Make the callee hold the replies of ``held_add(tag, ...)`` until ``expected`` of those
    calls have arrived; then it answers them all."""
    _HOLDS[tag] = _Hold(expected)


@rpc.functions.async_execution
def held_add(tag: str, value: int) -> thenable.futures.Future[int]:
    """``value + 1``, answered only once every call the callee expects has arrived (without
    a thread per held call: the reply waits on a Future)."""
    hold = _HOLDS[tag]
    future: thenable.futures.Future[int] = thenable.futures.Future()
    with hold.lock:
        hold.held.append((future, value))
        release = len(hold.held) == hold.expected
    if release:
        hold.released_at = time.monotonic()
        held, hold.held = hold.held, []
        for waiting, held_value in held:
            waiting.set_result(held_value + 1)
    return future


def held_calls_released(tag: str) -> dict[str, Any]:
    """Whether the callee answered every held call of ``tag`` (and when: a monotonic time)."""
    hold = _HOLDS.pop(tag)
    return {"still_held": len(hold.held), "released_at": hold.released_at}


def flood(tag: str, to: str, count: int, timeout: float, offset: int = 0) -> dict[str, Any]:
    """Issue ``count`` rpc_async(to, held_add, (tag, offset + i)) without waiting, then wait
    for all (at most ``timeout`` in all) and check every value.  The callee answers none
    before all have arrived (see ``expect_held_calls``), so all are in flight at once.

    Returns: ``lost`` (not done by the deadline), ``wrong`` (a value other than expected),
    ``failed`` (raised; with ``first_failure``), ``peak_pending`` (this worker's pending calls
    once all were issued), ``start`` (a monotonic time), ``issue_s`` and ``total_s`` (seconds
    to issue, and to have every answer).
    """
    start = time.monotonic()
    # (typed Any: rpc_async's type follows held_add's, a Future, not the value it replies)
    futures: list[thenable.futures.Future[Any]] = [
        rpc.rpc_async(to, held_add, args=(tag, offset + i)) for i in range(count)
    ]
    issued = time.monotonic()
    peak = pending_calls()
    deadline = start + timeout
    lost = wrong = failed = 0
    first_failure: Failure | None = None
    for i, future in enumerate(futures):
        try:
            value = future.wait(max(0.0, deadline - time.monotonic()))
        except Exception as exc:
            if not future.done():
                lost += 1
                continue
            failed += 1
            if first_failure is None:
                first_failure = Failure.of(exc)
            continue
        wrong += value != offset + i + 1
    return {
        "lost": lost,
        "wrong": wrong,
        "failed": failed,
        "first_failure": first_failure,
        "peak_pending": peak,
        "start": start,
        "issue_s": issued - start,
        "total_s": time.monotonic() - start,
    }


# -- RRefs held and dropped in bulk -------------------------------------------------------------

_HELD: list[rpc.RRef[Any]] = []


def create_rrefs(owner: str, count: int, check_every: int) -> dict[str, Any]:
    """``count`` remote(owner, Counter, (i,)) values, all kept; every ``check_every``-th is
    read back through ``rpc_async().get()`` (all at once).  Returns how many were checked,
    how many of those were wrong, and the seconds it took."""
    start = time.monotonic()
    _HELD.extend(rpc.remote(owner, _remote_fns.Counter, args=(i,)) for i in range(count))
    checked = list(range(0, count, check_every))
    values = thenable.futures.wait_all(
        [_HELD[i].rpc_async().get() for i in checked], timeout=_remote_fns.WAIT_S
    )
    wrong = sum(value != i for i, value in zip(checked, values, strict=True))
    return {"wrong": wrong, "checked": len(checked), "seconds": time.monotonic() - start}


def drop_rrefs() -> int:
    """Drop every RRef that create_rrefs kept and send the releases now; how many."""
    dropped = len(_HELD)
    _HELD.clear()
    settle_references()
    return dropped


# -- soak ---------------------------------------------------------------------------------------


def soak(peers: list[str], seconds: float, nbytes: int) -> dict[str, Any]:
    """Mixed traffic to ``peers`` in turn for ``seconds``: small rpc_sync, batches of 10
    rpc_async, large echoes (rpc_sync and rpc_async), remote() values fetched with to_here()
    or used through a proxy and dropped.  Every value is checked.

    Returns: ``ops`` (kind: count), ``wrong`` and ``errors`` (the first few, as text).
    """
    deadline = time.monotonic() + seconds
    ops: Tally[str] = Tally()
    wrong: list[str] = []
    errors: list[str] = []
    payload = _array(nbytes, seed=nbytes % 251)
    i = 0
    while time.monotonic() < deadline:
        to = peers[i % len(peers)]
        kind = ("sync", "async", "remote", "large", "proxy", "sync", "async", "large_async")[i % 8]
        try:
            if kind == "sync":
                got: Any = rpc.rpc_sync(to, operator.add, args=(i, 1))
                ok = got == i + 1
            elif kind == "async":
                futures = [rpc.rpc_async(to, operator.mul, args=(i, k)) for k in range(10)]
                got = thenable.futures.wait_all(futures, timeout=_remote_fns.WAIT_S)
                ok = got == [i * k for k in range(10)]
            elif kind == "remote":
                rref = rpc.remote(to, _remote_fns.Counter, args=(i,))
                got = rref.to_here().value
                ok = got == i
                del rref
            elif kind == "proxy":
                rref = rpc.remote(to, _remote_fns.Counter, args=(i,))
                got = rref.rpc_sync().increment(2)
                ok = got == i + 2
                del rref
            elif kind == "large":
                got = rpc.rpc_sync(to, echo_value, args=(payload,))
                ok = _same(got, payload)
            else:
                got = rpc.rpc_async(to, echo_value, args=(payload,)).wait(_remote_fns.WAIT_S)
                ok = _same(got, payload)
            del got
        except Exception as exc:
            if len(errors) < 5:
                errors.append(f"{kind} to {to}: {exc!r}")
            ok = True  # counted as an error, not as a wrong value
            ops["error"] += 1
        if not ok and len(wrong) < 5:
            wrong.append(f"{kind} to {to} (i={i})")
        ops[kind] += 1
        i += 1
    return {"ops": dict(ops), "wrong": wrong, "errors": errors}
