"""Who is who: finding rank 0, joining the group, and the shutdown barrier.

Rank 0 listens at the master address (``env://``: ``MASTER_ADDR``/``MASTER_PORT``; or
``tcp://host:port``).  Every other worker listens on an ephemeral port of the interface that
reaches the master, connects to rank 0 (retrying while rank 0 starts), and calls ``_join`` with
its name, rank and address.  Rank 0 answers every join at once when all ``world_size`` workers
have joined, with the table of all of them, or fails them all, naming the missing ranks, when
the time runs out.  Connections between the other workers are made later, on first use.

The shutdown barrier uses rank 0 the same way: each worker calls ``_barrier`` when none of its
own calls is pending; rank 0 answers when every worker has arrived, saying whether all of them
had been quiet (made no call) since their previous arrival.  Workers repeat rounds until a quiet
one, so no call made while others were arriving is cut off.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

from thenable import _future
from thenable._future import Future, copy_outcome
from thenable.rpc._errors import (
    RendezvousError,
    RpcConnectionError,
    RpcTimeoutError,
    WorkerNameError,
)
from thenable.rpc._handlers import pinned
from thenable.rpc._worker import agent as _agent
from thenable.rpc._worker.agent import Agent, WorkerAddress
from thenable.rpc.functions import async_execution

__all__ = (
    "Coordinator",
    "first_host",
    "join",
    "listen_host",
    "master_address",
    "shutdown_barrier",
)

_LOGGER = logging.getLogger("thenable.rpc.rendezvous")


def master_address(init_method: str, env: Mapping[str, str]) -> tuple[str, int]:
    """Rank 0's (host, port) from ``init_method``.

    Raises:
        ValueError: the address is missing or malformed; the message says what to set.
    """
    if init_method.startswith("env://"):
        host = env.get("MASTER_ADDR") or _slurm_master_host(env)
        port = env.get("MASTER_PORT") or _slurm_master_port(env)
        if not host or not port:
            raise ValueError(
                "init_method 'env://' needs the environment variables MASTER_ADDR and "
                "MASTER_PORT (rank 0's address); set them, run under `thenable launch`, "
                "torchrun or Slurm's srun, or pass init_method='tcp://host:port'"
            )
        source = f"MASTER_PORT={port!r}"
    else:
        parts = urlsplit(init_method)
        host, port = parts.hostname, str(parts.port) if parts.port else None
        if not host or not port:
            raise ValueError(f"init_method must be 'tcp://host:port', got {init_method!r}")
        source = init_method
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"the master port is not a number: {source}") from None
    if not 0 < number < 65536:
        raise ValueError(f"the master port must be in 1..65535: {source}")
    return _resolve(host), number


def _slurm_master_host(env: Mapping[str, str]) -> str | None:
    """Under Slurm, the first host of the job's node list (rank 0 runs there)."""
    if "SLURM_PROCID" not in env:
        return None
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    return first_host(nodes) if nodes else None


def _slurm_master_port(env: Mapping[str, str]) -> str | None:
    """Under Slurm, a port every task of the job derives alike: 15000 plus the last four
    digits of ``SLURM_JOB_ID`` (the rule of PyTorch Lightning's Slurm environment)."""
    job = env.get("SLURM_JOB_ID", "")
    if "SLURM_PROCID" not in env or not job.isdigit():
        return None
    return str(15000 + int(job[-4:]))


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list in its compressed form, without ``scontrol``:
    ``node[007-009,012],login1`` -> ``node007``; ``rack[1-2]-gpu[03-04]`` -> ``rack1-gpu03``.

    Raises:
        ValueError: the list is empty or its brackets do not match.
    """
    first, depth = [], 0
    for char in nodelist.strip():
        if char == "," and depth == 0:
            break
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0 or depth > 1:
            break
        first.append(char)
    host = "".join(first)
    if depth != 0 or not host:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}")
    # Each [ranges] stands for its first value, zero padding kept.
    parts = host.replace("]", "[").split("[")
    return "".join(
        part if index % 2 == 0 else part.split(",")[0].split("-")[0]
        for index, part in enumerate(parts)
    )


def _resolve(host: str) -> str:
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve the master address {host!r}: {exc}") from None
    return str(infos[0][4][0])


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def listen_host(master_host: str) -> str:
    """The local address of the interface that reaches ``master_host`` (loopback stays loopback)."""
    if is_loopback(master_host):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((master_host, 9))  # UDP connect sends nothing; it only picks a route
        return str(probe.getsockname()[0])


class Coordinator:
    """Rank 0's side of joining and of the shutdown barrier."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self._lock = threading.Lock()
        self._joined: dict[int, WorkerAddress] = {}
        self._waiting: list[Future[list[WorkerAddress]]] = []
        self._table: Future[list[WorkerAddress]] = Future()
        self._rounds: dict[int, tuple[dict[int, bool], dict[int, Future[bool]]]] = {}
        # Workers with no connection to rank 0 left (their last one broke, and they have not
        # connected again): no barrier they have not reached can end.
        self._lost: set[int] = set()

    def join(self, worker: WorkerAddress, world_size: int) -> Future[list[WorkerAddress]]:
        """Record ``worker``; its Future completes with the whole table once all have joined."""
        agent = self._agent
        answer: Future[list[WorkerAddress]] = Future()
        with self._lock:
            error = self._check(worker, world_size)
            if error is None:
                self._joined[worker.rank] = worker
                complete = len(self._joined) == agent.world_size
                table = sorted(self._joined.values(), key=lambda w: w.rank)
        if error is not None:
            # A group that cannot be made: every worker waiting fails now with this error (as
            # in torch), rank 0 included, rather than waiting for a worker that never comes.
            _future.complete(self._table, None, error, strict=False)
            answer.set_exception(error)
            return answer
        self._table.add_done_callback(functools.partial(copy_outcome, target=answer))
        if complete:
            _future.complete(self._table, table, None, strict=False)
        return answer

    def _check(self, worker: WorkerAddress, world_size: int) -> Exception | None:
        agent = self._agent
        if world_size != agent.world_size:
            return RendezvousError(
                f"worker {worker.name!r} (rank {worker.rank}) was started with world_size="
                f"{world_size}, but rank 0 has world_size={agent.world_size}"
            )
        if not 0 <= worker.rank < agent.world_size:
            return RendezvousError(f"rank {worker.rank} is outside 0..{agent.world_size - 1}")
        if worker.rank in self._joined:
            return RendezvousError(
                f"rank {worker.rank} joined twice (as {self._joined[worker.rank].name!r} and "
                f"{worker.name!r}); every worker needs its own rank"
            )
        for other in self._joined.values():
            if other.name == worker.name:
                return WorkerNameError(
                    f"worker name {worker.name!r} is used by ranks {other.rank} and "
                    f"{worker.rank}; names must be unique"
                )
        return None

    def wait_for_all(self, deadline: float | None) -> list[WorkerAddress]:
        """Block until everyone joined; on timeout fail every joiner, naming the missing ranks."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return self._table.wait(timeout)
        except TimeoutError:
            with self._lock:
                missing = sorted(set(range(self._agent.world_size)) - set(self._joined))
            error = RpcTimeoutError(
                f"init_rpc: rank(s) {missing} did not join within "
                f"{self._agent.options.rpc_timeout} s (rank 0 at "
                f"{self._agent.listener.address[0]}:{self._agent.listener.address[1]})"
            )
            _future.complete(self._table, None, error, strict=False)
            raise error from None

    def arrive(self, round_number: int, rank: int, quiet: bool) -> Future[bool]:
        """One worker at the shutdown barrier; completes with "all quiet" once all arrived."""
        answer: Future[bool] = Future()
        with self._lock:
            votes, answers = self._rounds.setdefault(round_number, ({}, {}))
            votes[rank] = quiet
            answers[rank] = answer
            missing_lost = self._lost - set(votes)
            if missing_lost:
                del self._rounds[round_number]
            elif len(votes) < self._agent.world_size:
                return answer
            else:
                del self._rounds[round_number]
        if missing_lost:
            _fail_round(answers, missing_lost)
            return answer
        all_quiet = all(votes.values())
        # Answer rank 0 itself last: it stops serving as soon as it has its answer.
        for other in sorted(answers, key=lambda r: r == self._agent.rank):
            answers[other].set_result(all_quiet)
        return answer

    def peer_back(self, rank: int) -> None:
        """``rank`` is connected again (it was frozen, not dead): later rounds may count it."""
        with self._lock:
            self._lost.discard(rank)

    def peer_lost(self, rank: int) -> None:
        """The last connection to ``rank`` broke: fail the barrier rounds it has not reached."""
        with self._lock:
            self._lost.add(rank)
            failing = [
                self._rounds.pop(number)[1]
                for number, (votes, _) in list(self._rounds.items())
                if rank not in votes
            ]
        for answers in failing:
            _fail_round(answers, {rank})


def _fail_round(answers: dict[int, Future[bool]], lost: set[int]) -> None:
    error = RpcConnectionError(
        f"graceful shutdown cannot complete: rank(s) {sorted(lost)} lost their connection to "
        "rank 0 (died?); the workers were stopped without waiting for them"
    )
    for answer in answers.values():
        _future.complete(answer, None, error, strict=False)


@pinned
@async_execution
def _join(worker: WorkerAddress, world_size: int) -> Future[list[WorkerAddress]]:
    coordinator = _coordinator()
    return coordinator.join(worker, world_size)


@pinned
@async_execution
def _barrier(round_number: int, rank: int, quiet: bool) -> Future[bool]:
    return _coordinator().arrive(round_number, rank, quiet)


def _coordinator() -> Coordinator:
    agent = _agent.require_agent()
    coordinator: Coordinator | None = agent.coordinator
    if coordinator is None:
        raise RuntimeError(f"worker {agent.name!r} is not rank 0; joins go to rank 0")
    return coordinator


def join(agent: Agent, master: tuple[str, int], deadline: float | None) -> list[WorkerAddress]:
    """Join the group through rank 0 and return the table of all workers.

    Raises:
        TimeoutError: rank 0 could not be reached, or the group was not complete, in time.
        ValueError: rank 0 refused this worker (duplicate name or rank, other world size).
    """
    me = agent.address()
    coordinator: Coordinator | None = agent.coordinator
    if coordinator is not None:
        coordinator.join(me, agent.world_size)
        return coordinator.wait_for_all(deadline)
    delay = 0.01
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise RpcTimeoutError(
                f"init_rpc: could not reach rank 0 at {master[0]}:{master[1]} within "
                f"{agent.options.rpc_timeout} s; is rank 0 running with the same "
                "MASTER_ADDR/MASTER_PORT?"
            )
        try:
            agent.connect_to(0, master, min(left or 10.0, 10.0))
            break
        except (ConnectionRefusedError, ConnectionResetError, TimeoutError):
            time.sleep(min(delay, left) if left is not None else delay)  # rank 0 not up yet
            delay = min(delay * 2, 0.5)
    left = 0.0 if deadline is None else max(0.001, deadline - time.monotonic())
    table = agent.call(0, _join, (me, agent.world_size), {}, left, counted=False)
    return table.wait()  # type: ignore[no-any-return]


def shutdown_barrier(agent: Agent, deadline: float | None) -> None:
    """Return once every worker has called it with no call of its own pending (see above)."""
    round_number = 0
    issued_at_last_arrival = -1
    while True:
        agent.wait_idle(deadline)
        issued = agent.issued_count()
        quiet = issued == issued_at_last_arrival
        issued_at_last_arrival = issued
        left = 0.0 if deadline is None else max(0.001, deadline - time.monotonic())
        all_quiet = agent.call(
            0, _barrier, (round_number, agent.rank, quiet), {}, left, counted=False
        ).wait()
        if all_quiet:
            return
        round_number += 1
