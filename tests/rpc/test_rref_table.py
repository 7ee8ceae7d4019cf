"""The owner's side of RRef reference counting (thenable.rpc._rref.OwnerTable), in one process
with a stand-in for the agent: failed creations and the releaser."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from thenable._future import Future
from thenable.rpc._rref import OwnerTable

WAIT_S = 10.0
RREF = (1, 1)  # made by rank 1 ...
FORK = (1, 2)  # ... and held by it
ERROR = RuntimeError("creating the value of this RRef failed on the owner: no")


class _Agent:
    """What OwnerTable uses of the agent: it is rank 0; calls and notifications are recorded
    (calls answer at once)."""

    name = "owner"
    rank = 0

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, list[Any]]] = []

    def notify(self, to_rank: int, fn: Any, args: tuple[Any, ...]) -> None:
        self.sent.append(("notify", to_rank, list(args[0])))

    def call(
        self, to_rank: int, fn: Any, args: tuple[Any, ...], kwargs: Any, timeout: float
    ) -> Any:
        self.sent.append(("call", to_rank, list(args[0])))
        answered: Future[None] = Future()
        answered.set_result(None)
        return answered


@pytest.fixture
def agent() -> _Agent:
    return _Agent()


@pytest.fixture
def table(agent: _Agent) -> Iterator[OwnerTable]:
    table = OwnerTable(agent)  # type: ignore[arg-type]
    yield table
    table.close()


def test_a_failed_creation_fails_the_waiting_fetch_and_frees_the_entry(table: OwnerTable) -> None:
    fetched = table.awaited_value(RREF)  # to_here() overtook remote()'s failed request
    table.fail_creation(RREF, FORK, ERROR)
    assert fetched.done() and fetched._exception is ERROR
    assert len(table) == 1  # the creator's fork holds it ...
    table.release(RREF, FORK)
    assert len(table) == 0  # ... until released


def test_a_creation_that_ran_is_not_failed_afterwards(table: OwnerTable) -> None:
    table.create(RREF, FORK).set_result("value")
    table.fail_creation(RREF, FORK, ERROR)  # the creator only failed to read the answer
    assert table.value_future(RREF).value() == "value"
    table.release(RREF, FORK)
    assert len(table) == 0


def test_a_release_that_overtakes_the_failure_report_still_frees_the_entry(
    table: OwnerTable,
) -> None:
    fetched = table.awaited_value(RREF)
    table.release(RREF, FORK)  # the creator dropped its RRef before reporting the failure
    table.fail_creation(RREF, FORK, ERROR)
    assert len(table) == 0
    assert fetched._exception is ERROR


def test_flush_delivers_every_release_queued_before_it(table: OwnerTable, agent: _Agent) -> None:
    """Releases of values owned elsewhere go out as notifications, then flush confirms with
    each owner notified; releases of values owned here are applied here."""
    mine = [((0, i), (2, i)) for i in range(50)]
    for rref_id, fork in mine:
        table.create(rref_id, fork).set_result(rref_id)
    theirs = [(1 + i % 2, (1, i), (0, i)) for i in range(100)]
    for owner, rref_id, fork in theirs:
        table.release_later(owner, rref_id, fork)
    for rref_id, fork in mine:
        table.release_later(0, rref_id, fork)
    table.flush(WAIT_S)
    assert len(table) == 0
    delivered = sorted(
        (owner, tuple(rref_id), tuple(fork))
        for _, owner, forks in agent.sent
        for rref_id, fork in forks
    )
    assert delivered == sorted(theirs)
    assert {("call", 1), ("call", 2)} <= {(kind, owner) for kind, owner, _ in agent.sent}
