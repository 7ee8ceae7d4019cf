"""RRefs used in the orders the reference counting protocol must survive (the invariant is in
the design note of ``thenable.rpc._rref``): reads on the owner that overtake ``remote()``'s
creation, references forwarded along chains of workers before their own registration, a
message pickled twice, a request that times out before its owner has read it.

One group of four workers; worker0 makes the calls and worker1 owns the values.
"""

from __future__ import annotations

from typing import Any

import _rref_order_fns as orders
import pytest
from _harness import Failure, Group

GROUP_SIZE = 4


def test_owner_reads_wait_for_a_creation_still_running(group: Group) -> None:
    """torch's examples call ``rref.local_value()`` on the owner right after ``remote()``;
    the read waits for the value (it failed with "value() called on a pending Future")."""
    out: dict[str, Any] = group.call(0, orders.check_owner_reads_wait_for_creation)
    assert out["local_value"] == (True, 41)  # (still being created when read, the value)
    assert out["to_here"] == (True, 41)
    pending, failure = out["failed"]
    assert pending is True and isinstance(failure, Failure)
    assert failure.type_name == "_remote_fns.CustomError" and "creation failed" in failure.message
    pending, failure = out["too_slow"]
    assert pending is True and isinstance(failure, Failure)
    assert failure.type_name == "thenable.rpc.RpcTimeoutError", failure.traceback
    assert "still being created after 0.3 s" in failure.message
    assert "builtins.RuntimeError" in failure.bases
    assert out["after"] == 7


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_references_forwarded_along_chains_keep_their_value(group: Group, seed: int) -> None:
    out = group.call(0, orders.check_forwarding_in_random_orders, seed, 120, timeout=120)
    assert out["wrong"] == {}
    assert out["left"] == 0


def test_a_message_pickled_twice_makes_one_reference(group: Group) -> None:
    out = group.call(0, orders.check_rref_beside_a_trimmed_array)
    assert out["sent"] == [8, 8, 8]
    assert out["left"] == 0, "a second fork was registered and never released"
    assert out["alive"] == [False, False]


def test_a_request_that_timed_out_keeps_its_rref_until_the_owner_read_it(group: Group) -> None:
    out = group.call(0, orders.check_timed_out_request_keeps_its_rref)
    timed_out = out["timed_out"]
    assert isinstance(timed_out, Failure)
    assert timed_out.type_name == "thenable.rpc.RpcTimeoutError"
    assert out["alive_while_unread"] is True
    assert out["read"] == "late-read"
    assert out["left"] == 0
    assert out["pending"] == 0
