"""The public RPC calls, with torch.distributed.rpc's signatures: checks, then the agent."""

from __future__ import annotations

import enum
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from thenable import _openmp
from thenable._future import Future
from thenable.rpc._group import tracing as _tracing
from thenable.rpc._group.rendezvous import (
    Coordinator,
    is_loopback,
    join,
    listen_host,
    master_address,
    shutdown_barrier,
)
from thenable.rpc._group.store import store_rendezvous
from thenable.rpc._handlers import pinned
from thenable.rpc._options import (
    RpcBackendOptions,
    WorkerInfo,
    check_worker_name,
    resolve_auth_key,
    resolve_rank_and_world_size,
)
from thenable.rpc._rref import RRef, agent_timeout, remote_call
from thenable.rpc._worker import agent as _agent
from thenable.rpc._worker import context as _context
from thenable.rpc._worker.agent import Agent

__all__ = (
    "BackendType",
    "_set_rpc_timeout",
    "get_rpc_timeout",
    "get_worker_info",
    "init_rpc",
    "is_available",
    "remote",
    "rpc_async",
    "rpc_sync",
    "shutdown",
)

T = TypeVar("T")

_LOGGER = logging.getLogger("thenable.rpc")


class BackendType(enum.Enum):
    """Accepted for compatibility with torch; thenable has one backend (TCP, pickle 5)."""

    TENSORPIPE = "TENSORPIPE"


def init_rpc(
    name: str,
    backend: BackendType | None = None,
    rank: int = -1,
    world_size: int | None = None,
    rpc_backend_options: RpcBackendOptions | None = None,
) -> None:
    """Start this process's RPC worker and wait until all ``world_size`` workers have joined.

    Args:
        name: this worker's unique name (used as the destination of calls).
        backend: ignored (torch compatibility).
        rank: this worker's rank; -1 takes it from the launcher's environment (``RANK``,
            ``SLURM_PROCID``, ``OMPI_COMM_WORLD_RANK``).
        world_size: the number of workers; None takes it from the environment likewise.
        rpc_backend_options: see ``RpcBackendOptions``; default options otherwise.

    Raises:
        RuntimeError: RPC is already running in this process.
        WorkerNameError: ``name`` is not valid (see ``check_worker_name``), or another worker
            has it (every worker's ``init_rpc`` fails then).
        RendezvousError: another worker has this rank, or another world size.
        ValueError: a bad rank, world size or master address.
        RpcTimeoutError: the other workers did not all join within ``rpc_timeout``; the
            message names the missing ranks.
    """
    if _agent.current_agent() is not None:
        raise RuntimeError(
            "init_rpc() was already called in this process; call shutdown() before starting "
            "RPC again"
        )
    check_worker_name(name)
    if backend is not None and not isinstance(backend, BackendType):
        raise TypeError(f"backend must be a BackendType or None, got {backend!r}")
    options = rpc_backend_options if rpc_backend_options is not None else RpcBackendOptions()
    if not isinstance(options, RpcBackendOptions):
        raise TypeError(
            f"Could not infer backend for options {options!r}: rpc_backend_options must be "
            f"thenable.rpc.RpcBackendOptions (= TensorPipeRpcBackendOptions), got "
            f"{type(options).__module__}.{type(options).__qualname__}"
        )
    rank, world_size = resolve_rank_and_world_size(rank, world_size)
    key = resolve_auth_key(options, os.environ)
    master = master_address(options.init_method, os.environ)
    host = listen_host(master[0])
    if key is None and not is_loopback(host):
        _LOGGER.warning(
            "RPC worker %s listens on %s without authentication: anyone who can reach it can "
            "run code in this process; set THENABLE_AUTH_KEY (or RpcBackendOptions.auth_key) "
            "on every worker",
            name,
            host,
        )
    deadline = time.monotonic() + options.rpc_timeout if options.rpc_timeout else None
    # Under torchrun, or beside a process group, a c10d store serves the master port.
    store = store_rendezvous(options.init_method, os.environ, master, rank)
    at_master = rank == 0 and store is None
    try:
        agent = Agent(name, rank, world_size, options, key, master if at_master else (host, 0))
    except OSError as exc:
        where = f"{master[0]}:{master[1]}" if at_master else host
        raise OSError(exc.errno, f"RPC worker {name!r} cannot listen on {where}: {exc}") from exc
    if rank == 0:
        agent.coordinator = Coordinator(agent)  # (also the shutdown barrier's)
    _context.set_agent(agent)
    try:
        agent.start()
        if store is not None:
            agent.set_workers(store.join(agent.address(), world_size, deadline))
        else:
            agent.set_workers(join(agent, master, deadline))
    except BaseException:
        agent.stop()
        _context.set_agent(None)
        raise
    _tracing.started(agent)
    _openmp.settle()  # (see there: torch's idle OpenMP workers would spin between our calls)


def shutdown(graceful: bool = True, timeout: float = 0) -> None:
    """Stop this process's RPC worker.

    Args:
        graceful: first wait until every worker has finished all its outstanding calls (a
            barrier across the group), so no reply is lost; False stops at once and fails this
            worker's pending calls.
        timeout: seconds for the graceful part; 0 means no limit.

    Raises:
        RuntimeError: RPC is not running in this process.
        TimeoutError: the graceful part did not finish in time (the worker is stopped anyway).
    """
    agent = _agent.require_agent()
    try:
        if graceful:
            deadline = time.monotonic() + timeout if timeout else None
            agent.begin_shutdown()
            agent.rrefs.flush(None if deadline is None else max(0.0, deadline - time.monotonic()))
            shutdown_barrier(agent, deadline)
            agent.wait_answered(deadline)  # the barrier's own replies to the others included
            _tracing.after_shutdown_barrier(agent, deadline)
    finally:
        _tracing.stopped()
        agent.stop()
        _context.set_agent(None)


def _resolve_call(
    to: Any, func: Any, args: Any, kwargs: Any
) -> tuple[Agent, int, tuple[Any, ...], dict[str, Any]]:
    agent = _agent.require_agent()
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__qualname__}")
    if args is None:
        args = ()
    elif not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple (or list), got {type(args).__qualname__}")
    if kwargs is None:
        kwargs = {}
    elif not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict, got {type(kwargs).__qualname__}")
    return agent, agent.resolve(to), tuple(args), kwargs


def rpc_async(
    to: str | int | WorkerInfo,
    func: Callable[..., T],
    args: tuple[Any, ...] | list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    timeout: float = -1.0,
) -> Future[T]:
    """Run ``func(*args, **kwargs)`` on worker ``to``; return the Future of its result.

    The Future fails with the remote exception (its original type, with the remote traceback as
    ``__cause__``), TimeoutError after ``timeout`` seconds (-1: the default ``rpc_timeout``, 0:
    none), or ConnectionError if the worker goes away.

    Raises (at once):
        RuntimeError: RPC is not initialized.
        UnknownWorkerError: ``to`` names no worker (a ``ValueError``).
        DestinationTypeError: ``to`` is not a name, rank or WorkerInfo (a ``TypeError`` and an
            ``UnknownWorkerError``: torch raises ``ValueError``).
        TypeError: bad ``func``, ``args`` or ``kwargs``.
        SerializationError: an argument cannot be pickled.
    """
    agent, rank, call_args, call_kwargs = _resolve_call(to, func, args, kwargs)
    return agent.call(rank, func, call_args, call_kwargs, agent_timeout(agent, timeout))


def rpc_sync(
    to: str | int | WorkerInfo,
    func: Callable[..., T],
    args: tuple[Any, ...] | list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    timeout: float = -1.0,
) -> T:
    """Run ``func(*args, **kwargs)`` on worker ``to`` and return its result (see ``rpc_async``)."""
    return rpc_async(to, func, args, kwargs, timeout).wait()


def remote(
    to: str | int | WorkerInfo,
    func: Callable[..., T],
    args: tuple[Any, ...] | list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    timeout: float = -1.0,
) -> RRef[T]:
    """Run ``func(*args, **kwargs)`` on worker ``to`` and return an RRef to the result there.

    Errors in ``func`` are raised by ``to_here()`` (and the RRef proxies).
    """
    agent, rank, call_args, call_kwargs = _resolve_call(to, func, args, kwargs)
    return remote_call(agent, rank, func, call_args, call_kwargs, timeout)


def is_available() -> bool:
    """Whether RPC can be used in this process: always, with thenable (torch's may be built
    without it)."""
    return True


def get_stats(
    worker: str | int | WorkerInfo | None = None, timeout: float = -1.0
) -> dict[str, Any]:
    """A snapshot of a worker's RPC state, to spot a leak or a stall (default: this worker).

    Another worker's snapshot is fetched with one RPC.  The fields (counts unless named
    otherwise; all are read without stopping the worker, so they may be a moment apart):

    - ``worker``, ``rank``: whose snapshot it is; ``state``: ``running``, ``shutting_down``.
    - ``calls_in_flight``: calls this worker made that await their reply (every one ends by
      its reply, its timeout, the loss of its peer or shutdown); ``calls_issued``: application
      calls made so far.
    - ``requests_unanswered``: requests from other workers received and not yet answered
      (queued, running, or an ``@async_execution`` Future still pending).
    - ``timed_out_holding_rrefs``: timed-out calls whose RRef arguments are kept alive until
      the callee's late reply (or the connection's end).
    - ``handlers``: the pool that runs incoming requests: ``size`` (threads it keeps),
      ``threads`` (alive), ``busy`` (running a request), ``blocked`` (in a nested wait: a
      replacement thread serves meanwhile), ``idle``, ``queued`` (requests waiting for a
      thread).  A quick request may also run on the thread that read it, outside the pool:
      it counts in ``requests_unanswered`` only.
    - ``peers``: per worker name: ``connections`` open, ``send_queue_bytes`` (bytes waiting
      for that peer to read, bounded by ``RpcBackendOptions.max_send_queue_bytes``) and
      ``calls_in_flight`` to it.  ``send_queue_bytes``: their total.
    - ``shm``: same-host shared memory: ``out_segments``/``out_bytes`` mapped for sending and
      ``out_busy`` of them held by peers now; ``in_segments``/``in_bytes`` of peers' segments
      mapped here and ``in_lent``, those whose received message the application still holds.
    - ``rrefs``: ``owned`` (values this worker owns), ``forks`` (RRefs to them alive anywhere,
      the owner's count), ``early_releases`` (releases that overtook their fork's
      announcement), ``releases_queued`` (releases of RRefs dropped here, not yet sent).

    Raises:
        RuntimeError: RPC is not initialized.
        UnknownWorkerError: no worker has that name or rank.
        DestinationTypeError: ``worker`` is not a name, rank or WorkerInfo.
        RpcTimeoutError: the worker did not answer within ``timeout`` (-1: the default).
    """
    agent = _agent.require_agent()
    if worker is None:
        return agent.statistics()
    rank = agent.resolve(worker)
    if rank == agent.rank:
        return agent.statistics()
    seconds = agent_timeout(agent, timeout)
    stats: dict[str, Any] = agent.call(rank, _worker_stats, (), {}, seconds, counted=False).wait()
    return stats


@pinned
def _worker_stats() -> dict[str, Any]:
    """(RPC) This worker's ``get_stats()``."""
    return _agent.require_agent().statistics()


def get_rpc_timeout() -> float:
    """The default timeout of calls on this worker, in seconds (0: no limit).

    Raises:
        RuntimeError: RPC is not initialized.
    """
    return _agent.require_agent().rpc_timeout


def _set_rpc_timeout(rpc_timeout: float) -> None:
    """Change the default timeout of calls made from now on by this worker (0: no limit).

    Calls already made keep theirs.  (torch's name: private, but used by torch programs.)

    Raises:
        RuntimeError: RPC is not initialized.
        TypeError, ValueError: ``rpc_timeout`` is not a number of seconds >= 0.
    """
    agent = _agent.require_agent()
    if isinstance(rpc_timeout, bool) or not isinstance(rpc_timeout, (int, float)):
        raise TypeError(f"rpc_timeout must be seconds, got {rpc_timeout!r}")
    if not rpc_timeout >= 0:  # (NaN too)
        raise ValueError(f"rpc_timeout must be >= 0 seconds (0: no limit), got {rpc_timeout}")
    agent.rpc_timeout = float(rpc_timeout)


def get_worker_info(worker_name: str | None = None) -> WorkerInfo:
    """The WorkerInfo of ``worker_name``, or of this worker.

    Raises:
        ValueError: no worker has that name.
    """
    return _agent.require_agent().worker_info(worker_name)
