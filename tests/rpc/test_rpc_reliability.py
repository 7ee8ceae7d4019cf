"""Reliability under failure, load and time: SIGKILL mid-traffic, floods of calls in flight,
a mixed soak with memory and RRef tables watched.

What each test proves, and why:

- **A worker killed mid-traffic** (world of 3, same-host Unix sockets with shared memory, and
  TCP): rank 0 has more than 100 calls pending in rank 1 (blocked on a gate there, or queued
  behind those in its pool), some carrying 4 MiB arrays (shared-memory sized), while rank 1
  streams 4 MiB echoes through rank 0; rank 2 has calls pending in rank 1 too.  After
  ``SIGKILL`` every one of those calls fails with ``RpcConnectionError`` (a RuntimeError and
  a ConnectionError) within ``KILL_BOUND_S`` of the kill, none before it; a new call to the
  dead worker fails within ``NEW_CALL_BOUND_S``; ranks 0 and 2 still serve each other (small
  and large calls); no segment stays mapped and nothing appears in ``/dev/shm``.
- **Rank 0 killed mid-traffic** (the rendezvous and store host): ranks 1 and 2 each have
  calls pending in rank 0 while rank 0 streams large echoes through both.  Theirs fail
  within the same bound; ranks 1 and 2, which had not talked to each other before, still
  connect and serve each other.
- **Load**: 100,000 ``rpc_async`` calls issued by one caller before it waits for any, all
  in flight at once (the callee, an ``@async_execution`` function, answers none before the
  last has arrived, so none is answered early and no thread is held per call), then all
  waited for: none lost, none wrong.  Fan-in: two callers at once, 50,000 each, into one
  callee, likewise.
- **Soak**: every rank of 3 drives mixed traffic to the others (small rpc_sync, batches of
  rpc_async, 4 MiB echoes by rpc_sync and rpc_async, remote() values fetched with to_here()
  or used through a proxy, then dropped) for ``SOAK_SHORT_S`` (10 s; long form 60 s), after
  a ``WARM_UP_S`` warm-up.  VmRSS (``/proc/self/status``) of every rank grows by less than
  ``RSS_GROWTH_BOUND_MIB`` (50 MiB) from the end of the warm-up to the end of the soak, and
  every owner RRef table drains to 0 within ``DRAIN_BOUND_S`` (10 s).
- **RRefs in bulk**: 20,000 remote() values held by one caller, then dropped at once: the
  owner's table drains to 0 within ``DRAIN_BOUND_S``.

The issue's counts (100,000 in flight, 2 x 50,000, 20,000 RRefs) take a few seconds each on a
2-core machine, so the short forms use them; their long forms repeat them ``LONG_ROUNDS``
(10) times on the same workers, with the VmRSS bound from the end of the first round to the
end of the last.  The long forms (those and the 60 s soak) run only with
``THENABLE_LONG_TESTS=1``, and are marked ``long``.

The bounds are bounds, not benchmarks: generous enough for a loaded 2-core CI machine; the
measured numbers are printed (``pytest -s``).  Nothing here sleeps to let something happen:
the tests synchronize on signals from the workers (``_harness.signal``) or poll what they wait
for under a deadline.

Already proved elsewhere, and not repeated here: a single pending call failing at once after
a kill, graceful shutdown with a dead peer or a dead rank 0 (test_rpc_failure.py); 32 workers
calling each other (test_rpc_scale.py); a killed peer that was mid-echo leaving no segment
mapped in the survivor (test_shm.py, test_a_killed_peer_leaves_no_segment_behind: here the
same with many pending calls, over TCP too, and with the failures timed); RRefs churned from
threads and passed between workers (test_rpc_rref.py through _remote_fns).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import _reliability_fns as rel
import pytest
from _harness import Failure, Group, report
from conftest import GroupFactory

from thenable.rpc._net import shm as _shm

T = TypeVar("T")

MIB = 1 << 20
LARGE = 4 * MIB  # above the shared-memory threshold (256 KiB)
# Far longer than any test: a call that fails must fail because its peer died.
RPC_TIMEOUT_S = 90.0
# From SIGKILL to the last pending call failed, and for a new call to a dead worker to fail.
KILL_BOUND_S = 5.0
NEW_CALL_BOUND_S = 2.0
# After the kill, the survivor unmaps the dead peer's segments (and its own) within this.
UNMAPPED_BOUND_S = 10.0
# Calls kept pending in the worker that will be killed.
PENDING_SMALL = 100
PENDING_LARGE = 8

# The issue's counts: on a 2-core machine each takes a few seconds, so the short forms use
# them; the long forms repeat them LONG_ROUNDS times on the same workers.
FLOOD = 100_000
FAN_IN = 50_000
RREFS = 20_000
LONG_ROUNDS = 10
FLOOD_BUDGET_S = 60.0  # for one round, from the first call issued to the last answer
SOAK_SHORT_S = 10.0
SOAK_LONG_S = 60.0
WARM_UP_S = 3.0
RSS_GROWTH_BOUND_MIB = 50.0
DRAIN_BOUND_S = 10.0

needs_shm = pytest.mark.skipif(not _shm.available(), reason="needs memfd and file sealing")
TRANSPORTS = [
    pytest.param(True, id="unix-sockets-and-shared-memory", marks=needs_shm),
    pytest.param(False, id="tcp"),
]


# The long forms: marked ``long``, and run only when asked for.
only_when_asked = pytest.mark.skipif(
    os.environ.get("THENABLE_LONG_TESTS") != "1",
    reason="a long form: set THENABLE_LONG_TESTS=1 to run it",
)


def _shm_files() -> set[str]:
    """Files in /dev/shm but POSIX semaphores (``sem.*``, what multiprocessing makes)."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return set()
    return {path.name for path in shm.iterdir() if not path.name.startswith("sem.")}


def _poll(probe: Callable[[], T], done: Callable[[T], bool], timeout: float) -> tuple[T, float]:
    """Call ``probe`` (a round trip to workers, never a sleep) until ``done`` says its value
    is the one awaited, or ``timeout`` passes: (the last value, seconds spent)."""
    start = time.monotonic()
    while True:
        value = probe()
        elapsed = time.monotonic() - start
        if done(value) or elapsed > timeout:
            return value, elapsed


def _assert_all_failed_promptly(
    outcome: dict[str, Any], who: str, expected: int, dead: str
) -> None:
    """Every call of a batch failed with a connection error of thenable.rpc (a RuntimeError)
    that names the dead worker, after the kill and within the bound."""
    sample = outcome["sample"]
    detail = f"{who}: {outcome!r}\n{sample.traceback if isinstance(sample, Failure) else ''}"
    assert outcome["total"] == expected, detail
    assert outcome["not_done"] == 0, detail
    assert outcome["succeeded"] == 0, detail
    assert all(name.startswith("thenable.rpc.") for name in outcome["types"]), detail
    assert outcome["runtime_errors"] == outcome["connection_errors"] == expected, detail
    assert outcome["before"] == 0, detail
    assert outcome["last_s"] < KILL_BOUND_S, detail
    assert isinstance(sample, Failure) and dead in sample.message, detail


def _assert_fails_at_once(outcome: tuple[Any, float], dead: str) -> float:
    failure, elapsed = outcome
    assert isinstance(failure, Failure), f"a call to the dead {dead} returned {failure!r}"
    assert failure.type_name.startswith("thenable.rpc."), failure.traceback
    assert {"builtins.ConnectionError", "builtins.RuntimeError"} <= set(failure.bases)
    assert dead in failure.message, failure.message
    assert elapsed < NEW_CALL_BOUND_S, f"a new call to the dead {dead} took {elapsed:.2f} s"
    return float(elapsed)


# -- kills --------------------------------------------------------------------------------------


def _assert_survivors_serve(group: Group, a: int, b: int) -> None:
    """Ranks ``a`` and ``b`` still serve each other, small calls and large ones."""
    assert group.call(a, rel.timed_call, f"worker{b}")[0] == 2
    assert group.call(b, rel.timed_call, f"worker{a}")[0] == 2
    assert group.call(a, rel.echo_large, f"worker{b}", LARGE, 3) == 0
    assert group.call(b, rel.echo_large, f"worker{a}", LARGE, 3) == 0


@pytest.mark.parametrize("same_host_ipc", TRANSPORTS)
def test_a_worker_killed_mid_traffic_fails_every_pending_call_within_the_bound(
    make_group: GroupFactory, same_host_ipc: bool
) -> None:
    shm = _shm_files()
    group: Group = make_group(3)
    group.init_all(rel.init_worker, rpc_timeout=RPC_TIMEOUT_S, same_host_ipc=same_host_ipc)
    # Large payloads both ways: rank 1 echoes through rank 0 without end ...
    group.call(1, rel.start_stream, "back", "worker0", LARGE, 3)
    group.wait_signal(1, "back:streaming")
    # ... and rank 0's (and rank 2's) calls block in rank 1, or wait in its pool's queue.
    started = group.call(
        0, rel.start_gated_calls, "from0", "worker1", PENDING_SMALL, PENDING_LARGE, LARGE, 1
    )
    from2 = group.call(2, rel.start_gated_calls, "from2", "worker1", 10, 0, 0, 1)
    group.wait_signal(1, "from0:running")
    group.wait_signal(1, "from2:running")
    total0 = PENDING_SMALL + PENDING_LARGE
    assert started == {"issued": total0, "pending": total0}, started
    assert from2 == {"issued": 10, "pending": 10}, from2
    assert group.call(0, rel.gated_calls_not_done, "from0") == total0
    mapped = group.call(0, rel.memfd_mappings)
    if same_host_ipc:
        assert mapped > 0, "no payload went through shared memory"
    else:
        assert mapped == 0, "TCP workers staged payloads in shared memory"

    killed_at = time.monotonic()
    group.kill(1)
    tickets = [
        group.submit(rank, rel.finish_gated_calls, tag, killed_at, 30.0)
        for rank, tag in ((0, "from0"), (2, "from2"))
    ]
    outcome0, outcome2 = (group.result(ticket) for ticket in tickets)
    _assert_all_failed_promptly(outcome0, "worker0", total0, "worker1")
    _assert_all_failed_promptly(outcome2, "worker2", 10, "worker1")
    new_call_s = _assert_fails_at_once(group.call(0, rel.timed_call, "worker1"), "worker1")

    # Nothing of the dead worker's stays mapped in rank 0, and nothing was left in /dev/shm.
    maps, unmapped_s = group.call(0, rel.wait_for_no_mappings, UNMAPPED_BOUND_S)
    assert maps == 0, f"worker0 still maps {maps} segments {unmapped_s:.1f} s after the kill"
    assert group.call(2, rel.memfd_mappings) == 0
    assert _shm_files() <= shm, f"new in /dev/shm: {_shm_files() - shm}"

    # The survivors serve each other, small calls and large ones.
    _assert_survivors_serve(group, 0, 2)
    report(
        f"kill rank 1 ({'unix+shm' if same_host_ipc else 'tcp'})",
        pending=total0 + 10,
        first_failure_s=min(outcome0["first_s"], outcome2["first_s"]),
        last_failure_s=max(outcome0["last_s"], outcome2["last_s"]),
        new_call_s=new_call_s,
        unmapped_s=unmapped_s,
    )
    group.call_all(rel.shutdown_worker, False)
    group.close()
    assert _shm_files() <= shm


def test_rank_0_killed_mid_traffic_fails_pending_calls_and_the_others_keep_serving(
    make_group: GroupFactory,
) -> None:
    shm = _shm_files()
    group: Group = make_group(3)
    group.init_all(rel.init_worker, rpc_timeout=RPC_TIMEOUT_S)
    for rank in (1, 2):
        group.call(0, rel.start_stream, f"to{rank}", f"worker{rank}", LARGE, 3)
        group.wait_signal(0, f"to{rank}:streaming")
    small, large = PENDING_SMALL // 2, PENDING_LARGE // 2
    for rank in (1, 2):
        started = group.call(
            rank, rel.start_gated_calls, f"from{rank}", "worker0", small, large, LARGE, 1
        )
        assert started == {"issued": small + large, "pending": small + large}, started
        group.wait_signal(0, f"from{rank}:running")
        if _shm.available():
            assert group.call(rank, rel.memfd_mappings) > 0, "no payload in shared memory"

    killed_at = time.monotonic()
    group.kill(0)
    tickets = [
        group.submit(rank, rel.finish_gated_calls, f"from{rank}", killed_at, 30.0)
        for rank in (1, 2)
    ]
    outcomes = [group.result(ticket) for ticket in tickets]
    for rank, outcome in zip((1, 2), outcomes, strict=True):
        _assert_all_failed_promptly(outcome, f"worker{rank}", small + large, "worker0")
    new_call_s = _assert_fails_at_once(group.call(1, rel.timed_call, "worker0"), "worker0")
    unmapped = [group.call(rank, rel.wait_for_no_mappings, UNMAPPED_BOUND_S) for rank in (1, 2)]
    for rank, (maps, elapsed) in zip((1, 2), unmapped, strict=True):
        assert maps == 0, f"worker{rank} still maps {maps} segments {elapsed:.1f} s after"
    assert _shm_files() <= shm, f"new in /dev/shm: {_shm_files() - shm}"

    # Ranks 1 and 2 had not talked to each other: they still connect, and serve each other.
    _assert_survivors_serve(group, 1, 2)
    report(
        "kill rank 0",
        pending=2 * (small + large),
        first_failure_s=min(o["first_s"] for o in outcomes),
        last_failure_s=max(o["last_s"] for o in outcomes),
        new_call_s=new_call_s,
        unmapped_s=max(elapsed for _, elapsed in unmapped),
    )
    group.call_all(rel.shutdown_worker, False)
    group.close()
    assert _shm_files() <= shm


# -- load ---------------------------------------------------------------------------------------


def _flood(make_group: GroupFactory, callers: int, each: int, rounds: int = 1) -> None:
    """``callers`` workers (ranks 1..) flood worker0 with ``each`` calls at once, all held by
    worker0 until the last has arrived; ``rounds`` times on the same workers (then no rank's
    VmRSS may grow by ``RSS_GROWTH_BOUND_MIB`` from the end of the first round to the end of
    the last)."""
    group: Group = make_group(callers + 1)
    group.init_all(rel.init_worker, rpc_timeout=RPC_TIMEOUT_S)
    ranks = range(1, callers + 1)
    for rank in ranks:
        assert group.call(rank, rel.timed_call, "worker0")[0] == 2  # connected
    memory: list[list[dict[str, int]]] = []
    for round_ in range(rounds):
        tag = f"flood{round_}"
        group.call(0, rel.expect_held_calls, tag, callers * each)
        tickets = [
            group.submit(rank, rel.flood, tag, "worker0", each, FLOOD_BUDGET_S, offset=rank * each)
            for rank in ranks
        ]
        outs = [group.result(ticket, FLOOD_BUDGET_S + 30) for ticket in tickets]
        released = group.call(0, rel.held_calls_released, tag)
        for out in outs:
            assert (out["lost"], out["wrong"], out["failed"]) == (0, 0, 0), out
            assert out["peak_pending"] == each, out  # all in flight at once
        assert released["still_held"] == 0, released
        assert group.call_all(rel.pending_calls) == [0] * (callers + 1)
        start = min(out["start"] for out in outs)
        total_s = max(out["start"] + out["total_s"] for out in outs) - start
        report(
            f"{callers} x {each} calls in flight, round {round_ + 1} of {rounds}",
            issue_s=max(out["issue_s"] for out in outs),
            all_arrived_s=released["released_at"] - start,
            all_answered_s=total_s,
            calls_per_s=callers * each / total_s,
        )
        if round_ in (0, rounds - 1):
            memory.append(group.call_all(rel.memory_kib))
    if rounds > 1:
        _assert_rss_bounded(*memory)
    group.call_all(rel.shutdown_worker)
    group.close()


def _assert_rss_bounded(before: list[dict[str, int]], after: list[dict[str, int]]) -> None:
    """No rank's VmRSS, nor its anonymous part (RssAnon: what a leak of Python objects or
    payload copies grows; VmRSS also counts the shared-memory segments it maps), grew by
    ``RSS_GROWTH_BOUND_MIB`` or more from ``before`` to ``after``."""

    def growth(key: str) -> list[float]:
        return [(a[key] - b[key]) / 1024 for b, a in zip(before, after, strict=True)]

    report(
        "memory",
        vm_rss_start_mib=[round(b["VmRSS"] / 1024, 1) for b in before],
        vm_rss_growth_mib=[round(g, 1) for g in growth("VmRSS")],
        rss_anon_growth_mib=[round(g, 1) for g in growth("RssAnon")],
    )
    for key in ("VmRSS", "RssAnon"):
        for rank, mib in enumerate(growth(key)):
            assert mib < RSS_GROWTH_BOUND_MIB, (
                f"worker{rank}'s {key} grew by {mib:.1f} MiB: {before[rank]} -> {after[rank]}"
            )


def test_100k_calls_in_flight_from_one_caller_all_arrive_right(
    make_group: GroupFactory,
) -> None:
    _flood(make_group, 1, FLOOD)


def test_two_callers_fan_in_50k_each_to_one_callee(make_group: GroupFactory) -> None:
    _flood(make_group, 2, FAN_IN)


@pytest.mark.long
@only_when_asked
@pytest.mark.timeout(600)
def test_long_100k_calls_in_flight_again_and_again(make_group: GroupFactory) -> None:
    _flood(make_group, 1, FLOOD, rounds=LONG_ROUNDS)


@pytest.mark.long
@only_when_asked
@pytest.mark.timeout(600)
def test_long_fan_in_2_x_50k_again_and_again(make_group: GroupFactory) -> None:
    _flood(make_group, 2, FAN_IN, rounds=LONG_ROUNDS)


# -- soak and RRef tables -----------------------------------------------------------------------


def _drain_tables(group: Group, timeout: float) -> tuple[list[int], float]:
    """Poll every rank's owner table (each probe first sends that rank's own releases) until
    all are empty or ``timeout`` passes: (the last sizes, seconds)."""
    return _poll(
        lambda: group.call_all(rel.owner_table_size),
        lambda sizes: not any(sizes),
        timeout,
    )


def _soak(make_group: GroupFactory, seconds: float) -> None:
    group: Group = make_group(3)
    group.init_all(rel.init_worker, rpc_timeout=RPC_TIMEOUT_S)
    peers = [[f"worker{r}" for r in range(3) if r != rank] for rank in range(3)]

    def run(duration: float) -> list[dict[str, Any]]:
        tickets = [group.submit(rank, rel.soak, peers[rank], duration, LARGE) for rank in range(3)]
        outs = [group.result(ticket, duration + 60) for ticket in tickets]
        for rank, out in enumerate(outs):
            assert not out["wrong"] and not out["errors"], (rank, out)
        return outs

    run(WARM_UP_S)
    sizes, _ = _drain_tables(group, DRAIN_BOUND_S)
    assert sizes == [0, 0, 0], f"owner tables after the warm-up: {sizes}"
    before = group.call_all(rel.memory_kib)
    outs = run(seconds)
    sizes, drain_s = _drain_tables(group, DRAIN_BOUND_S)
    after = group.call_all(rel.memory_kib)
    ops = [sum(n for kind, n in out["ops"].items() if kind != "error") for out in outs]
    report(
        f"soak {seconds:.0f} s",
        ops_per_rank=ops,
        ops_per_s=sum(ops) / seconds,
        drain_s=drain_s,
    )
    assert sizes == [0, 0, 0], f"owner tables {sizes} still not empty after {drain_s:.1f} s"
    for out in outs:
        assert all(out["ops"].get(kind, 0) > 0 for kind in ("sync", "remote", "large")), out
    _assert_rss_bounded(before, after)
    group.call_all(rel.shutdown_worker)
    group.close()


def _rrefs_dropped_in_bulk(make_group: GroupFactory, count: int, rounds: int = 1) -> None:
    """worker0 makes ``count`` remote() values on worker1 and holds them all (reading one in
    100 back), then drops them at once; ``rounds`` times."""
    group: Group = make_group(2)
    group.init_all(rel.init_worker, rpc_timeout=RPC_TIMEOUT_S)
    memory: list[list[dict[str, int]]] = []
    for round_ in range(rounds):
        out = group.call(0, rel.create_rrefs, "worker1", count, 100)
        assert out["wrong"] == 0 and out["checked"] == len(range(0, count, 100)), out
        size, created_s = _poll(
            lambda: group.call(1, rel.owner_table_size), lambda n: n == count, DRAIN_BOUND_S
        )
        assert size == count, f"worker1 owns {size} values, not {count}, {created_s:.1f} s after"
        dropped_at = time.monotonic()
        assert group.call(0, rel.drop_rrefs) == count
        size, _ = _poll(
            lambda: group.call(1, rel.owner_table_size), lambda n: n == 0, DRAIN_BOUND_S
        )
        drain_s = time.monotonic() - dropped_at
        report(
            f"{count} RRefs, round {round_ + 1} of {rounds}",
            create_s=out["seconds"],
            drain_s=drain_s,
        )
        assert size == 0, f"worker1 still owns {size} values {drain_s:.1f} s after the drop"
        if round_ in (0, rounds - 1):
            memory.append(group.call_all(rel.memory_kib))
    if rounds > 1:
        _assert_rss_bounded(*memory)
    group.call_all(rel.shutdown_worker)
    group.close()


def test_soak_keeps_memory_bounded_and_rref_tables_drain(make_group: GroupFactory) -> None:
    _soak(make_group, SOAK_SHORT_S)


def test_rrefs_dropped_in_bulk_leave_the_owner_table_empty(make_group: GroupFactory) -> None:
    _rrefs_dropped_in_bulk(make_group, RREFS)


@pytest.mark.long
@only_when_asked
@pytest.mark.timeout(300)
def test_long_soak_60_s(make_group: GroupFactory) -> None:
    _soak(make_group, SOAK_LONG_S)


@pytest.mark.long
@only_when_asked
@pytest.mark.timeout(600)
def test_long_20k_rrefs_dropped_in_bulk_again_and_again(make_group: GroupFactory) -> None:
    _rrefs_dropped_in_bulk(make_group, RREFS, rounds=LONG_ROUNDS)
