"""What the workers of test_shm.py run: commands (sent by the parent through the harness) and
the functions they call on each other through thenable.rpc.

Everything here is module-level so that it pickles by reference.  numpy and torch are
imported inside the functions that need them.  Commands report small summaries (booleans,
counts, digests), never the large payloads themselves.
"""

from __future__ import annotations

import gc
import hashlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import _harness
import _remote_fns

from thenable import rpc
from thenable.rpc._worker import agent as _agent

# What a segment's mapping is called in /proc/<pid>/maps (see _shm.Outbox._create).
MEMFD_NAME = "memfd:thenable-rpc"
MIB = 1 << 20

# What this worker received through keep_and_echo, by key: the test inspects it later.
_KEPT: dict[str, Any] = {}


# -- commands: lifecycle ------------------------------------------------------------------------


init_worker = _remote_fns.init_worker  # same_host_ipc=False: TCP between these workers


def shutdown_and_count(graceful: bool = True) -> tuple[int, int]:
    """Shut RPC down: this worker's segment mappings before, and after once every thenable
    thread has ended (joined for at most 10 s: a connection that its peer closed at the same
    time may still be closing in its reader thread when shutdown returns).

    The connections are kept alive meanwhile, so that only their closing can have unmapped
    their segments (not the garbage collector).
    """
    agent = _agent.require_agent()
    with agent._lock:
        keep = list(agent._all_connections)
    before = memfd_mappings()
    rpc.shutdown(graceful=graceful)
    _harness.join_thenable_threads(10.0)
    after = memfd_mappings()
    assert all(conn.closed for conn in keep)
    return before, after


def forget_quickly(idle_s: float) -> None:
    """Make this worker free shared memory and recycled payload memory left unused for
    ``idle_s`` seconds, and look for them 20 times as often."""
    from thenable.rpc._net import memory as _recycled
    from thenable.rpc._net import shm as _shm
    from thenable.rpc._net import transport as _transport

    _shm.IDLE_S = idle_s
    _recycled.IDLE_S = idle_s
    _transport.IDLE_CHECK_S = idle_s / 20


def wait_until_freed(timeout: float) -> dict[str, Any]:
    """Poll (bounded by ``timeout``) until this worker holds no segment, mapping or pooled
    payload memory; the last report, with the pooled bytes."""
    from thenable.rpc._net import memory as _recycled

    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        state = {**report(), "pooled": _recycled.pooled_bytes()}
        if state["segments"] == state["maps"] == state["pooled"] == 0:
            return state
        if time.monotonic() > deadline:
            return state
        time.sleep(0.02)  # polling for the watchdog's next look


# -- commands: what the process holds -----------------------------------------------------------


def memfd_mappings() -> int:
    """Lines of /proc/self/maps that map a thenable segment."""
    with open("/proc/self/maps") as maps:
        return sum(MEMFD_NAME in line for line in maps)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd_ranges() -> list[tuple[int, int]]:
    """The address ranges of this process's segment mappings (start, end)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if MEMFD_NAME in line:
                start, end = line.split(maxsplit=1)[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    return ranges


def _in_shared_memory(value: Any) -> bool:
    """Whether the memory of an array or tensor (or of any in a tuple) lies in a segment."""
    if isinstance(value, tuple):
        return any(_in_shared_memory(item) for item in value)
    if hasattr(value, "data_ptr"):  # a torch tensor
        storage = value.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
    else:  # a numpy array
        start, size = value.ctypes.data, value.nbytes
    return any(start < end and low < start + size for low, end in memfd_ranges())


def _open_connections() -> list[Any]:
    agent = _agent.require_agent()
    with agent._lock:
        return list(agent._all_connections)


def connections() -> dict[str, Any]:
    """This worker's open connections: how many are Unix-domain, the segments they hold
    (sender's and receiver's ends together), the most one connection holds at each end,
    and how many of the sending ends' segments wait for the peer's RELEASE."""
    conns = _open_connections()
    outboxes = [conn._outbox for conn in conns if conn._outbox is not None]
    inboxes = [conn._inbox for conn in conns if conn._inbox is not None]
    sending = [outbox.segment_count() for outbox in outboxes]
    receiving = [inbox.segment_count() for inbox in inboxes]
    return {
        "local": sum(conn.is_local for conn in conns),
        "tcp": sum(not conn.is_local for conn in conns),
        "segments": sum(sending) + sum(receiving),
        "max_sending": max(sending, default=0),
        "max_receiving": max(receiving, default=0),
        "busy": busy_segments(),
    }


def busy_segments() -> int:
    """Segments of this worker's sending ends that wait for the peer's RELEASE: as many as
    the messages that the peers still hold."""
    busy = 0
    for conn in _open_connections():
        if conn._outbox is not None:
            busy += conn._outbox.segment_count() - conn._outbox.free_count()
    return busy


def report() -> dict[str, Any]:
    """Mappings, descriptors and connections of this worker, in one command."""
    return {"maps": memfd_mappings(), "fds": open_fds(), **connections()}


def link_kinds(peers: list[str]) -> dict[str, Any]:
    """Call every peer once, then say which of this worker's links are Unix-domain."""
    agent = _agent.require_agent()
    for peer in peers:
        rpc.rpc_sync(peer, noop)
    with agent._lock:
        links = dict(agent._links)
    return {
        "is_local": {rank: link.is_local for rank, link in links.items()},
        "local_listener": agent.local_listener is not None,
        "published_local": agent.address().local is not None,
    }


_HELD: list[Any] = []


def hold_connections() -> int:
    """Keep this worker's connections alive (until drop_connections), so that only closing
    them can unmap their segments, not the garbage collector; how many."""
    agent = _agent.require_agent()
    with agent._lock:
        _HELD.extend(agent._all_connections)
    return len(_HELD)


def drop_connections() -> None:
    _HELD.clear()


def wait_until_idle(timeout: float) -> tuple[int, float]:
    """Poll until no segment of this worker's sending ends is busy (its peers hold nothing
    it sent, and their RELEASEs have arrived), at most ``timeout``: (busy, seconds)."""
    return _poll_until_zero(busy_segments, timeout)


def drop_kept() -> int:
    """Drop what keep_and_echo kept (and collect any garbage that still refers to it): the
    segments it was lent from go back to their senders.  How many values were dropped."""
    dropped = len(_KEPT)
    _KEPT.clear()
    gc.collect()
    return dropped


def drop_kept_and_count() -> int:
    """drop_kept, then this worker's segment mappings."""
    drop_kept()
    return memfd_mappings()


def wait_for_no_mappings(timeout: float) -> tuple[int, float]:
    """Poll until this worker maps no segment (at most ``timeout``): (mappings, seconds)."""
    return _poll_until_zero(memfd_mappings, timeout)


def _poll_until_zero(count: Callable[[], int], timeout: float) -> tuple[int, float]:
    """Call ``count`` every 5 ms until it returns 0 or ``timeout`` passes: (last, seconds).
    (Polling: what is awaited happens in other threads and processes, with no event.)"""
    start = time.monotonic()
    while True:
        last = count()
        elapsed = time.monotonic() - start
        if last == 0 or elapsed > timeout:
            return last, elapsed
        time.sleep(0.005)


# -- what workers call on each other ------------------------------------------------------------


def noop() -> None:
    return None


def echo_value(value: Any) -> Any:
    return value


def keep_and_echo(key: str, value: Any) -> Any:
    """Keep what arrived (for kept_state / mutate_kept) and send it back."""
    _KEPT[key] = value
    return value


def kept_state(key: str) -> dict[str, Any]:
    """The digest of what keep_and_echo kept, and whether it lies in shared memory (also a
    command: it works after shutdown)."""
    value = _KEPT[key]
    return {"digest": digest(value), "in_shm": _in_shared_memory(value)}


def mutate_kept(key: str) -> str:
    """Change the kept value in place; its new digest."""
    mutate(_KEPT[key])
    return digest(_KEPT[key])


# -- payloads -----------------------------------------------------------------------------------


def make_payload(kind: str, seed: int, nbytes: int = 8 * MIB) -> Any:
    """``array`` (uint8), ``tensor`` (torch float32) or ``views`` (two overlapping views of one
    float64 array) of ``nbytes`` in all, filled from ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if kind == "array":
        return rng.integers(0, 256, size=nbytes, dtype=np.uint8)
    if kind == "tensor":
        import torch

        return torch.from_numpy(rng.random(nbytes // 4, dtype=np.float32)).reshape(-1, 1024)
    if kind == "views":
        base = rng.random(nbytes // 8)
        return base[:-1000], base[500:]
    raise ValueError(kind)


def digest(value: Any) -> str:
    import numpy as np

    if isinstance(value, tuple):
        return "/".join(digest(item) for item in value)
    if hasattr(value, "numpy"):  # a torch tensor
        value = value.numpy()
    return hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()


def mutate(value: Any) -> None:
    """Change ``value`` in place (for ``views``: the first view, which the second shares)."""
    if isinstance(value, tuple):
        value = value[0]
    flat = value.reshape(-1)
    flat[600] += 1


def _shares_memory(value: Any) -> bool:
    import numpy as np

    return bool(np.shares_memory(value[0], value[1]))


# -- commands: checks (worker0 calls ``to``) ----------------------------------------------------


def check_echo(to: str, kind: str) -> dict[str, Any]:
    """Echo a large payload through ``to`` and report what the two copies do.

    Both received copies are lent by their receivers' segments (``back_in_shm`` here,
    ``there_in_shm`` in ``to``), in different segments: each end's own sending segments.
    """
    key = f"{kind}-1"
    sent = make_payload(kind, seed=1)
    sent_digest = digest(sent)
    back = rpc.rpc_sync(to, keep_and_echo, args=(key, sent))
    out: dict[str, Any] = {
        "type": type(back).__name__,
        "equal": digest(back) == sent_digest,
        "back_in_shm": _in_shared_memory(back),
        "mapped_after_trip": memfd_mappings(),
    }
    there = rpc.rpc_sync(to, kept_state, args=(key,))
    out["there_equal"] = there["digest"] == sent_digest
    out["there_in_shm"] = there["in_shm"]
    if kind == "views":
        out["back_shares"] = _shares_memory(back)
        out["there_shares"] = rpc.rpc_sync(to, _kept_shares, args=(key,))
        before = back[1].reshape(-1)[100]
        mutate(back)  # back[0][600] is back[1][100]
        out["back_views_linked"] = bool(back[1].reshape(-1)[100] == before + 1)
    else:
        mutate(back)
    mutated_back = digest(back)
    out["back_changed"] = mutated_back != sent_digest
    out["there_unchanged_by_back"] = (
        rpc.rpc_sync(to, kept_state, args=(key,))["digest"] == sent_digest
    )
    mutated_there = rpc.rpc_sync(to, mutate_kept, args=(key,))
    out["there_changed"] = mutated_there != sent_digest
    out["back_unchanged_by_there"] = digest(back) == mutated_back
    # The next trips reuse the same segments: neither copy may see them.
    second = make_payload(kind, seed=2)
    back2 = rpc.rpc_sync(to, keep_and_echo, args=(f"{kind}-2", second))
    out["second_equal"] = digest(back2) == digest(second)
    out["back_intact_after_next_trip"] = digest(back) == mutated_back
    out["there_intact_after_next_trip"] = (
        rpc.rpc_sync(to, kept_state, args=(key,))["digest"] == mutated_there
    )
    out["sent_unchanged"] = digest(sent) == sent_digest
    return out


def _kept_shares(key: str) -> bool:
    return _shares_memory(_KEPT[key])


def echo_loop(to: str, rounds: int, nbytes: int) -> int:
    """``rounds`` echoes of ``nbytes`` through ``to``; how many came back wrong."""
    import numpy as np

    payload = make_payload("array", seed=rounds, nbytes=nbytes)
    wrong = 0
    for _ in range(rounds):
        back = rpc.rpc_sync(to, echo_value, args=(payload,))
        wrong += not np.array_equal(back, payload)
    return wrong


def keep_many(to: str, count: int, nbytes: int) -> list[dict[str, Any]]:
    """Send ``count`` payloads to ``to``, which keeps each (as ``many-{i}``); per trip: the
    payload's digest, whether the echo came back equal, and how many of this worker's
    sending segments are busy afterwards (the echo itself is dropped at once)."""
    trips = []
    for i in range(count):
        payload = make_payload("array", seed=100 + i, nbytes=nbytes)
        back = rpc.rpc_sync(to, keep_and_echo, args=(f"many-{i}", payload))
        trips.append({"digest": digest(payload), "equal": digest(back) == digest(payload)})
        del back
        trips[-1]["busy"] = busy_segments()
    return trips


def echo_in_background(to: str, nbytes: int, signal_after: int) -> None:
    """Echo large payloads through ``to`` from a thread, without end (until this worker is
    killed); signal ``echoing`` after ``signal_after`` round trips."""

    def loop() -> None:
        payload = make_payload("array", seed=7, nbytes=nbytes)
        done = 0
        while True:
            rpc.rpc_sync(to, echo_value, args=(payload,))
            done += 1
            if done == signal_after:
                _harness.signal("echoing", memfd_mappings())

    threading.Thread(target=loop, name="echo-in-background", daemon=True).start()
