"""A link to a worker that is still being connected to: sending to it never waits for that.

The first message to a worker starts a thread that connects to it (a frozen or unreachable
worker can take the whole connect timeout).  What is sent meanwhile waits here, copied (the
caller may change its buffers once ``send`` returns), in order, within the connection's own
byte limit.  Once connected, the waiting messages go out on the connection before anything
sent later; if the connect fails, the waiting requests are handed to ``on_failed``, which
fails their calls.  A sender that must not go ahead before the connection exists (its message
carries state that a lost message would leak) calls ``wait`` instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from thenable.rpc._errors import SendQueueFullError
from thenable.rpc._net.transport import PeerConnection, owned
from thenable.rpc._wire.protocol import MessageKind

__all__ = ("Dialing",)

_LOGGER = logging.getLogger("thenable.rpc.agent")

# (dialing, the connection, the requests whose sending failed on it, with the error)
ConnectedHandler = Callable[["Dialing", PeerConnection, list[tuple[int, ConnectionError]]], None]
# (dialing, "cannot reach <peer>: <why>", the ids of the requests that waited)
FailedHandler = Callable[["Dialing", ConnectionError, list[int]], None]


@dataclass(slots=True)
class _Waiting:
    kind: MessageKind
    request_id: int
    header: bytes
    buffers: list[memoryview]
    droppable: bool
    nbytes: int


class Dialing:
    """Stands for the connection to ``peer_rank`` while a thread makes it with ``connect``."""

    def __init__(
        self,
        peer_rank: int,
        description: str,
        max_waiting_bytes: int,
        connect: Callable[[], PeerConnection],
        on_connected: ConnectedHandler,
        on_failed: FailedHandler,
    ) -> None:
        self.peer_rank = peer_rank
        self.description = description
        self._max_waiting_bytes = max_waiting_bytes
        self._connect = connect
        self._on_connected = on_connected
        self._on_failed = on_failed
        self._lock = threading.Lock()
        self._waiting: list[_Waiting] = []
        self._waiting_bytes = 0
        # Set once connected: the messages that waited are sent on it, then (``_forward``)
        # every later one goes straight to it.
        self._connection: PeerConnection | None = None
        self._forward = False
        # Set if the connect failed: "cannot reach <peer>: <why>" (a message, not the error
        # itself, whose traceback would hold the connecting frame and so this Dialing).
        self._failure: str | None = None
        self._settled = threading.Event()  # forwarding, or failed
        self._thread = threading.Thread(
            target=self._run, name=f"thenable-rpc-connect {description}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    @property
    def connection(self) -> PeerConnection | None:
        """The connection, once made (messages that waited may still be on their way to it)."""
        return self._connection

    @property
    def closed(self) -> bool:
        """Whether sending here fails: the connect failed, or the connection closed since."""
        connection = self._connection
        return self._failure is not None or (connection is not None and connection.closed)

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
        """``PeerConnection.send``: queued (copied) while connecting, then passed on.

        Raises:
            SendQueueFullError: the bytes waiting for the connection would exceed the limit.
            ConnectionError: the connect failed (or the connection is broken).
        """
        with self._lock:
            if not self._forward:
                if self._failure is not None:
                    raise ConnectionError(self._failure)
                nbytes = len(header) + sum(buffer.nbytes for buffer in buffers)
                waiting = self._waiting_bytes
                if waiting and waiting + nbytes > self._max_waiting_bytes:
                    raise SendQueueFullError(
                        f"{self.description} is not connected yet: {waiting} bytes already "
                        f"wait for the connection, and {nbytes} more would exceed "
                        f"max_send_queue_bytes={self._max_waiting_bytes}; retry once earlier "
                        "calls to it have completed, or raise "
                        "RpcBackendOptions.max_send_queue_bytes"
                    )
                self._waiting.append(
                    _Waiting(
                        kind,
                        request_id,
                        bytes(header),
                        [owned(buffer) for buffer in buffers],
                        droppable,
                        nbytes,
                    )
                )
                self._waiting_bytes += nbytes
                return
        assert self._connection is not None
        self._connection.send(kind, request_id, header, buffers, defer=defer, droppable=droppable)

    def drop(self, request_id: int) -> bool:
        """Take back a droppable request that still waits (its call timed out)."""
        with self._lock:
            for index, waiting in enumerate(self._waiting):
                if waiting.request_id == request_id and waiting.kind is MessageKind.REQUEST:
                    if not waiting.droppable:
                        return False
                    del self._waiting[index]
                    self._waiting_bytes -= waiting.nbytes
                    return True
            connection = self._connection
        return connection is not None and connection.drop(request_id)

    def wait(self, timeout: float | None = None) -> PeerConnection:
        """Block until every message that waited is sent on the new connection: the
        connection, for messages that must not wait here.

        Raises:
            ConnectionError: the connect failed (or did not end within ``timeout``).
        """
        if not self._settled.wait(timeout):
            raise ConnectionError(f"still connecting to {self.description}")
        if self._failure is not None:
            raise ConnectionError(self._failure)
        assert self._connection is not None
        return self._connection

    def _run(self) -> None:
        try:
            connection = self._connect()
        except BaseException as exc:  # OSError, ConnectionError, a failed handshake...
            failure = f"cannot reach {self.description}: {exc}"
            error = ConnectionError(failure)
            error.__cause__ = exc  # (for the handler; dropped with it)
            del exc  # (no cycle: its traceback holds this frame)
            with self._lock:
                self._failure = failure
                waiting, self._waiting = self._waiting, []
                self._waiting_bytes = 0
            self._settled.set()
            self._on_failed(
                self, error, [w.request_id for w in waiting if w.kind is MessageKind.REQUEST]
            )
            del error
            return
        self._connection = connection
        failed: list[tuple[int, ConnectionError]] = []
        while True:
            with self._lock:
                waiting, self._waiting = self._waiting, []
                self._waiting_bytes = 0
                if not waiting:
                    self._forward = True
                    break
            for message in waiting:
                try:
                    connection.send(
                        message.kind,
                        message.request_id,
                        message.header,
                        message.buffers,
                        droppable=message.droppable,
                    )
                except ConnectionError as exc:
                    if message.kind is MessageKind.REQUEST:
                        failed.append((message.request_id, exc))
                    else:
                        _LOGGER.info("a notification to %s was lost: %s", self.description, exc)
        self._settled.set()
        self._on_connected(self, connection, failed)
