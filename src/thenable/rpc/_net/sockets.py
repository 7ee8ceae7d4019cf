"""Opening ``thenable.rpc`` connections: addresses, listening, connecting, the handshake.

Workers listen on TCP, and on the same host (Linux) also on an abstract Unix-domain address:
no file to clean up, faster than loopback TCP, and able to pass file descriptors, which lets
large payloads travel through shared memory (``_shm``).  The handshake runs synchronously (in
the connecting thread, or a short-lived thread per accepted socket) under a time limit;
nothing is unpickled before it completes.  Its result, :class:`Authenticated`, becomes a
``_transport.PeerConnection``.  A peer that fails the handshake is dropped and logged; the
listener keeps going.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import secrets
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from thenable.rpc._net import memory as _recycled
from thenable.rpc._net import shm as _shm
from thenable.rpc._wire.protocol import (
    AuthenticationError,
    Connection,
    HandshakeComplete,
    ProtocolError,
)

__all__ = (
    "HANDSHAKE_TIMEOUT_S",
    "Address",
    "Authenticated",
    "Listener",
    "close_all",
    "connect",
    "describe_address",
    "descriptors_in",
    "handshake",
    "host_id",
    "local_address",
)

_LOGGER = logging.getLogger("thenable.rpc.sockets")

# How long an accepted socket may take to complete the handshake before it is dropped.
HANDSHAKE_TIMEOUT_S = 10.0

FD_SPACE = socket.CMSG_SPACE(_shm.MAX_PENDING_DESCRIPTORS * array.array("i").itemsize)
"""``recvmsg`` ancillary space for the descriptors a peer may send ahead of their frames."""

Address: TypeAlias = tuple[str, int] | str
"""(host, port) for TCP, or an abstract Unix-domain socket name (starting with NUL)."""


def descriptors_in(ancillary: list[tuple[int, int, bytes]], msg_flags: int) -> list[int]:
    """The file descriptors in ``recvmsg`` ancillary data (this process now owns them)."""
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if msg_flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ProtocolError("the peer sent more file descriptors than a frame may carry")
    return list(fds)


def handshake(sock: socket.socket, protocol: Connection, timeout: float) -> tuple[bytes, list[int]]:
    """Run the handshake on a connected socket; return the peer's identity, and the file
    descriptors that came with the bytes read (the caller owns them).

    The peer may send frames right after its last handshake bytes, and a read here may take
    them too: the protocol keeps their bytes, and on a Unix-domain socket the descriptor of
    a staged frame must be kept as well (``_shm``), so it is read with ``recvmsg``.

    Raises:
        AuthenticationError: the peer failed authentication.
        ProtocolError: the peer is not a thenable worker, broke the protocol, or closed the
            connection during the handshake.
        TimeoutError: the handshake took longer than ``timeout``.
        ConnectionError: the peer closed the connection during the handshake.
    """
    descriptors: list[int] = []
    sock.settimeout(timeout)
    try:
        sock.sendall(protocol.initiate())
        while True:
            event = protocol.next_event()
            out = protocol.data_to_send()
            if out:
                sock.sendall(out)
            if isinstance(event, HandshakeComplete):
                return event.peer_identity, descriptors
            if event is None:
                if sock.family == socket.AF_UNIX:
                    data, ancillary, msg_flags, _ = sock.recvmsg(65536, FD_SPACE)
                    descriptors += descriptors_in(ancillary, msg_flags)
                    if len(descriptors) > _shm.MAX_PENDING_DESCRIPTORS:
                        raise ProtocolError("the peer sent file descriptors during the handshake")
                else:
                    data = sock.recv(65536)
                protocol.receive_data(data)
    except BaseException as exc:
        close_all(descriptors)
        if isinstance(exc, TimeoutError):
            raise TimeoutError(f"the handshake did not complete within {timeout} s") from None
        raise
    finally:
        sock.settimeout(None)


def close_all(descriptors: Sequence[int]) -> None:
    for fd in descriptors:
        os.close(fd)


@dataclass(eq=False)
class Authenticated:
    """A connected socket whose handshake completed, ready for a :class:`PeerConnection`."""

    sock: socket.socket
    protocol: Connection
    peer_identity: bytes
    descriptors: list[int]  # received during the handshake (Unix-domain only); owned here

    def close(self) -> None:
        """Drop it unused."""
        close_all(self.descriptors)
        self.descriptors = []
        self.sock.close()


def host_id() -> str:
    """Equal on two workers that can reach each other's abstract Unix sockets (Linux: same
    boot and network namespace); empty where there are none."""
    if sys.platform != "linux":
        return ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            boot = file.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        return ""


def local_address() -> str | None:
    """A fresh abstract Unix-domain address to listen on, or None where there are none."""
    if not host_id():
        return None
    return f"\0thenable-rpc-{os.getpid()}-{secrets.token_hex(8)}"


def describe_address(address: Address) -> str:
    """``host:port``, or the Unix socket's name."""
    if isinstance(address, str):
        return "unix:" + address.lstrip("\0")
    return f"{address[0]}:{address[1]}"


KEEPALIVE_IDLE_S: Final = 30
"""TCP keepalive: a connection silent this long is probed ..."""
KEEPALIVE_INTERVAL_S: Final = 5
"""... every this many seconds ..."""
KEEPALIVE_PROBES: Final = 6
"""... and closed after this many unanswered probes: a peer whose host died or dropped off
the network is noticed within about a minute (calls to it fail with ConnectionError, even
those made without a timeout), instead of the kernel's default of over two hours."""


def _tune(sock: socket.socket) -> None:
    """TCP: no Nagle delay for small frames, and keepalive probes (a Unix-domain peer's death
    is always seen at once)."""
    if sock.family == socket.AF_UNIX:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; elsewhere the system's timings apply
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


def connect(
    address: Address,
    *,
    key: bytes | None,
    identity: bytes,
    max_frame_bytes: int,
    timeout: float,
) -> Authenticated:
    """Connect to ``address`` and authenticate.

    Raises:
        OSError: the connection could not be made (refused, unreachable, timed out).
        ProtocolError / AuthenticationError: the handshake failed.
    """
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection(address, timeout=timeout)
    try:
        _tune(sock)
        protocol = Connection(
            key=key,
            identity=identity,
            max_frame_bytes=max_frame_bytes,
            allocate=_recycled.allocate,
        )
        peer, descriptors = handshake(sock, protocol, timeout)
    except BaseException:
        sock.close()
        raise
    return Authenticated(sock, protocol, peer, descriptors)


class Listener:
    """Accepts connections on one address; each is authenticated, then handed to ``on_accept``.

    Args:
        address: (host, port) to listen on TCP (port 0: any free port; see ``address``), or
            an abstract Unix-domain name.
        key, identity, max_frame_bytes: this worker's handshake settings.
        on_accept: called with each authenticated peer; it may raise ValueError to refuse the
            peer (the connection is then closed).
    """

    def __init__(
        self,
        address: Address,
        *,
        key: bytes | None,
        identity: bytes,
        max_frame_bytes: int,
        on_accept: Callable[[Authenticated], None],
    ) -> None:
        self._key = key
        self._identity = identity
        self._max_frame_bytes = max_frame_bytes
        self._on_accept = on_accept
        self.address: Address
        if isinstance(address, str):
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._sock.bind(address)
                self._sock.listen(128)
            except BaseException:
                self._sock.close()
                raise
            self.address = address
        else:
            self._sock = socket.create_server(address, reuse_port=False, backlog=128)
            self.address = self._sock.getsockname()[:2]
        self._closed = False
        self._thread = threading.Thread(
            target=self._accept_loop,
            name=f"thenable-rpc-listener {describe_address(self.address)}",
            daemon=True,
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
            _tune(sock)
            protocol = Connection(
                key=self._key,
                identity=self._identity,
                max_frame_bytes=self._max_frame_bytes,
                allocate=_recycled.allocate,
            )
            peer, descriptors = handshake(sock, protocol, HANDSHAKE_TIMEOUT_S)
        except AuthenticationError as exc:
            _LOGGER.warning("rejected %s: peer failed authentication (%s)", peer_address, exc)
            sock.close()
        except (ProtocolError, ValueError, OSError) as exc:
            _LOGGER.warning("dropped connection from %s: %s", peer_address, exc)
            sock.close()
        except BaseException:
            _LOGGER.exception("dropped connection from %s", peer_address)
            sock.close()
        else:
            accepted = Authenticated(sock, protocol, peer, descriptors)
            try:
                self._on_accept(accepted)
            except ValueError as exc:
                _LOGGER.warning("dropped connection from %s: %s", peer_address, exc)
                accepted.close()
            except ConnectionError as exc:  # refused: this worker has shut down meanwhile
                _LOGGER.info("dropped connection from %s: %s", peer_address, exc)
                accepted.close()
            except BaseException:
                _LOGGER.exception("dropped connection from %s", peer_address)
                accepted.close()
