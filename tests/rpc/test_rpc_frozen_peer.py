"""A frozen peer (SIGSTOP: no FIN, no RST) never blocks its callers beyond their timeouts.

``rpc_async`` returns at once whatever the peer does: bytes the socket does not take wait in
the connection's backlog; a call whose timeout passes while its request waits untouched there
fails with TimeoutError and the request is never sent; beyond ``max_send_queue_bytes`` a call
fails at once with SendQueueFullError.  After SIGCONT the stream is intact (nothing half
written) and calls work again.  With a heartbeat, a frozen peer is reported unreachable
(``RpcConnectionError``) without any call's timeout.  A peer frozen before the first contact
is no different (the connect runs in a thread of its own, the calls wait for it there), and
calls to a peer gone before it fail with RpcConnectionError saying it cannot be reached.  Each
case runs over Unix sockets with shared memory and over TCP.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _frozen_fns as fns
import pytest
from _harness import Group, report
from conftest import GroupFactory

TIMEOUT_S = 2.0
# How much later than its deadline a call may complete: a timer tick and a busy machine.
SLACK_S = 1.5
# How long rpc_async may take at most, for one call: far above a copy of 1 MiB, far below the
# call's timeout (today's main blocked for as long as the peer stayed frozen).
ISSUE_BOUND_S = 0.5
MIB = 1 << 20
STOP_BOUND_S = 5.0  # how long a SIGSTOP may take to stop every thread of a worker

TRANSPORTS = pytest.mark.parametrize("same_host_ipc", [True, False], ids=["unix+shm", "tcp"])


@contextlib.contextmanager
def frozen(group: Group, rank: int) -> Iterator[None]:
    """Worker ``rank`` stopped (SIGSTOP) for the block, and continued whatever happens."""
    pid = group.pid(rank)
    os.kill(pid, signal.SIGSTOP)
    try:
        _wait_until_stopped(pid)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _wait_until_stopped(pid: int) -> None:
    """Return once every thread of ``pid`` is stopped.  ``kill`` returns when the signal is
    queued; a thread that is running (or waiting for a CPU, on a loaded machine) stops only
    when it next enters the kernel, and may answer a call meanwhile.  (Polled: there is no
    event for another process's state.)"""
    deadline = time.monotonic() + STOP_BOUND_S
    while True:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # (a thread that just ended)
                # The state follows the command name, which is in parentheses.
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        if states and all(state in ("T", "t") for state in states):
            return
        assert time.monotonic() < deadline, f"worker {pid} not stopped: thread states {states}"
        time.sleep(0.001)


def _started(make_group: GroupFactory, same_host_ipc: bool, **options: Any) -> Group:
    group = make_group(2)
    group.init_all(fns.init, same_host_ipc=same_host_ipc, **options)
    # Connected, with shared memory segments in use, before the peer freezes.
    assert group.call(0, fns.check_echoes, "worker1", MIB, 4)
    return group


def _finish(group: Group, graceful: bool = True) -> None:
    """After SIGCONT: large and small echoes come back intact, nothing stays pending."""
    assert group.call(0, fns.check_echoes, "worker1", 3 * MIB, 6)
    assert group.call(0, fns.check_echoes, "worker1", 100, 50)
    assert group.call(1, fns.check_echoes, "worker0", MIB, 3)
    assert group.call(0, fns.pending_calls) == 0
    group.call_all(fns.shutdown, graceful)
    group.close()


@TRANSPORTS
@pytest.mark.parametrize(
    ("count", "nbytes", "budget_s"), [(40, MIB, 10.0), (5000, 0, 20.0)], ids=["large", "small"]
)
def test_calls_to_a_frozen_peer_return_at_once_and_time_out(
    make_group: GroupFactory, same_host_ipc: bool, count: int, nbytes: int, budget_s: float
) -> None:
    group = _started(make_group, same_host_ipc)
    with frozen(group, 1):
        out = group.call(0, fns.issue_calls, "worker1", count, nbytes, TIMEOUT_S, budget_s)
    _assert_returned_at_once_and_timed_out(
        out, f"frozen peer, {out['issued']} rpc_async", same_host_ipc
    )
    _finish(group)


def _assert_returned_at_once_and_timed_out(
    out: dict[str, Any], label: str, same_host_ipc: bool
) -> None:
    """What ``issue_calls`` saw of a frozen peer: no rpc_async blocked, each call failed with
    RpcTimeoutError soon after its own timeout (reported as ``label``)."""
    assert not out["blocked"], f"rpc_async blocked after {out['issued']} calls"
    assert out["longest_call_s"] < ISSUE_BOUND_S, out
    assert out["outcomes"] == {"RpcTimeoutError"}, out
    assert out["late"] < SLACK_S, out
    report(
        f"{label} ({'unix+shm' if same_host_ipc else 'tcp'})",
        longest_rpc_async_s=out["longest_call_s"],
        latest_after_timeout_s=out["late"],
    )


@TRANSPORTS
def test_calls_to_a_peer_frozen_before_the_first_contact_return_at_once_and_time_out(
    make_group: GroupFactory, same_host_ipc: bool
) -> None:
    group = make_group(3)  # worker1 and worker2 have never been connected (only to rank 0)
    group.init_all(fns.init, same_host_ipc=same_host_ipc)
    with frozen(group, 2):
        out = group.call(1, fns.issue_calls, "worker2", 40, MIB, TIMEOUT_S, 10.0)
    _assert_returned_at_once_and_timed_out(
        out, "peer frozen before the first contact", same_host_ipc
    )
    # Continued, it completes the connect that was under way, and calls go through both ways.
    assert group.call(1, fns.check_echoes, "worker2", MIB, 4)
    assert group.call(2, fns.check_echoes, "worker1", MIB, 4)
    assert group.call(1, fns.pending_calls) == 0
    group.call_all(fns.shutdown, False)
    group.close()


@TRANSPORTS
def test_calls_to_a_peer_gone_before_the_first_contact_fail_saying_so(
    make_group: GroupFactory, same_host_ipc: bool
) -> None:
    group = make_group(3)
    group.init_all(fns.init, same_host_ipc=same_host_ipc)
    group.kill(2)
    out = group.call(1, fns.calls_to_unreachable, "worker2", 20, 20.0)
    assert out["longest_call_s"] < ISSUE_BOUND_S, out
    ((kind, message),) = out["outcomes"]  # all alike
    assert kind == "RpcConnectionError", out
    assert "cannot reach worker2" in message, message
    assert out["all_s"] < 5.0, out  # refused at once: no timeout is waited for
    assert group.call(1, fns.check_echoes, "worker0", MIB, 2)  # the others serve on
    group.call_all(fns.shutdown, False)  # (the killed worker is left out)
    group.close()


@TRANSPORTS
def test_rpc_sync_to_a_frozen_peer_honours_its_timeout(
    make_group: GroupFactory, same_host_ipc: bool
) -> None:
    group = _started(make_group, same_host_ipc)
    with frozen(group, 1):
        for nbytes in (8 * MIB, 8 * MIB, 100, 8 * MIB):  # the socket is full after the first
            outcome, took = group.call(0, fns.sync_call, "worker1", nbytes, TIMEOUT_S)
            assert outcome == "RpcTimeoutError"
            assert TIMEOUT_S <= took < TIMEOUT_S + SLACK_S, took
            report(f"frozen peer, rpc_sync of {nbytes} bytes", took_s=took, timeout_s=TIMEOUT_S)
    _finish(group)


@TRANSPORTS
def test_a_full_send_queue_fails_new_calls_at_once_naming_peer_and_limit(
    make_group: GroupFactory, same_host_ipc: bool
) -> None:
    group = _started(make_group, same_host_ipc, max_send_queue_bytes=4 * MIB)
    with frozen(group, 1):
        out = group.call(0, fns.fill_queue, "worker1", 2 * MIB, 12)
        refused = out["refused"]
        # The first calls fit (shared memory, the socket's buffer, the queue); from the first
        # refusal on, every call is refused: the queue does not drain while the peer is frozen.
        assert refused and refused == list(range(refused[0], 12)), refused
        assert refused[0] >= 2, refused
        assert "worker1" in out["message"], out
        assert "max_send_queue_bytes=4194304" in out["message"], out
    outcomes = group.call(0, fns.held_outcomes, 30.0)
    assert outcomes.count("SendQueueFullError") == len(refused)
    assert outcomes.count("ok") == 12 - len(refused), outcomes  # the queued ones, delivered
    _finish(group)


@TRANSPORTS
def test_a_heartbeat_reports_a_frozen_peer_without_a_call_timeout(
    make_group: GroupFactory, same_host_ipc: bool
) -> None:
    group = _started(make_group, same_host_ipc, heartbeat_s=0.5)
    with frozen(group, 1):
        kind, message, took = group.call(0, fns.wait_for_connection_loss, "worker1", 60.0)
        assert kind == "RpcConnectionError", (kind, message)
        assert "heartbeat" in message, message
        # Silent for 3 heartbeats (1.5 s) with a PING unanswered, seen at the watchdog's next
        # look (half a heartbeat at most).
        assert 1.0 <= took < 1.5 + 0.25 + SLACK_S, took  # (heard last just before the freeze)
        report("frozen peer, heartbeat_s=0.5", reported_after_s=took)
    # The frozen worker, continued, is not mistaken for a dead one by its own heartbeat, the
    # two reconnect, and the graceful shutdown's barrier counts worker1 again.
    _finish(group, graceful=True)
