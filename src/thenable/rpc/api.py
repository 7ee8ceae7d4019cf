"""``rpc.api``: the module torch programs reach into, with the names they use from it.

``torch.distributed.rpc.api`` holds the public calls (re-exported here too) and helpers that are
private by name but used by torch's own examples and tests: ``_get_current_rpc_agent()``,
``_all_gather``, ``_barrier``, ``_wait_all_workers``.  They keep torch's signatures.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

from thenable._future import Future
from thenable.rpc import _api
from thenable.rpc._api import (
    _set_rpc_timeout,
    get_rpc_timeout,
    get_worker_info,
    remote,
    rpc_async,
    rpc_sync,
    shutdown,
)
from thenable.rpc._errors import RpcTimeoutError
from thenable.rpc._handlers import pinned
from thenable.rpc._options import WorkerInfo
from thenable.rpc._rref import RRef, agent_timeout
from thenable.rpc._worker import agent as _agent
from thenable.rpc._worker.agent import Agent
from thenable.rpc.functions import async_execution

__all__ = (
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "UNSET_RPC_TIMEOUT",
    "RRef",
    "RpcAgent",
    "WorkerInfo",
    "_all_gather",
    "_barrier",
    "_get_current_rpc_agent",
    "_is_current_rpc_agent_set",
    "_set_rpc_timeout",
    "_to_worker_info",
    "_wait_all_workers",
    "get_rpc_timeout",
    "get_worker_info",
    "remote",
    "rpc_async",
    "rpc_sync",
    "shutdown",
)

UNSET_RPC_TIMEOUT = -1.0
"""A call's ``timeout`` that means "this worker's default" (``get_rpc_timeout()``)."""

DEFAULT_SHUTDOWN_TIMEOUT = 100000.0
"""torch's default bound of ``_wait_all_workers``, in seconds."""


class RpcAgent:
    """This process's RPC worker, with the methods torch programs call on torch's agent.

    Returned by ``_get_current_rpc_agent()``; it stays usable until ``shutdown()``.
    """

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def get_worker_info(self, worker_name: str | int | None = None) -> WorkerInfo:
        """This worker's WorkerInfo, or that of the worker with this name (or rank).

        Raises:
            UnknownWorkerError: no worker has that name or rank.
        """
        if worker_name is None:
            return self._agent.worker_info()
        rank = self._agent.resolve(worker_name)
        return WorkerInfo(self._agent.name_of(rank), rank)

    def get_worker_infos(self) -> list[WorkerInfo]:
        """Every worker of the group, by rank."""
        return self._agent.worker_infos()

    def get_debug_info(self) -> dict[str, str]:
        """Counters for spotting leaks and stalls; values are strings, as in torch."""
        agent = self._agent
        pool = agent.pool.statistics()
        return {
            "agent.num_pending_requests": str(agent.pending_count()),
            "agent.thread_pool_size": str(pool["workers"]),
            "agent.num_idle_threads": str(pool["idle"]),
            "agent.num_blocked_threads": str(pool["blocked"]),
            "agent.num_queued_requests": str(pool["queued"]),
            "num_owner_rrefs": str(len(agent.rrefs)),
        }

    def join(self, shutdown: bool = False, timeout: float = 0) -> None:
        """Wait until every worker has called ``join`` too (``_wait_all_workers``); with
        ``shutdown``, then stop RPC here as ``shutdown(graceful=False)`` does."""
        _wait_all_workers(timeout or DEFAULT_SHUTDOWN_TIMEOUT)
        if shutdown:
            _api.shutdown(graceful=False)

    def sync(self) -> None:
        """Nothing to do: calls are sent as they are made."""


def _get_current_rpc_agent() -> RpcAgent:
    """This process's RPC agent (see ``RpcAgent``).

    Raises:
        RuntimeError: RPC is not initialized.
    """
    return RpcAgent(_agent.require_agent())


def _is_current_rpc_agent_set() -> bool:
    """Whether ``init_rpc`` has been called and ``shutdown`` not yet."""
    return _agent.current_agent() is not None


def _to_worker_info(to: str | int | WorkerInfo) -> WorkerInfo:
    """The WorkerInfo of a destination given as name, rank or WorkerInfo."""
    return _get_current_rpc_agent().get_worker_info(to.name if isinstance(to, WorkerInfo) else to)


class _Gathers:
    """The leader's side of ``_all_gather``: contributions by (worker set, sequence number)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rounds: dict[tuple[frozenset[str], int], tuple[dict[str, Any], Future[Any]]] = {}
        # Sequence numbers this worker used, per set of workers (every worker counts alike).
        self.sequence: dict[frozenset[str], int] = {}

    def arrive(
        self, names: frozenset[str], sequence: int, name: str, obj: Any
    ) -> Future[dict[str, Any]]:
        with self._lock:
            key = (names, sequence)
            if key not in self._rounds:
                self._rounds[key] = ({}, Future())
            objects, done = self._rounds[key]
            objects[name] = obj
            complete = objects.keys() == names
            if complete:
                del self._rounds[key]
        if complete:
            done.set_result(objects)
        return done


_GATHERS: weakref.WeakKeyDictionary[Agent, _Gathers] = weakref.WeakKeyDictionary()
_GATHERS_LOCK = threading.Lock()


def _gathers(agent: Agent) -> _Gathers:
    with _GATHERS_LOCK:
        gathers = _GATHERS.get(agent)
        if gathers is None:
            gathers = _GATHERS[agent] = _Gathers()
        return gathers


@pinned
@async_execution
def _gather_at_leader(
    names: frozenset[str], sequence: int, name: str, obj: Any
) -> Future[dict[str, Any]]:
    return _gathers(_agent.require_agent()).arrive(names, sequence, name, obj)


def _all_gather(
    obj: Any, worker_names: Iterable[str] | None = None, timeout: float = UNSET_RPC_TIMEOUT
) -> dict[str, Any]:
    """Collective: every worker in ``worker_names`` (default: all) passes an object; each gets
    ``{worker name: object}`` of all of them.  The workers must make the same sequence of
    ``_all_gather`` calls for the same set of names, as in torch.

    Raises:
        UnknownWorkerError: a name is not a worker of the group.
        ValueError: this worker is not in ``worker_names``.
        RpcTimeoutError: not every worker arrived within ``timeout`` (-1: the default).
    """
    agent = _agent.require_agent()
    names = frozenset(worker_names) if worker_names is not None else None
    if names is None:
        names = frozenset(info.name for info in agent.worker_infos())
    for name in names:
        agent.resolve(name)
    if agent.name not in names:
        raise ValueError(
            f"_all_gather: this worker ({agent.name!r}) must be one of worker_names {sorted(names)}"
        )
    gathers = _gathers(agent)
    with _GATHERS_LOCK:
        sequence = gathers.sequence.get(names, 0)
        gathers.sequence[names] = sequence + 1
    leader = agent.resolve(min(names))
    seconds = agent_timeout(agent, timeout)
    done = agent.call(
        leader, _gather_at_leader, (names, sequence, agent.name, obj), {}, seconds, counted=False
    )
    try:
        result: dict[str, Any] = done.wait()
    except RpcTimeoutError as exc:  # (torch's words, which its tests match)
        raise RpcTimeoutError(
            f"{exc}; timed out in _all_gather after {seconds:.2f} seconds"
        ) from exc
    return result


def _barrier(worker_names: Iterable[str]) -> None:
    """Return once every worker in ``worker_names`` has called it (with the same names)."""
    _all_gather(None, set(worker_names))


def _wait_all_workers(timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
    """Return once every worker of the group has called it: a barrier, as torch's.

    Raises:
        RpcTimeoutError: not every worker arrived within ``timeout`` seconds.
    """
    _all_gather(None, timeout=timeout)
