"""Authentication: workers with a shared key work; bad peers are dropped, workers keep serving.

One group of three workers shares a key (worker0 from THENABLE_AUTH_KEY, worker1 and worker2
from RpcBackendOptions.auth_key, as bytes and as str).  The test process probes worker1's
listening socket directly: each probe must see its connection closed by the worker, and the
worker must then still accept and serve a well-behaved peer.
"""

from __future__ import annotations

import json
import operator
import socket
import struct
from collections.abc import Iterator

import _remote_fns as fns
import pytest
from _harness import Group

from thenable.rpc._net import sockets as _sockets
from thenable.rpc._wire.protocol import Connection, Message, MessageKind
from thenable.rpc._wire.serialize import dumps, loads

KEY = "correct horse battery staple"
PROBE_IDENTITY = json.dumps({"name": "probe", "rank": 99}).encode()
HELLO = struct.Struct("!8sHBx32sQH")  # magic, version, flags, nonce, max frame, identity length
FRAME = struct.Struct("!2sBBIQQI")  # magic, kind, reserved, flags, request id, header len, nbuf
# How long a worker may take to drop a bad connection (its handshake limit is 10 s: a probe
# that is dropped must be dropped for what it sent, long before that).
DROP_S = 5.0


@pytest.fixture(scope="module")
def group() -> Iterator[Group]:
    with Group(3, env=[{"THENABLE_AUTH_KEY": KEY}, {}, {}]) as group:
        for ticket in [
            group.submit(0, fns.init_worker, 0, 3, group.port),
            group.submit(1, fns.init_worker, 1, 3, group.port, auth_key=KEY.encode()),
            group.submit(2, fns.init_worker, 2, 3, group.port, auth_key=KEY),
        ]:
            group.result(ticket)
        yield group
        group.call_all(fns.shutdown_if_running)


@pytest.fixture(scope="module")
def address(group: Group) -> tuple[str, int]:
    """Where worker1 listens."""
    host, port = group.call(1, fns.listener_address)
    assert host == "127.0.0.1"
    return host, port


def _connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=10.0)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"connection closed after {len(data)} of {size} bytes"
        data += chunk
    return data


def _assert_dropped(sock: socket.socket) -> None:
    """The worker closes the connection (whatever it sent before): EOF or reset, no timeout."""
    sock.settimeout(DROP_S)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the worker kept the connection open for {DROP_S} s")


def _call_through(address: tuple[str, int]) -> object:
    """A well-behaved peer: a fresh authenticated connection, one REQUEST, its RESPONSE."""
    peer = _sockets.connect(
        address, key=KEY.encode(), identity=PROBE_IDENTITY, max_frame_bytes=1 << 20, timeout=10
    )
    sock, protocol, identity = peer.sock, peer.protocol, peer.peer_identity
    assert not peer.descriptors
    with sock:
        sock.settimeout(10.0)
        assert json.loads(identity) == {"name": "worker1", "rank": 1}
        header, buffers = dumps((operator.add, (2, 3), {}))
        for part in protocol.send_message(MessageKind.REQUEST, 7, header, buffers):
            sock.sendall(part)
        while True:
            event = protocol.next_event()
            if event is None:
                data = sock.recv(65536)
                assert data, "the worker closed the connection instead of answering"
                protocol.receive_data(data)
                continue
            assert isinstance(event, Message), event
            assert event.kind is MessageKind.RESPONSE
            assert event.request_id == 7
            return loads(event.header, event.buffers)


def _assert_still_serving(group: Group, address: tuple[str, int]) -> None:
    assert _call_through(address) == 5
    assert group.call(0, fns.roundtrip, "worker1", 10) == 11


def test_workers_sharing_a_key_work(group: Group, address: tuple[str, int]) -> None:
    assert group.call(0, fns.roundtrip, "worker1", 1) == 2
    assert group.call(1, fns.roundtrip, "worker0", 2) == 3
    assert group.call(0, fns.roundtrip, "worker2", 3) == 4
    _assert_still_serving(group, address)


def test_garbage_is_dropped(group: Group, address: tuple[str, int]) -> None:
    with _connect(address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: worker1\r\n\r\n" + bytes(range(256)))
        _assert_dropped(sock)
    _assert_still_serving(group, address)


def test_hello_with_a_wrong_key_is_dropped(group: Group, address: tuple[str, int]) -> None:
    protocol = Connection(key=b"wrong", identity=PROBE_IDENTITY)
    with _connect(address) as sock:
        sock.sendall(protocol.initiate())
        # Read exactly the worker's HELLO, so that our (wrong) proof goes out before we would
        # check the worker's.
        head = _recv_exactly(sock, HELLO.size)
        protocol.receive_data(head + _recv_exactly(sock, HELLO.unpack(head)[-1]))
        assert protocol.next_event() is None
        proof = protocol.data_to_send()
        assert proof, "no proof to send"
        sock.sendall(proof)
        _assert_dropped(sock)
    _assert_still_serving(group, address)


def test_hello_without_a_key_is_dropped(group: Group, address: tuple[str, int]) -> None:
    protocol = Connection(key=None, identity=PROBE_IDENTITY)
    with _connect(address) as sock:
        sock.sendall(protocol.initiate())
        _assert_dropped(sock)
    _assert_still_serving(group, address)


@pytest.mark.parametrize("where", ["header", "buffer"])
def test_frame_claiming_2_to_the_40_bytes_is_dropped(
    group: Group, address: tuple[str, int], where: str
) -> None:
    """After a correct handshake, a frame header announcing a 1 TiB frame."""
    sock = _sockets.connect(
        address, key=KEY.encode(), identity=PROBE_IDENTITY, max_frame_bytes=1 << 20, timeout=10
    ).sock
    with sock:
        if where == "header":
            frame = FRAME.pack(b"TN", MessageKind.REQUEST, 0, 0, 1, 2**40, 0)
        else:
            frame = FRAME.pack(b"TN", MessageKind.REQUEST, 0, 0, 1, 16, 1) + struct.pack(
                "!Q", 2**40
            )
        sock.sendall(frame)
        _assert_dropped(sock)
    _assert_still_serving(group, address)


def test_silent_connection_does_not_block_others(group: Group, address: tuple[str, int]) -> None:
    """A peer that connects and sends nothing holds up no one while the worker waits for it."""
    with _connect(address) as silent:
        _assert_still_serving(group, address)
        silent.settimeout(DROP_S)
        assert _recv_exactly(silent, len(b"THNBLRPC")) == b"THNBLRPC"  # the worker's HELLO


def test_a_new_peer_joins_after_the_probes(group: Group, address: tuple[str, int]) -> None:
    """worker2 has not talked to worker1 yet: its first call makes a new connection."""
    assert group.call(2, fns.roundtrip, "worker1", 5) == 6
    assert group.call(1, fns.roundtrip, "worker2", 6) == 7
