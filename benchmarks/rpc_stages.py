"""Where the time of an ``rpc_sync`` round trip goes, stage by stage (thenable only).

Two worker processes on this host; rank 0 makes no-op calls (``--add``: ``torch.add`` on a
small tensor; ``--echo``: a float32 tensor of that many bytes, sent back) to rank 1.  Both take
timestamps (``time.perf_counter_ns``: CLOCK_MONOTONIC, one clock for the whole host) at points
of the call path, by wrapping thenable's functions from outside, so the library runs unchanged
apart from the wrappers' own cost (well under a microsecond each).  For each call whose events
all came in the expected order, the gaps between them are the stages; the script prints each
stage's median and quartiles.

This is a diagnostic for thenable's own costs, not a comparison: ``bench_rpc.py`` compares
with torch.  Usage:
``python benchmarks/rpc_stages.py [--calls N] [--tcp-only] [--add | --echo BYTES]
[--busy-poll-us US]``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import multiprocessing as mp
import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

EVENTS: list[tuple[str, int]] = []  # (event, time) in this process
_ROLE = {0: "c", 1: "s"}  # client (caller) and server

# The events of one call, in order ("c_": the caller's process, "s_": the server's).
SEQUENCE = [
    "c_send0",
    "c_send1",
    "s_recv",
    "s_message",
    "s_loaded",
    "s_ran",
    "s_reply",
    "s_send0",
    "s_send1",
    "c_recv",
    "c_message",
    "c_loaded",
    "c_done",
]
# What lies between consecutive points: the call's start, SEQUENCE, the call's end.
STAGES = [
    "caller: rpc_sync up to the send",
    "caller: send system call",
    "wake the server's reader",
    "server: bytes to message",
    "server: dispatch and unpickle",
    "server: run the function",
    "server: pickle the reply",
    "server: reply to send",
    "server: send system call",
    "wake the caller's reader",
    "caller's reader: bytes to message",
    "caller's reader: unpickle the reply",
    "caller's reader: complete the future",
    "wake the caller, return",
]


def noop() -> None:
    EVENTS.append(("s_ran", time.perf_counter_ns()))


def add(tensor: Any, number: int) -> Any:
    """``torch.add(tensor, number)``: the round trip with small tensors (``--add``)."""
    import torch

    result = torch.add(tensor, number)
    EVENTS.append(("s_ran", time.perf_counter_ns()))
    return result


def echo(value: Any) -> Any:
    """``value`` itself, sent back: the round trip with a large tensor (``--echo BYTES``)."""
    EVENTS.append(("s_ran", time.perf_counter_ns()))
    return value


def take_events() -> list[tuple[str, int]]:
    events = list(EVENTS)
    EVENTS.clear()
    return events


def _mark(name: str, fn: Callable[..., Any], *, after: bool = False) -> Callable[..., Any]:
    """``fn`` that records ``name`` when called (or, with ``after``, when it returns)."""
    clock = time.perf_counter_ns

    @functools.wraps(fn)
    def marked(*args: Any, **kwargs: Any) -> Any:
        if not after:
            EVENTS.append((name, clock()))
        result = fn(*args, **kwargs)
        if after:
            EVENTS.append((name, clock()))
        return result

    return marked


def _instrument(role: str) -> None:
    """Wrap the points of the call path (before init_rpc: connections bind their handlers)."""
    from thenable.rpc._net import transport as _transport
    from thenable.rpc._wire import protocol as _protocol
    from thenable.rpc._worker import agent as _agent

    send_some = _transport._send_some

    def timed_send_some(*args: Any, **kwargs: Any) -> Any:
        EVENTS.append((f"{role}_send0", time.perf_counter_ns()))
        result = send_some(*args, **kwargs)
        EVENTS.append((f"{role}_send1", time.perf_counter_ns()))
        return result

    _transport._send_some = timed_send_some  # type: ignore[assignment]
    connection = _protocol.Connection
    connection.buffer_updated = _mark(f"{role}_recv", connection.buffer_updated)  # type: ignore[method-assign]
    agent = _agent.Agent
    agent._on_message = _mark(f"{role}_message", agent._on_message)  # type: ignore[method-assign]
    agent._send_reply = _mark(f"{role}_reply", agent._send_reply)  # type: ignore[method-assign]
    agent._on_reply = _mark(f"{role}_done", agent._on_reply, after=True)  # type: ignore[method-assign]
    _agent.loads = _mark(f"{role}_loaded", _agent.loads, after=True)  # type: ignore[assignment]


def _stages(
    calls: list[tuple[int, int]], events: list[tuple[str, int]]
) -> tuple[dict[str, list[float]], int]:
    """Per stage, its durations (us) over the calls whose events came in order."""
    events.sort(key=lambda event: event[1])
    stages: dict[str, list[float]] = {stage: [] for stage in [*STAGES, "total"]}
    complete = 0
    position = 0
    for start, end in calls:
        while position < len(events) and events[position][1] < start:
            position += 1
        mine = []
        while position < len(events) and events[position][1] <= end:
            mine.append(events[position])
            position += 1
        if [name for name, _ in mine] != SEQUENCE:
            continue
        complete += 1
        points = [start, *(at for _, at in mine), end]
        for stage, (a, b) in zip(STAGES, itertools.pairwise(points), strict=True):
            stages[stage].append((b - a) / 1e3)
        stages["total"].append((end - start) / 1e3)
    return stages, complete


def _worker(
    rank: int,
    port: int,
    calls: int,
    tcp_only: bool,
    with_add: bool,
    echo_bytes: int,
    busy_poll_us: int | None,
) -> None:
    _instrument(_ROLE[rank])
    import thenable.rpc as rpc

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    options = rpc.RpcBackendOptions(same_host_ipc=not tcp_only)
    if busy_poll_us is not None:
        options.busy_poll_us = busy_poll_us
    rpc.init_rpc(f"w{rank}", rank=rank, world_size=2, rpc_backend_options=options)
    if rank == 0:
        if with_add or echo_bytes:
            import torch

        if with_add:
            call = functools.partial(rpc.rpc_sync, "w1", add, args=(torch.ones(2), 3))
        elif echo_bytes:
            tensor = torch.ones(echo_bytes // 4)
            call = functools.partial(rpc.rpc_sync, "w1", echo, args=(tensor,))
        else:
            call = functools.partial(rpc.rpc_sync, "w1", noop)
        for _ in range(300):  # warm-up
            call()
        rpc.rpc_sync("w1", take_events)
        EVENTS.clear()
        spans = []
        clock = time.perf_counter_ns
        for _ in range(calls):
            start = clock()
            call()
            spans.append((start, clock()))
        events = take_events() + rpc.rpc_sync("w1", take_events)
        stages, complete = _stages(spans, events)
        print(f"{complete} of {calls} calls had every event in order; microseconds:")
        print(f"{'stage':40s} {'median':>8s} {'p25':>8s} {'p75':>8s}")
        for stage, values in stages.items():
            if values:
                p25, _, p75 = statistics.quantiles(values, n=4)
                print(f"{stage:40s} {statistics.median(values):8.1f} {p25:8.1f} {p75:8.1f}")
    rpc.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls measured (3000)")
    parser.add_argument("--tcp-only", action="store_true", help="TCP, no same-host transport")
    parser.add_argument("--add", action="store_true", help="torch.add(ones(2), 3), not a no-op")
    parser.add_argument("--echo", type=int, default=0, metavar="BYTES", help="echo a tensor")
    parser.add_argument("--busy-poll-us", type=int, help="RpcBackendOptions.busy_poll_us")
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    workers = [
        context.Process(
            target=_worker,
            args=(
                rank,
                port,
                args.calls,
                args.tcp_only,
                args.add,
                args.echo,
                args.busy_poll_us,
            ),
        )
        for rank in (0, 1)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        if worker.exitcode != 0:
            raise SystemExit(f"worker {worker.name} failed (exit code {worker.exitcode})")


if __name__ == "__main__":
    main()
