"""What the workers of test_rpc_rref_orders.py run: RRefs used in every order the reference
counting protocol must survive (see the design note of ``thenable.rpc._rref``).

Commands named ``check_*`` run on worker0 and return what they saw.  The group has four
workers; worker1 owns the values.
"""

from __future__ import annotations

import gc
import random
import threading
import time
from typing import Any

from _harness import Failure, failure_of
from _remote_fns import (
    WAIT_S,
    CustomError,
    Tracked,
    make_tracked,
    open_gate,
    owner_table_size,
    settle_references,
    tracked_alive,
    wait_for_gate,
)

from thenable import rpc
from thenable.rpc._worker import agent as _agent

WORKERS = ("worker0", "worker1", "worker2", "worker3")

_MARKS: dict[str, threading.Event] = {}
_MARKS_LOCK = threading.Lock()
_RESULTS: dict[Any, Any] = {}
_RESULTS_LOCK = threading.Lock()


def _mark(tag: str) -> threading.Event:
    with _MARKS_LOCK:
        return _MARKS.setdefault(tag, threading.Event())


def marked(tag: str) -> bool:
    return _mark(tag).is_set()


def _wait_marked(owner: str, tag: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not rpc.rpc_sync(owner, marked, args=(tag,)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{tag} was not marked on {owner}")


def record(key: Any, value: Any) -> None:
    with _RESULTS_LOCK:
        _RESULTS[key] = value


def recorded(key: Any) -> Any:
    with _RESULTS_LOCK:
        return _RESULTS.get(key, "<nothing>")


def _settle_all() -> None:
    for name in WORKERS[1:]:
        rpc.rpc_sync(name, settle_references)
    settle_references()


def _owner_table_after_settling(base: int) -> int:
    """worker1's table size once every worker's releases are in (polled, bounded)."""
    size = -1
    for _ in range(200):
        _settle_all()
        size = rpc.rpc_sync("worker1", owner_table_size)
        if size == base:
            break
    return size - base


# -- the owner reads a value remote() is still creating ------------------------------------------


def make_after_gate(tag: str, value: int) -> int:
    return int(wait_for_gate(tag, value))


def fail_after_gate(tag: str) -> int:
    wait_for_gate(tag)
    raise CustomError("creation failed", 5)


def local_value_while_pending(tag: str, rref: rpc.RRef[Any], how: str) -> Any:
    """On the owner: note whether the value is still being created, mark, then read it."""
    pending = not rref._agent.rrefs.value_future(rref._id).done()
    _mark(tag).set()
    try:
        value = rref.local_value() if how == "local_value" else rref.to_here()
    except Exception as exc:
        return pending, Failure.of(exc)
    return pending, value


def set_rpc_timeout(seconds: float) -> float:
    before = rpc.get_rpc_timeout()
    rpc._set_rpc_timeout(seconds)
    return before


def check_owner_reads_wait_for_creation() -> dict[str, Any]:
    """The pattern of torch's examples: ``rpc_sync(rref.owner(), _call_method, (m, rref))``
    right after ``remote()``, overtaking the creation."""
    out: dict[str, Any] = {}
    for how in ("local_value", "to_here"):
        tag = f"create-{how}"
        rref = rpc.remote("worker1", make_after_gate, args=(tag, 41))
        reading = rpc.rpc_async("worker1", local_value_while_pending, args=(tag, rref, how))
        _wait_marked("worker1", tag)
        rpc.rpc_sync("worker1", open_gate, args=(tag,))
        out[how] = reading.wait(WAIT_S)
    rref = rpc.remote("worker1", fail_after_gate, args=("create-fail",))
    reading = rpc.rpc_async(
        "worker1", local_value_while_pending, args=("create-fail", rref, "local_value")
    )
    _wait_marked("worker1", "create-fail")
    rpc.rpc_sync("worker1", open_gate, args=("create-fail",))
    out["failed"] = reading.wait(WAIT_S)
    # Bounded by the owner's RPC timeout: a creation that takes longer fails the read.
    before = rpc.rpc_sync("worker1", set_rpc_timeout, args=(0.3,))
    rref = rpc.remote("worker1", make_after_gate, args=("create-slow", 7))
    out["too_slow"] = rpc.rpc_sync(
        "worker1", local_value_while_pending, args=("create-slow", rref, "local_value")
    )
    rpc.rpc_sync("worker1", set_rpc_timeout, args=(before,))
    rpc.rpc_sync("worker1", open_gate, args=("create-slow",))
    out["after"] = rref.to_here(WAIT_S)
    return out


# -- forwarding along chains, in random orders ---------------------------------------------------


def make_list_after(n: int, seconds: float) -> list[int]:
    if seconds:
        threading.Event().wait(seconds)  # a creation slow enough for requests to overtake it
    return list(range(n))


def bounce(rref: rpc.RRef[Any]) -> rpc.RRef[Any]:
    return rref


def read_on_owner(rref: rpc.RRef[Any]) -> Any:
    return rref.local_value()


def _final(rref: rpc.RRef[Any], how: str) -> Any:
    if how == "to_here":
        return rref.to_here(WAIT_S)
    if how == "proxy":
        return rref.rpc_sync(WAIT_S).copy()
    if how == "remote_proxy":
        return rref.remote(WAIT_S).copy().to_here(WAIT_S)
    return rpc.rpc_sync(rref.owner(), read_on_owner, args=(rref,), timeout=WAIT_S)


def hop(rref: rpc.RRef[Any], hops: list[tuple[str, str]], how: str, key: int) -> None:
    """Pass ``rref`` on as ``hops`` says (each hop returns at once unless it is "sync"), and
    at the end read it as ``how`` says, recording what came on worker0."""
    try:
        if not hops:
            rpc.rpc_async("worker0", record, args=(key, _final(rref, how)))
            return
        (kind, to), rest = hops[0], hops[1:]
        if kind == "sync":
            rpc.rpc_sync(to, hop, args=(rref, rest, how, key))
        elif kind == "async":
            rpc.rpc_async(to, hop, args=(rref, rest, how, key))
        elif kind == "remote":
            rpc.remote(to, hop, args=(rref, rest, how, key))
        else:  # "bounce": the reference comes back in a reply, then goes on from here
            back = rpc.rpc_sync(to, bounce, args=(rref,))
            del rref
            hop(back, rest, how, key)
    except Exception as exc:
        rpc.rpc_async("worker0", record, args=(key, Failure.of(exc)))


def check_forwarding_in_random_orders(seed: int, rounds: int) -> dict[str, Any]:
    """worker0 makes a value on worker1 with remote() (some creations slow), hands it to a
    random chain of hops (to any worker, the owner and itself included), and drops its own
    reference at once; the last hop reads the value.  Every read must give the value, and
    the owner must free every one of them in the end."""
    _settle_all()
    base = rpc.rpc_sync("worker1", owner_table_size)
    chooser = random.Random(seed)
    expected: dict[int, list[int]] = {}
    for key in range(rounds):
        hops = [
            (chooser.choice(("sync", "async", "remote", "bounce")), chooser.choice(WORKERS))
            for _ in range(chooser.randrange(1, 6))
        ]
        how = chooser.choice(("to_here", "proxy", "remote_proxy", "local_value"))
        size = key % 7
        slow = chooser.choice((0.0, 0.0, 0.0, 0.005, 0.02))
        rref = rpc.remote("worker1", make_list_after, args=(size, slow))
        rpc.rpc_async("worker0", hop, args=(rref, hops, how, key))
        del rref
        expected[key] = list(range(size))
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and any(recorded(k) == "<nothing>" for k in expected):
        rpc.rpc_sync("worker1", owner_table_size)  # (a round trip: no sleeping)
    wrong = {k: recorded(k) for k, value in expected.items() if recorded(k) != value}
    return {"wrong": wrong, "left": _owner_table_after_settling(base)}


# -- a message pickled twice ---------------------------------------------------------------------


def take_and_drop(rref: rpc.RRef[Any], data: Any) -> int:
    return len(data)


def send_own_rref_with_a_slice(to: str, tag: str) -> int:
    """On worker1: pass an RRef it owns (case 1), beside a small slice of a large array."""
    import numpy as np

    rref = rpc.RRef(make_tracked(tag))
    big = np.zeros(1 << 20)
    return int(rpc.rpc_sync(to, take_and_drop, args=(rref, big[:8])))


def check_rref_beside_a_trimmed_array() -> dict[str, Any]:
    """dumps() pickles a message a second time to trim a large array to the slice sent: the
    RRefs in it must not get a second fork (which no one would ever release)."""
    import numpy as np

    _settle_all()
    base = rpc.rpc_sync("worker1", owner_table_size)
    big = np.zeros(1 << 20)
    rref = rpc.remote("worker1", make_tracked, args=("trimmed",))
    sent = [
        rpc.rpc_sync("worker2", take_and_drop, args=(rref, big[:8])),  # case 3
        rpc.rpc_sync("worker1", take_and_drop, args=(rref, big[:8])),  # case 2
        rpc.rpc_sync("worker1", send_own_rref_with_a_slice, args=("worker2", "trimmed-own")),
    ]
    del rref
    return {
        "sent": sent,
        "left": _owner_table_after_settling(base),
        "alive": [
            rpc.rpc_sync("worker1", tracked_alive, args=(t,)) for t in ("trimmed", "trimmed-own")
        ],
    }


# -- a request to the owner that times out before the owner has read it -------------------------


class GatedOnLoad:
    """An argument whose unpickling waits for a gate on the receiver."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __reduce__(self) -> tuple[Any, ...]:
        return (wait_for_gate, (self.tag, self.tag))


def read_tracked_late(tag: str, rref: rpc.RRef[Tracked]) -> None:
    """On the owner, once the request could be read: record what the reference gives."""
    try:
        record(tag, rref.local_value().tag)
    except Exception as exc:
        record(tag, Failure.of(exc))


def check_timed_out_request_keeps_its_rref() -> dict[str, Any]:
    """A request carrying an RRef to its owner times out while the owner still reads it (its
    unpickling waits on a gate).  The sender drops its reference meanwhile: the value must
    stay alive until the owner has read the request."""
    _settle_all()
    base = rpc.rpc_sync("worker1", owner_table_size)
    tag = "late-read"
    rref = rpc.remote("worker1", make_tracked, args=(tag,))
    rref.to_here(WAIT_S)
    late = rpc.rpc_async("worker1", read_tracked_late, args=(GatedOnLoad(tag), rref), timeout=0.3)
    del rref
    out: dict[str, Any] = {"timed_out": failure_of(late.wait, WAIT_S)}
    del late
    gc.collect()
    settle_references()  # our dropped reference's release, if any, is at the owner now
    out["alive_while_unread"] = rpc.rpc_sync("worker1", tracked_alive, args=(tag,))
    rpc.rpc_sync("worker1", open_gate, args=(tag,))
    deadline = time.monotonic() + WAIT_S
    while rpc.rpc_sync("worker1", recorded, args=(tag,)) == "<nothing>":
        if time.monotonic() > deadline:
            break
    out["read"] = rpc.rpc_sync("worker1", recorded, args=(tag,))
    out["left"] = _owner_table_after_settling(base)
    agent = _agent.require_agent()
    with agent._lock:
        out["pending"] = agent._calls.snapshot_locked()[1]  # (late holds)
    return out
