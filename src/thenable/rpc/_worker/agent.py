"""The RPC agent: one per process; sends calls, serves calls, and owns the connections.

Theory of operation
-------------------
A call (``call``) gets a fresh request id and a Future recorded in the pending table, is
serialized (pickle 5, out-of-band buffers) and sent on the connection to its destination, made
on first use.  The reply (RESPONSE or ERROR_RESPONSE with the same id) arrives on a reader thread,
which removes the entry and completes the Future.  Every pending call ends exactly once: by its
reply, its timeout (a timer), the loss of its connection, or shutdown.

Incoming requests are deserialized and run on the handler pool (an ``InteropPool``), which starts
a replacement thread whenever a handler blocks in a nested call, so nested ``rpc_sync`` never
deadlocks a busy worker.  A function marked ``async_execution`` returns a Future; the reply is
sent from that Future's callback, and no thread waits for it.

Calls to this worker itself take the same path through a local link that copies the buffers, so
the callee never aliases the caller's arrays.
"""

from __future__ import annotations

import enum
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from thenable import _future
from thenable._future import Future
from thenable._pool import InteropPool
from thenable._tracing import recorder as _recorder
from thenable._tracing.trace_hooks import name_of
from thenable.rpc._errors import (
    RpcConnectionError,
    RpcError,
    RpcTimeoutError,
    SendQueueFullError,
    SerializationError,
    UnknownWorkerError,
)
from thenable.rpc._net import memory as _recycled
from thenable.rpc._net.dialing import Dialing
from thenable.rpc._net.sockets import (
    Address,
    Authenticated,
    Listener,
    connect,
    describe_address,
    host_id,
    local_address,
)
from thenable.rpc._net.transport import IncomingLink, Link, PeerConnection
from thenable.rpc._options import RpcBackendOptions, WorkerInfo, destination_type_error
from thenable.rpc._rref import OwnerTable
from thenable.rpc._wire.protocol import Message, MessageKind
from thenable.rpc._wire.serialize import dumps, loads, loads_exception
from thenable.rpc._worker import context as _context
from thenable.rpc._worker import extensions as _extensions
from thenable.rpc._worker.calls import Calls, Pending, describe_call, flow_id
from thenable.rpc._worker.serving import Serving

__all__ = ("Agent", "AgentState", "WorkerAddress")

_LOGGER = logging.getLogger("thenable.rpc.agent")

# How long connecting to a peer that is known to be up may take.
_CONNECT_TIMEOUT_S = 10.0


class AgentState(enum.Enum):
    """RUNNING -> SHUTTING_DOWN -> SHUT_DOWN; new calls are refused once SHUT_DOWN."""

    RUNNING = "running"
    SHUTTING_DOWN = "shutting down"
    SHUT_DOWN = "shut down"


@dataclass(frozen=True)
class WorkerAddress:
    """Where a worker listens, as learned at rendezvous."""

    name: str
    rank: int
    host: str
    port: int
    local: str | None = None  # abstract Unix-domain address, for workers on the same host
    host_id: str = ""  # equal for workers that can use each other's ``local`` address


class Agent:
    """The process's RPC worker; made by ``init_rpc``, ended by ``shutdown``."""

    def __init__(
        self,
        name: str,
        rank: int,
        world_size: int,
        options: RpcBackendOptions,
        key: bytes | None,
        listen: tuple[str, int],
    ) -> None:
        self.name = name
        self.rank = rank
        self.world_size = world_size
        self.options = options
        # Default seconds of a call (0: no limit); rpc._set_rpc_timeout changes it.
        self.rpc_timeout = float(options.rpc_timeout)
        self._key = key
        self._identity = json.dumps({"name": name, "rank": rank}).encode()
        self._state = AgentState.RUNNING
        self._lock = threading.Lock()
        self._calls = Calls(self._lock, f"thenable-rpc-timer-{name}", self._on_timeout)
        self._serving = Serving(self, self._lock)
        # Requests received and not yet answered; shutdown waits for them to reach zero.
        self._workers: dict[int, WorkerAddress] = {}
        self._ranks_by_name: dict[str, int] = {}
        self._links: dict[int, PeerConnection] = {}  # rank -> the connection for requests to it
        self._connecting: dict[int, Dialing] = {}  # rank -> the connect under way
        self._all_connections: set[PeerConnection] = set()
        self._local_link = _LocalLink(self)
        self.rrefs = OwnerTable(self)
        self.pool = InteropPool(options.num_worker_threads, name=f"thenable-rpc-{name}")
        self.listener = self._listen(listen)
        self._host_id = host_id() if options.same_host_ipc else ""
        # Same-host peers connect here instead (see _sockets).
        self.local_listener: Listener | None = None
        local = local_address() if self._host_id else None
        if local is not None:
            try:
                self.local_listener = self._listen(local)
            except OSError as exc:
                _LOGGER.info("no Unix-domain listener (%s); same-host peers use TCP", exc)
        # Rank 0's join and barrier bookkeeping (a _rendezvous.Coordinator), set before start().
        self.coordinator: Any = None
        self._ready = threading.Event()

    def _listen(self, address: Address) -> Listener:
        return Listener(
            address,
            key=self._key,
            identity=self._identity,
            max_frame_bytes=self.options.max_message_bytes,
            on_accept=self._on_accept,
        )

    def start(self) -> None:
        """Start accepting connections."""
        self.listener.start()
        if self.local_listener is not None:
            self.local_listener.start()

    def address(self) -> WorkerAddress:
        """Where other workers reach this one (published at rendezvous)."""
        tcp = self.listener.address
        local = self.local_listener.address if self.local_listener is not None else None
        assert isinstance(tcp, tuple) and not isinstance(local, tuple)
        host, port = tcp
        return WorkerAddress(self.name, self.rank, host, port, local, self._host_id)

    # -- identity and routing -----------------------------------------------------------------

    @property
    def state(self) -> AgentState:
        return self._state

    def set_workers(self, workers: Sequence[WorkerAddress]) -> None:
        """Install the table of every worker, learned at rendezvous."""
        with self._lock:
            self._workers = {w.rank: w for w in workers}
            self._ranks_by_name = {w.name: w.rank for w in workers}
            # A TCP link made before the table was known (the join) is replaced by a
            # same-host connection on next use; it stays open for what is in flight on it.
            for rank, link in list(self._links.items()):
                if not link.is_local and self._same_host(self._workers.get(rank)):
                    del self._links[rank]
        self._ready.set()

    def _same_host(self, worker: WorkerAddress | None) -> bool:
        return (
            worker is not None
            and worker.local is not None
            and bool(self._host_id)
            and worker.host_id == self._host_id
        )

    def worker_info(self, name: str | None = None) -> WorkerInfo:
        if name is None:
            return WorkerInfo(self.name, self.rank)
        return WorkerInfo(name, self.resolve(name))

    def worker_infos(self) -> list[WorkerInfo]:
        """Every worker of the group, by rank (this one included)."""
        return [WorkerInfo(w.name, w.rank) for _, w in sorted(self._workers.items())]

    def name_of(self, rank: int) -> str:
        worker = self._workers.get(rank)
        return worker.name if worker is not None else f"rank {rank}"

    def resolve(self, to: object) -> int:
        """The rank of a destination given as name, rank or WorkerInfo.

        Raises:
            UnknownWorkerError: no such worker (a ``ValueError``).
            DestinationTypeError: ``to`` is of another type (a ``TypeError`` and an
                ``UnknownWorkerError``: torch raises ``ValueError``), at once.
        """
        if type(to) is str:  # the common case first
            rank = self._ranks_by_name.get(to)
            if rank is not None:
                return rank
        elif not isinstance(to, (str, WorkerInfo, int)) or isinstance(to, bool):
            raise destination_type_error(to)
        if not self._ready.is_set():
            # A handler may run before init_rpc has learned the table (a peer was faster).
            self._ready.wait(self.rpc_timeout or None)
        if isinstance(to, WorkerInfo):
            to = to.id
        if isinstance(to, str):
            rank = self._ranks_by_name.get(to)
            if rank is None:
                raise UnknownWorkerError(
                    f"unknown destination worker {to!r}; the workers are "
                    f"{sorted(self._ranks_by_name)}"
                )
            return rank
        if to not in self._workers:
            raise UnknownWorkerError(
                f"unknown destination rank {to}; ranks are 0..{self.world_size - 1}"
            )
        return to

    # -- calling ------------------------------------------------------------------------------

    def call(
        self,
        to_rank: int,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float,
        *,
        counted: bool = True,
    ) -> Future[Any]:
        """Send ``fn(*args, **kwargs)`` to ``to_rank``; return the Future of its reply.

        Raises (at once, in the caller):
            RuntimeError: the agent is shut down.
            SerializationError: an argument cannot be pickled.
        """
        if self._state is AgentState.SHUT_DOWN:
            raise RuntimeError(
                "RPC is shut down on this worker; call init_rpc() again to make new calls"
            )
        traced_from = _recorder.now() if _recorder.recording else 0
        extension = _extensions.installed
        extra = None if extension is None else extension.request_extra(self, to_rank)
        if extra is None:
            with _context.sending(self, to_rank, is_request=True) as message:
                header, buffers = dumps((fn, args, kwargs))
        else:
            with _context.sending(self, to_rank, is_request=True, note_grads=True) as message:
                header, buffers = dumps((fn, args, kwargs, extra))
            extension.sent(self, to_rank, extra, message.grad_tensors())  # type: ignore[union-attr]
        record = message.record
        future: Future[Any] = Future()
        request_id = self._calls.new_id()
        # A request that carries no RRef and no autograd bookkeeping may be taken back, unsent,
        # when it times out while queued for a peer that does not read (see _expire); it may
        # also wait, copied, for a first connection to its peer instead of the caller.
        droppable = extra is None and record is _context.NO_FORKS
        try:
            link = self._link_to(to_rank, wait=not droppable)
        except ConnectionError as exc:  # ("cannot reach <peer>: <why>")
            record.unsent()
            error = RpcConnectionError(f"{describe_call(fn, self.name_of(to_rank))} failed: {exc}")
            _future.complete(future, None, error)
            return future
        holds = record.holds or None
        self._calls.add(request_id, Pending(future, to_rank, link, fn, counted, timeout, holds))
        if traced_from:
            _recorder.flow("s", flow_id(self.rank, request_id, False), "rpc")
        try:
            link.send(MessageKind.REQUEST, request_id, header, buffers, droppable=droppable)
        except ConnectionError as exc:
            record.unsent()
            self._fail_sending(request_id, exc)
        else:
            record.sent()
        if traced_from:
            self.traced(f"rpc {name_of(fn)}", traced_from, to_rank, request_id, header, buffers)
        return future

    def traced(
        self,
        span: str,
        start: int,
        peer: int,
        request_id: int,
        header: bytes | None = None,
        buffers: list[memoryview] | None = None,
        **more: Any,
    ) -> None:
        """Record a span of an RPC message (see thenable._tracing.trace)."""
        args: dict[str, Any] = {"peer": self.name_of(peer), "id": request_id, **more}
        if header is not None:
            args["bytes"] = len(header) + sum(b.nbytes for b in buffers or ())
        _recorder.complete(span, "rpc", start, args)

    def notify(self, to_rank: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Send ``fn(*args)`` to ``to_rank`` with no reply: for quick internal bookkeeping.

        The receiver runs it in the thread that reads the connection, before it reads the
        next message, so a later request on the same connection sees its effect.  Failures
        there are logged.

        Raises:
            ConnectionError: the worker cannot be reached.
            SerializationError: an argument cannot be pickled.
        """
        header, buffers = dumps((fn, args, {}))
        self._link_to(to_rank).send(MessageKind.NOTIFY, 0, header, buffers)

    def _on_timeout(self, pending: Pending, timeout: float) -> None:
        """A call timed out (``Calls`` took it out of the table): its Future fails."""
        error = RpcTimeoutError.after_timeout(
            f"RPC {pending.describe(self.name_of)} timed out after {timeout} s", timeout
        )
        # Completed on the pool: user callbacks must not stall the timer thread (unless the
        # pool is shut down: then here, so that the call still ends).
        done = self.pool.submit(_future.complete, pending.future, None, error)
        refused = done.done() and _future.exception_of(done) is not None  # (shut down)
        if refused:
            _future.complete(pending.future, None, error, strict=False)

    def _fail_sending(self, request_id: int, exc: ConnectionError) -> None:
        """A request could not be sent: its call fails (a full queue as SendQueueFullError)."""
        pending = self._calls.take(request_id)
        if pending is not None:
            error_type = (
                SendQueueFullError if isinstance(exc, SendQueueFullError) else RpcConnectionError
            )
            _future.complete(
                pending.future, None, error_type(f"{pending.describe(self.name_of)} failed: {exc}")
            )

    def pending_count(self) -> int:
        return self._calls.count()

    def statistics(self) -> dict[str, Any]:
        """A snapshot of this worker's calls, handlers, queues and memory (``rpc.get_stats``)."""
        with self._lock:
            in_flight: dict[str, int] = {}
            ranks, late, issued = self._calls.snapshot_locked()
            for rank in ranks:
                to = self.name_of(rank)
                in_flight[to] = in_flight.get(to, 0) + 1
            unanswered = self._serving.unanswered_locked()
            connections = [c for c in self._all_connections if not c.closed]
            state = self._state.name.lower()
        pool = self.pool.statistics()
        peers: dict[str, dict[str, Any]] = {}
        shm = dict.fromkeys(
            ("out_segments", "out_bytes", "out_busy", "in_segments", "in_bytes", "in_lent"), 0
        )
        for conn in connections:
            stats = conn.statistics()
            peer = peers.setdefault(
                self.name_of(conn.peer_rank), {"connections": 0, "send_queue_bytes": 0}
            )
            peer["connections"] += 1
            peer["send_queue_bytes"] += stats["send_queue_bytes"]
            for side in ("out", "in"):
                for key, value in stats.get(f"shm_{side}", {}).items():
                    shm[f"{side}_{key}"] += value
        for name in in_flight:
            peers.setdefault(name, {"connections": 0, "send_queue_bytes": 0})
        for name, peer in peers.items():
            peer["calls_in_flight"] = in_flight.get(name, 0)
        return {
            "worker": self.name,
            "rank": self.rank,
            "state": state,
            "calls_in_flight": sum(in_flight.values()),
            "calls_issued": issued,
            "requests_unanswered": unanswered,
            "timed_out_holding_rrefs": late,
            "handlers": {
                "size": pool["size"],
                "threads": pool["workers"],
                "busy": pool["workers"] - pool["idle"] - pool["blocked"],
                "blocked": pool["blocked"],
                "idle": pool["idle"],
                "queued": pool["queued"],
            },
            "peers": dict(sorted(peers.items())),
            "send_queue_bytes": sum(peer["send_queue_bytes"] for peer in peers.values()),
            "shm": shm,
            "rrefs": self.rrefs.statistics(),
        }

    def issued_count(self) -> int:
        return self._calls.issued()

    def wait_idle(self, deadline: float | None) -> None:
        """Block until no call of this worker is pending (or ``deadline`` passes)."""
        self._calls.wait_idle(deadline)

    # -- connections --------------------------------------------------------------------------

    def _link_to(self, rank: int, wait: bool = True) -> Link:
        """The link for messages to ``rank``; connects first if there is none.

        The connect runs in a thread of its own (see ``_dialing``): with ``wait``, this blocks
        until it is done (the link is the connection); without, it returns at once, and the
        link while connecting is the ``Dialing``, where messages wait for the connection.

        Raises:
            ConnectionError: no address is known for ``rank``; with ``wait``, the connect
                failed.
        """
        if rank == self.rank:
            return self._local_link
        link = self._links.get(rank)
        if link is not None and not link.closed:
            return link
        with self._lock:
            link = self._links.get(rank)
            if link is not None and not link.closed:
                return link
            dialing = self._connecting.get(rank)
            if dialing is None:
                worker = self._workers.get(rank)
                if worker is None:
                    raise ConnectionError(f"cannot reach rank {rank}: no address is known for it")
                dialing = self._connecting[rank] = Dialing(
                    rank,
                    f"{worker.name} (rank {rank})",
                    self.options.max_send_queue_bytes,
                    lambda: self._connect(worker),
                    self._on_dialed,
                    self._on_dial_failed,
                )
                dialing.start()
        return dialing.wait() if wait else dialing

    def _on_dialed(
        self,
        dialing: Dialing,
        conn: PeerConnection,
        failed: list[tuple[int, ConnectionError]],
    ) -> None:
        """A connect is done and what waited for it is sent (but ``failed``): use it."""
        with self._lock:
            if self._connecting.get(dialing.peer_rank) is dialing:
                del self._connecting[dialing.peer_rank]
            link = self._links.get(dialing.peer_rank)
            if not conn.closed and (link is None or link.closed):
                self._links[dialing.peer_rank] = conn
        for request_id, exc in failed:
            self._fail_sending(request_id, exc)

    def _on_dial_failed(self, dialing: Dialing, error: ConnectionError, waited: list[int]) -> None:
        """A connect failed: the requests that waited for it fail; the next message retries."""
        with self._lock:
            if self._connecting.get(dialing.peer_rank) is dialing:
                del self._connecting[dialing.peer_rank]
            self._calls.forget_late_holds_on_locked(dialing)
        for request_id in waited:
            self._fail_sending(request_id, error)

    def _connect(self, worker: WorkerAddress) -> PeerConnection:
        """A new connection to ``worker`` (not yet the link to it: see ``_on_dialed``)."""
        rank = worker.rank
        if self._same_host(worker):
            assert worker.local is not None
            try:
                return self._dial(rank, worker.local, _CONNECT_TIMEOUT_S)
            except OSError as exc:
                _LOGGER.info("same-host connection to rank %d failed (%s); using TCP", rank, exc)
        return self._dial(rank, (worker.host, worker.port), _CONNECT_TIMEOUT_S)

    def connect_to(self, rank: int, address: Address, timeout: float) -> PeerConnection:
        """Connect to the worker ``rank`` at ``address`` and use it for requests to that rank."""
        conn = self._dial(rank, address, timeout)
        with self._lock:
            self._links[rank] = conn
        return conn

    def _dial(self, rank: int, address: Address, timeout: float) -> PeerConnection:
        """Connect to the worker ``rank`` at ``address``: the connection, started."""
        peer = connect(
            address,
            key=self._key,
            identity=self._identity,
            max_frame_bytes=self.options.max_message_bytes,
            timeout=timeout,
        )
        try:
            peer_name, peer_rank = _parse_identity(peer.peer_identity)
        except ValueError:
            peer.close()
            raise
        if peer_rank != rank:
            peer.close()
            raise ConnectionError(
                f"expected rank {rank} at {describe_address(address)}, found {peer_name!r} "
                f"(rank {peer_rank})"
            )
        return self._adopt(peer, peer_name, peer_rank)

    def _on_accept(self, peer: Authenticated) -> None:
        peer_name, peer_rank = _parse_identity(peer.peer_identity)
        conn = self._adopt(peer, peer_name, peer_rank)
        with self._lock:
            # A TCP connection from a same-host worker is only its join: once the table is
            # known (set_workers, under this lock), calls to it go through a local connection.
            wanted = conn.is_local or not self._same_host(self._workers.get(peer_rank))
            link = self._links.get(peer_rank)
            if wanted and (link is None or link.closed or (conn.is_local and not link.is_local)):
                self._links[peer_rank] = conn

    def _adopt(self, peer: Authenticated, peer_name: str, peer_rank: int) -> PeerConnection:
        conn = PeerConnection(
            peer.sock,
            peer.protocol,
            peer_rank,
            on_message=self._on_message,
            on_closed=self._on_closed,
            description=f"{peer_name} (rank {peer_rank})",
            descriptors=peer.descriptors,
            busy_poll_s=self.options.busy_poll_us / 1e6,
            max_send_queue_bytes=self.options.max_send_queue_bytes,
            heartbeat_s=self.options.heartbeat_s,
        )
        with self._lock:
            refused = self._state is AgentState.SHUT_DOWN
            if not refused:
                self._all_connections.add(conn)
        if refused:
            conn.close()
            raise ConnectionError("this worker is shut down")
        if self.coordinator is not None:
            self.coordinator.peer_back(peer_rank)
        conn.start()
        return conn

    def _on_closed(self, conn: PeerConnection, error: BaseException | None) -> None:
        """A connection is gone: every call waiting on it fails now, not at its timeout."""
        with self._lock:
            self._all_connections.discard(conn)
            # (Another connection to the rank still open: it is alive, as far as we know.)
            last = not any(
                c.peer_rank == conn.peer_rank and not c.closed for c in self._all_connections
            )
            if self._links.get(conn.peer_rank) is conn:
                del self._links[conn.peer_rank]
            entries = self._calls.take_went_on_locked(conn)
        if self.coordinator is not None and self._state is not AgentState.SHUT_DOWN and last:
            self.coordinator.peer_lost(conn.peer_rank)
        if self._state is AgentState.SHUT_DOWN:
            reason = "RPC was shut down"
        else:
            reason = f"lost the connection to {conn.description}" + (
                f": {error}" if error is not None else " (it closed)"
            )
        for entry in entries:
            _future.complete(
                entry.future,
                None,
                RpcConnectionError(f"RPC {entry.describe(self.name_of)} failed: {reason}"),
            )

    # -- receiving ----------------------------------------------------------------------------

    def _on_message(self, link: IncomingLink, message: Message) -> None:
        kind = message.kind
        if kind is MessageKind.REQUEST:
            self._serving.on_request(link, message)
        elif kind is MessageKind.RESPONSE or kind is MessageKind.ERROR_RESPONSE:
            self._on_reply(link, message)
        elif kind is MessageKind.NOTIFY:
            self._serving.on_notification(link, message)
        else:
            _LOGGER.warning("ignoring a %s message from %r", kind.name, link)

    def _on_reply(self, link: IncomingLink, message: Message) -> None:
        pending = self._calls.take_answered(message.request_id)
        if pending is None:
            return  # it timed out or was failed already; the late reply is dropped
        start = 0
        if _recorder.recording:
            arrow = flow_id(self.rank, message.request_id, True)
            start = _recorder.flow_in_span("f", arrow, "rpc reply")
        try:
            with _context.receiving(self, pending.peer_rank) as received:
                if message.kind is MessageKind.RESPONSE:
                    value = loads(message.header, message.buffers)
                    exception = None
                else:
                    value = None
                    exception = loads_exception(message.header, message.buffers)
            if type(value) is _extensions.Reply:
                extension = _extensions.installed
                if extension is not None:  # (installed by unpickling the extra)
                    extension.received(self, pending.peer_rank, value.extra, received.grad_tensors)
                value = value.value
        except Exception as exc:
            value = None
            exception = self.load_error(f"the reply to the {pending.describe(self.name_of)}", exc)
        _future.complete(pending.future, value, exception)
        if start:
            span = f"reply {name_of(pending.fn)}"
            self.traced(span, start, pending.peer_rank, message.request_id, failed=bool(exception))
        # A load error's traceback holds this frame: no cycle back to the error through it.
        del pending, exception

    def load_error(self, what: str, exc: Exception) -> SerializationError:
        """The error for a received message that cannot be unpickled here (torch: RuntimeError)."""
        error = SerializationError(
            f"worker {self.name!r} cannot load {what}: {type(exc).__name__}: {exc}; functions "
            "and the classes of arguments and results must be importable on both sides, under "
            "the same module names"
        )
        error.__cause__ = exc
        return error

    def wait_answered(self, deadline: float | None) -> None:
        """Block until every request received so far has been answered (or ``deadline``)."""
        self._serving.wait_answered(deadline)

    # -- shutdown -----------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        with self._lock:
            if self._state is AgentState.RUNNING:
                self._state = AgentState.SHUTTING_DOWN

    def stop(self) -> None:
        """Close everything at once; every call still pending fails with a clear error."""
        with self._lock:
            if self._state is AgentState.SHUT_DOWN:
                return
            self._state = AgentState.SHUT_DOWN
            entries = self._calls.take_all_locked()
            connections = list(self._all_connections)
        self.listener.close()
        if self.local_listener is not None:
            self.local_listener.close()
        for conn in connections:
            conn.close()
        for entry in entries:
            _future.complete(
                entry.future,
                None,
                RpcError(
                    f"RPC {entry.describe(self.name_of)} failed: RPC was shut down on this worker"
                ),
            )
        self._calls.close()
        self.rrefs.close()
        self.pool.shutdown(wait=False)
        _recycled.drop_idle()  # received-payload memory kept for reuse: no more receiving


class _LocalLink:
    """The link for calls to this worker itself: delivers messages with copied buffers."""

    closed = False

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self.peer_rank = agent.rank

    def __repr__(self) -> str:
        return f"<local link of {self._agent.name}>"

    def may_run_inline(self) -> bool:
        return False  # the caller's thread: calls to oneself run on the pool

    def run_inline(self, fn: Callable[..., object], *args: Any) -> None:
        raise AssertionError("calls to oneself are never run inline")

    def send(
        self,
        kind: MessageKind,
        request_id: int,
        header: bytes,
        buffers: Sequence[memoryview] = (),
        *,
        defer: bool = False,
        droppable: bool = False,
    ) -> None:
        copies = [memoryview(bytearray(b)) for b in buffers]  # the callee owns its data
        message = Message(kind, request_id, 0, memoryview(header), copies)
        self._agent._on_message(self, message)

    def drop(self, request_id: int) -> bool:
        return False  # delivered at once: nothing ever waits


def current_agent() -> Agent | None:
    """This process's agent (``init_rpc`` sets it), if any.

    ``_context`` holds it for the layers below the agent, which see it as a ``Worker``; the
    layers above take it from here, as the ``Agent`` it is.
    """
    return cast("Agent | None", _context.current_agent())


def require_agent() -> Agent:
    """This process's agent, or the RuntimeError telling the user to call ``init_rpc``."""
    return cast(Agent, _context.require_agent())


def _parse_identity(identity: bytes) -> tuple[str, int]:
    """The (name, rank) a peer announced in its handshake.

    Raises:
        ValueError: the identity is not what a thenable worker sends.
    """
    try:
        data = json.loads(identity)
        name, rank = data["name"], data["rank"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"peer sent an invalid identity {identity[:80]!r}") from None
    if not isinstance(name, str) or not isinstance(rank, int) or isinstance(rank, bool):
        raise ValueError(f"peer sent an invalid identity {identity[:80]!r}")
    return name, rank
