"""Sockets for ``thenable.rpc``: listening, connecting, the handshake, and framed send/receive.

Theory of operation
-------------------
Each TCP connection is driven by one sans-IO :class:`~thenable.rpc._protocol.Connection`.
The handshake runs synchronously (in the connecting thread, or a short-lived thread per accepted
socket) under a time limit; nothing is unpickled before it completes.  Then one *reader* thread
per connection receives frames (straight into the payload buffer for large messages) and hands
each message to the owner's ``on_message``.  Senders write from their own threads under a
per-connection lock with scatter/gather ``sendmsg``, so large buffers are never copied.

``on_message`` runs in the reader thread.  If it blocks in ``Future.wait`` (a user callback of an
RPC future calling ``rpc_sync``, say), the reader hands its job to a fresh reader thread first
(leader/follower), so a blocked callback never stops the connection from delivering the very
reply it waits for.

A connection that breaks the protocol (garbage, an oversized frame, a failed authentication)
is closed and logged; the listener and every other connection keep going.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from thenable._future import _PER_THREAD
from thenable.rpc._protocol import (
    AuthenticationError,
    Connection,
    ConnectionClosed,
    HandshakeComplete,
    Message,
    MessageKind,
    ProtocolError,
)

__all__ = ("Listener", "PeerConnection", "connect")

_LOGGER = logging.getLogger("thenable.rpc.transport")

_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
_RECV_BYTES = 1 << 18
# How long an accepted socket may take to complete the handshake before it is dropped.
HANDSHAKE_TIMEOUT_S = 10.0

MessageHandler = Callable[["PeerConnection", Message], None]
ClosedHandler = Callable[["PeerConnection", BaseException | None], None]


class PeerConnection:
    """An authenticated connection to one peer: thread-safe ``send``, a reader thread."""

    def __init__(
        self,
        sock: socket.socket,
        protocol: Connection,
        peer_rank: int,
        *,
        on_message: MessageHandler,
        on_closed: ClosedHandler,
        description: str,
    ) -> None:
        self._sock = sock
        self._protocol = protocol
        self.peer_rank = peer_rank  # which worker is on the other end
        self.description = description
        self._on_message = on_message
        self._on_closed = on_closed
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._closed = False
        self._reader: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<PeerConnection {self.description} {state}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        """Start delivering received messages to ``on_message``."""
        self._start_reader()

    def send(
        self,
        kind: MessageKind,
        request_id: int,
        header: bytes,
        buffers: Sequence[memoryview] = (),
    ) -> None:
        """Send one message; raises ConnectionError if the connection is (or becomes) broken."""
        with self._send_lock:
            if self._closed:
                raise ConnectionError(f"connection to {self.description} is closed")
            try:
                parts = self._protocol.send_message(kind, request_id, header, buffers)
                _send_all(self._sock, parts)
            except OSError as exc:
                error: BaseException = exc
            else:
                return
        self.close(error)
        raise ConnectionError(f"sending to {self.description} failed: {error}") from error

    def close(self, error: BaseException | None = None) -> None:
        """Close the socket (once) and report it through ``on_closed``."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):  # already disconnected
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._on_closed(self, error)

    # -- reading ------------------------------------------------------------------------------

    def _start_reader(self) -> None:
        reader = threading.Thread(
            target=self._read_loop, name=f"thenable-rpc-reader {self.description}", daemon=True
        )
        self._reader = reader
        reader.start()

    def _hand_off(self) -> Callable[[], None]:
        """The reader is about to block in a callback: let a new thread read meanwhile."""
        if self._reader is threading.current_thread() and not self._closed:
            self._start_reader()
        return _noop

    def _read_loop(self) -> None:
        _PER_THREAD.on_block = self._hand_off
        protocol = self._protocol
        sock = self._sock
        me = threading.current_thread()
        error: BaseException | None = None
        try:
            while self._reader is me:
                event = protocol.next_event()
                if event is None:
                    view = protocol.get_buffer(_RECV_BYTES)
                    received = sock.recv_into(view)
                    if received:
                        protocol.buffer_updated(received)
                    else:
                        protocol.receive_data(b"")
                    continue
                if isinstance(event, Message):
                    self._on_message(self, event)
                elif isinstance(event, ConnectionClosed):
                    break
        except ProtocolError as exc:
            _LOGGER.warning("dropping connection %s: %s", self.description, exc)
            error = exc
        except OSError as exc:
            error = exc if not self._closed else None
        except BaseException as exc:  # a bug in a handler must not pass silently
            _LOGGER.exception("reader of %s failed", self.description)
            error = exc
        if self._reader is me:
            self.close(error)


def _noop() -> None:
    return None


def _send_all(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    """Write every part with scatter/gather ``sendmsg``, resuming after partial writes."""
    views = [memoryview(part).cast("B") for part in parts]
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while sent:
            first = views[0]
            if sent >= first.nbytes:
                sent -= first.nbytes
                views.pop(0)
            else:
                views[0] = first[sent:]
                sent = 0
        while views and not views[0].nbytes:
            views.pop(0)


def handshake(sock: socket.socket, protocol: Connection, timeout: float) -> bytes:
    """Run the handshake on a connected socket; return the peer's identity.

    Raises:
        AuthenticationError: the peer failed authentication.
        ProtocolError: the peer is not a thenable worker, broke the protocol, or closed the
            connection during the handshake.
        TimeoutError: the handshake took longer than ``timeout``.
        ConnectionError: the peer closed the connection during the handshake.
    """
    sock.settimeout(timeout)
    try:
        sock.sendall(protocol.initiate())
        while True:
            event = protocol.next_event()
            out = protocol.data_to_send()
            if out:
                sock.sendall(out)
            if isinstance(event, HandshakeComplete):
                return event.peer_identity
            if event is None:
                data = sock.recv(65536)
                protocol.receive_data(data)
    except TimeoutError:
        raise TimeoutError(f"the handshake did not complete within {timeout} s") from None
    finally:
        sock.settimeout(None)


def connect(
    address: tuple[str, int],
    *,
    key: bytes | None,
    identity: bytes,
    max_frame_bytes: int,
    timeout: float,
) -> tuple[socket.socket, Connection, bytes]:
    """Connect to ``address`` and authenticate; return socket, protocol and peer identity.

    Raises:
        OSError: the connection could not be made (refused, unreachable, timed out).
        ProtocolError / AuthenticationError: the handshake failed.
    """
    sock = socket.create_connection(address, timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        protocol = Connection(key=key, identity=identity, max_frame_bytes=max_frame_bytes)
        peer = handshake(sock, protocol, timeout)
    except BaseException:
        sock.close()
        raise
    return sock, protocol, peer


class Listener:
    """Accepts connections on one address; each is authenticated, then handed to ``on_accept``.

    Args:
        host, port: where to listen (port 0: any free port; see ``address``).
        key, identity, max_frame_bytes: this worker's handshake settings.
        on_accept: called with (socket, protocol, peer identity) of each authenticated peer;
            it may raise ValueError to refuse the peer (the socket is then closed).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        key: bytes | None,
        identity: bytes,
        max_frame_bytes: int,
        on_accept: Callable[[socket.socket, Connection, bytes], None],
    ) -> None:
        self._key = key
        self._identity = identity
        self._max_frame_bytes = max_frame_bytes
        self._on_accept = on_accept
        self._sock = socket.create_server((host, port), reuse_port=False, backlog=128)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._closed = False
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"thenable-rpc-listener {self.address}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop accepting; connections already made are not affected."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        self._sock.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, peer_address = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                _LOGGER.exception("accept() failed on %s; still listening", self.address)
                continue
            threading.Thread(
                target=self._admit,
                args=(sock, peer_address),
                name=f"thenable-rpc-handshake {peer_address}",
                daemon=True,
            ).start()

    def _admit(self, sock: socket.socket, peer_address: Any) -> None:
        """Authenticate one accepted socket and hand it over, or drop it with a log line."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            protocol = Connection(
                key=self._key, identity=self._identity, max_frame_bytes=self._max_frame_bytes
            )
            peer = handshake(sock, protocol, HANDSHAKE_TIMEOUT_S)
            self._on_accept(sock, protocol, peer)
        except AuthenticationError as exc:
            _LOGGER.warning("rejected %s: peer failed authentication (%s)", peer_address, exc)
            sock.close()
        except (ProtocolError, ValueError, OSError) as exc:
            _LOGGER.warning("dropped connection from %s: %s", peer_address, exc)
            sock.close()
        except BaseException:
            _LOGGER.exception("dropped connection from %s", peer_address)
            sock.close()
