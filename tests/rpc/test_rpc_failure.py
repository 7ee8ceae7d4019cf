"""Failure isolation: a worker killed with SIGKILL in the middle of calls.

Pending calls to it fail at once with ConnectionError (not at the 60 s timeout), the others
keep working, and they stop with shutdown(graceful=False).

A graceful shutdown cannot finish with a dead peer: its barrier (run by rank 0) waits for every
worker.  With a dead rank other than 0 it waits until its ``timeout`` (forever with the default
0), then fails with TimeoutError and stops the worker anyway; with rank 0 dead it fails at once
with ConnectionError.  Use ``shutdown(graceful=False)`` once a peer is known to be dead.
"""

from __future__ import annotations

import _remote_fns as fns
from _harness import Failure, Group
from conftest import GroupFactory

# Far longer than the test may take: a call that fails must fail because the peer died.
RPC_TIMEOUT_S = 60.0
PROMPT_S = 10.0


def _connection_error(outcome: object, *fragments: str) -> Failure:
    assert isinstance(outcome, Failure), f"expected a ConnectionError, got {outcome!r}"
    assert outcome.type_name == "thenable.rpc.RpcConnectionError", outcome.traceback
    assert {"builtins.ConnectionError", "builtins.RuntimeError"} <= set(outcome.bases)
    for fragment in fragments:
        assert fragment in outcome.message, (fragment, outcome.message)
    return outcome


def test_killed_worker_fails_pending_calls_at_once_and_others_keep_working(
    make_group: GroupFactory,
) -> None:
    group: Group = make_group(3)
    group.init_all(fns.init_worker, rpc_timeout=RPC_TIMEOUT_S)
    # worker0 and worker1 each have a call blocked in a handler of worker2.
    for rank in (0, 1):
        tag = f"blocked-by-{rank}"
        group.call(rank, fns.start_call, tag, "worker2", fns.signal_and_wait_for_gate, (tag,))
        group.wait_signal(2, tag)
    group.kill(2)
    for rank in (0, 1):
        outcome, elapsed = group.call(rank, fns.finish_call, f"blocked-by-{rank}")
        _connection_error(outcome, "worker2")
        assert elapsed < PROMPT_S, f"worker{rank}'s call failed only after {elapsed:.1f} s"
    # The survivors still talk to each other, both ways ...
    assert group.call(0, fns.roundtrip, "worker1", 1) == 2
    assert group.call(1, fns.roundtrip, "worker0", 2) == 3
    assert group.call(0, fns.make_and_drop_rref, "worker1") == 1
    # ... and a new call to the dead worker fails promptly too.
    outcome, elapsed = group.call(0, fns.timed_call, "worker2", fns.whoami)
    _connection_error(outcome, "worker2")
    assert elapsed < PROMPT_S
    # Graceful shutdown with a dead peer, even with no time limit: rank 0 knows rank 2 is gone,
    # so the barrier fails at once with an error naming it, instead of hanging.
    failure = group.failure(1, fns.shutdown_worker, True, 0)
    _connection_error(failure)
    assert "rank(s) [2]" in failure.message
    assert group.call(1, fns.thenable_threads_left) == []  # stopped anyway
    group.call(0, fns.shutdown_worker, False)
    assert group.call(0, fns.thenable_threads_left) == []
    group.close()


def test_graceful_shutdown_fails_at_once_when_the_coordinator_is_dead(
    make_group: GroupFactory,
) -> None:
    """Rank 0 runs the shutdown barrier: if it was killed, a graceful shutdown (with no time
    limit) fails with ConnectionError at once instead of hanging, and stops the worker."""
    group: Group = make_group(3)
    group.init_all(fns.init_worker, rpc_timeout=RPC_TIMEOUT_S)
    assert group.call(1, fns.roundtrip, "worker2", 1) == 2
    group.kill(0)
    for rank in (1, 2):
        outcome, elapsed = group.call(rank, fns.timed_shutdown)
        _connection_error(outcome, "worker0")
        assert elapsed < PROMPT_S
        assert group.call(rank, fns.thenable_threads_left) == []
    group.close()
