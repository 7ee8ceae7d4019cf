"""Connection set-up (thenable.rpc._net.sockets): socket options of real TCP connections."""

from __future__ import annotations

import socket
import threading

import pytest

from thenable.rpc._net import sockets as _sockets

WAIT_S = 10.0


def _connected_pair() -> tuple[_sockets.Authenticated, _sockets.Authenticated]:
    """Both ends of one authenticated TCP connection on loopback: (dialled, accepted)."""
    accepted: list[_sockets.Authenticated] = []
    arrived = threading.Event()

    def on_accept(peer: _sockets.Authenticated) -> None:
        accepted.append(peer)
        arrived.set()

    listener = _sockets.Listener(
        ("127.0.0.1", 0),
        key=b"k",
        identity=b"server",
        max_frame_bytes=1 << 20,
        on_accept=on_accept,
    )
    listener.start()
    try:
        dialled = _sockets.connect(
            listener.address,
            key=b"k",
            identity=b"client",
            max_frame_bytes=1 << 20,
            timeout=WAIT_S,
        )
        assert arrived.wait(WAIT_S), "the listener never handed the connection over"
    finally:
        listener.close()
    return dialled, accepted[0]


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="Linux keepalive options")
def test_tcp_connections_probe_a_silent_peer_on_both_ends() -> None:
    """A peer whose host dies sends no FIN: keepalive probes notice it within about a minute,
    so calls to it fail instead of waiting forever."""
    for end in _connected_pair():
        with end.sock as sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == (
                _sockets.KEEPALIVE_IDLE_S
            )
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == (
                _sockets.KEEPALIVE_INTERVAL_S
            )
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == (
                _sockets.KEEPALIVE_PROBES
            )
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_a_connection_refused_at_shutdown_is_dropped_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer that connects while this worker shuts down (the agent refuses it with a
    ConnectionError) is closed with one informational line, not an error with a traceback."""
    refused = threading.Event()

    def on_accept(peer: _sockets.Authenticated) -> None:
        refused.set()
        raise ConnectionError("this worker is shut down")

    listener = _sockets.Listener(
        ("127.0.0.1", 0), key=b"k", identity=b"server", max_frame_bytes=1 << 20, on_accept=on_accept
    )
    listener.start()
    caplog.set_level("INFO", logger="thenable")
    try:
        dialled = _sockets.connect(
            listener.address, key=b"k", identity=b"client", max_frame_bytes=1 << 20, timeout=WAIT_S
        )
        assert refused.wait(WAIT_S)
        dialled.sock.settimeout(WAIT_S)
        assert dialled.sock.recv(1) == b""  # closed by the listener's side
        dialled.close()
    finally:
        listener.close()
    dropped = [r for r in caplog.records if "dropped connection" in r.getMessage()]
    assert [(r.levelname, r.exc_info) for r in dropped] == [("INFO", None)]
    assert "this worker is shut down" in dropped[0].getMessage()
