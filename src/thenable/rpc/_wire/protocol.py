"""Sans-IO wire protocol of ``thenable.rpc``: bytes in -> events out, messages in -> bytes out.

The module does no I/O, starts no threads and reads no clocks; the only non-determinism is
``os.urandom`` for the handshake nonce, which callers may inject.  Drivers (blocking sockets,
asyncio, a fake link in tests) own the transport and call into a :class:`Connection`.
"""

# Theory of operation
# ===================
#
# One TCP connection carries one :class:`Connection` on each end.  Both ends are symmetric:
# there is no client or server role in the protocol, only "us" and "the peer".
#
# Handshake
# ---------
# 1. Both ends call ``initiate()`` and send the returned HELLO at once, without waiting:
#
#        magic    8s  b"THNBLRPC"          - rejects anything that is not a thenable peer
#        version  H   PROTOCOL_VERSION     - rejects a peer speaking another version
#        flags    B   bit 0: "I have a key" - unknown bits are rejected
#        pad      x
#        nonce    32s os.urandom(32)       - fresh per connection
#        max      Q   max_frame_bytes      - the largest frame this end will accept
#        idlen    H   length of identity
#        identity     opaque bytes chosen by the caller (worker name, rank, ...)
#
# 2. Without keys on either end the handshake is complete once the peer's HELLO has arrived.
#    If exactly one end has a key both ends fail with AuthenticationError.
# 3. With keys, each end answers the peer's HELLO with an AUTH frame (an ordinary frame of
#    the internal kind 0 whose header is a 32-byte proof) and completes once the peer's proof
#    verifies:
#
#        proof(prover) = HMAC-SHA256(key, DOMAIN || len || HELLO(prover) || len || HELLO(verifier))
#
#    Both HELLOs are covered, so the proof binds both fresh nonces (no replay from an earlier
#    connection), both identities and advertised limits (no tampering) and, through their
#    order, the direction: a proof reflected back to its author does not verify, because the
#    author expects its peer's HELLO first.  Proofs are compared with hmac.compare_digest.
#
#    A symmetric protocol has one more trap, the "mirror" attack: an attacker who gets us to
#    connect to it opens a second connection to us and relays each connection's HELLO and
#    proof into the other, so that we authenticate ourselves.  Whatever it relays is our own
#    HELLO, so it necessarily presents *our own identity*; with a key, a peer whose identity
#    equals ours (or whose nonce equals ours) is therefore rejected before any proof is
#    sent.  This is why an endpoint must use the same identity on all of its connections and
#    distinct endpoints distinct identities (e.g. the worker name).
#
#    The key proves that the peer may connect; it does not encrypt or sign the frames that
#    follow, so use a trusted network or a tunnel (the pickled headers execute code on load).
#
# Frames
# ------
# After the handshake every frame is (network byte order, no padding):
#
#        magic      2s  b"TN"
#        kind       B   MessageKind (0 = AUTH, handshake only)
#        reserved   B   must be 0
#        flags      I   opaque to this module
#        request_id Q
#        header_len Q   length of the header part
#        nbuffers   I   <= MAX_BUFFERS
#        lengths    nbuffers x Q   length of each raw buffer
#        header     header_len bytes   (a pickle of the call, opaque here)
#        buffers    the raw buffers back to back
#
# All lengths come first, so the receiver validates the whole frame size against its limit
# *before* it allocates anything, and then allocates the payload once.  The frame size is the
# fixed header, the length table and every part; it is bounded by the receiver's
# max_frame_bytes, which each end advertises in its HELLO so that a sender gets a clear local
# error instead of a dropped connection.
#
# Receiving
# ---------
# ``receive_data()`` only buffers; ``next_event()`` parses (like h11).  Small data is kept in
# a bytearray with a read offset that is compacted now and then (no quadratic copying).  Once
# a frame's lengths are known, the payload is allocated in one piece (by the allocator the
# connection was given: the transport's lends recycled anonymous mappings for large payloads,
# see ``_recycled``; this module reads no clock and maps no memory) and the message's header and
# buffers are
# memoryviews into it, writable and never copied again.  The receiver lays the parts out in
# its allocation so that every buffer starts at a 64-byte aligned address (the wire carries
# no padding), which arrays and tensors built on them need.  Bytes that arrive while a payload is
# being filled go straight into it; drivers that want no copy at all use ``get_buffer()`` /
# ``buffer_updated()`` (asyncio.BufferedProtocol's names) to ``recv_into`` the payload itself.

from __future__ import annotations

import ctypes
import enum
import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

__all__ = [
    "MAX_BUFFERS",
    "MAX_FRAME_BYTES",
    "MAX_IDENTITY_BYTES",
    "MIN_FRAME_BYTES",
    "NONCE_BYTES",
    "PROTOCOL_VERSION",
    "Allocate",
    "AuthenticationError",
    "Connection",
    "ConnectionClosed",
    "ConnectionState",
    "Event",
    "HandshakeComplete",
    "Message",
    "MessageKind",
    "ProtocolError",
]

PROTOCOL_VERSION: Final = 2
"""Version carried in HELLO; peers with another version are rejected."""

MAX_FRAME_BYTES: Final = 1 << 30
"""Default limit on one frame (fixed header, length table, header and buffers): 1 GiB."""

MIN_FRAME_BYTES: Final = 1024
"""Smallest ``max_frame_bytes`` an end may configure or advertise."""

MAX_BUFFERS: Final = 65536
"""Most raw buffers one message may carry (a protocol constant, not negotiated)."""

MAX_IDENTITY_BYTES: Final = 0xFFFF
"""Largest identity blob a HELLO may carry."""

NONCE_BYTES: Final = 32
"""Size of the random handshake nonce."""

_MAGIC: Final = b"THNBLRPC"
_HELLO: Final = struct.Struct("!8sHBx32sQH")
_HELLO_HAS_KEY: Final = 0x01
_FRAME_MAGIC: Final = b"TN"
_FRAME: Final = struct.Struct("!2sBBIQQI")
_AUTH_KIND: Final = 0
_MAC_BYTES: Final = hashlib.sha256().digest_size
_AUTH_DOMAIN: Final = b"thenable-auth\x00v1\x00proof\x00"
_MAX_U32: Final = (1 << 32) - 1
_MAX_U64: Final = (1 << 64) - 1
_ALIGN: Final = 64  # received buffers start at addresses that are multiples of this
_DIRECT_READ_MIN: Final = 1 << 16  # lend the payload to recv_into only if this much is left
_SCRATCH_BYTES: Final = 1 << 18  # default size of the get_buffer() staging area
_COMPACT_BYTES: Final = 1 << 16  # compact the receive buffer once this much is consumed


class ProtocolError(Exception):
    """The peer broke the wire protocol; the connection is unusable and must be closed."""


class AuthenticationError(ProtocolError):
    """The peer did not prove knowledge of the shared key (or one side has no key)."""


class MessageKind(enum.IntEnum):
    """What a message frame is; the meaning of each kind belongs to the RPC layer."""

    REQUEST = 1
    """A call that expects a RESPONSE or ERROR_RESPONSE with the same request id."""
    RESPONSE = 2
    """The successful result of a REQUEST."""
    ERROR_RESPONSE = 3
    """A REQUEST that failed; the header carries the pickled exception."""
    NOTIFY = 4
    """A one-way message; no reply is expected."""
    CONTROL = 5
    """Runtime housekeeping between agents (shutdown barrier, heartbeat, ...)."""


# The flags of a frame, which the transport sets and reads (this module only carries them):
FLAG_STAGED: Final = 0x1
"""On a message: its only buffer is a shared-memory descriptor instead of the data (``_shm``)."""
FLAG_RELEASE: Final = 0x2
"""On a CONTROL frame: the shared-memory segment ``request_id`` is free again."""
FLAG_RETIRE: Final = 0x4
"""On a CONTROL frame: the shared-memory segment ``request_id`` will not be used again."""
FLAG_PING: Final = 0x10
"""On a CONTROL frame: a heartbeat, which the peer answers with a PONG."""
FLAG_PONG: Final = 0x20
"""On a CONTROL frame: the answer to a PING."""


_MESSAGE_KINDS: Final = frozenset(kind.value for kind in MessageKind)
_KINDS_BY_VALUE: Final = {kind.value: kind for kind in MessageKind}
_INLINE_HEADER_BYTES: Final = 4096  # headers up to this size are copied next to the prefix
_SMALL_FRAME_BYTES: Final = 1 << 16  # whole frames up to this size may take the fast path
_SMALL_FRAME_BUFFERS: Final = 64  # ... if they carry at most this many buffers


class ConnectionState(enum.Enum):
    """Life cycle of a :class:`Connection`."""

    HANDSHAKING = "handshaking"
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The peer is authenticated (when keys are used); messages may flow."""

    peer_identity: bytes


@dataclass(frozen=True, slots=True, eq=False)
class Message:
    """One received message.

    ``header`` and ``buffers`` are writable memoryviews into one freshly allocated payload
    that belongs to the receiver; nothing else refers to it.
    """

    kind: MessageKind
    request_id: int
    flags: int
    header: memoryview
    buffers: list[memoryview]


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the connection cleanly, between two frames."""


Event: TypeAlias = HandshakeComplete | Message | ConnectionClosed
"""What next_event() returns (besides None)."""


class _Rx(enum.Enum):
    """Where the receive parser is."""

    HELLO = enum.auto()
    FRAME_HEADER = enum.auto()
    LENGTHS = enum.auto()
    PAYLOAD = enum.auto()


def _mac(key: bytes, prover_hello: bytes, verifier_hello: bytes) -> bytes:
    """The proof that the end which sent ``prover_hello`` knows ``key``."""
    data = b"".join(
        (
            _AUTH_DOMAIN,
            len(prover_hello).to_bytes(4, "big"),
            prover_hello,
            len(verifier_hello).to_bytes(4, "big"),
            verifier_hello,
        )
    )
    return hmac.new(key, data, hashlib.sha256).digest()


_Payload: TypeAlias = "bytearray | ctypes.Array[ctypes.c_ubyte]"
Allocate: TypeAlias = Callable[[int], Any]
"""Gives a writable buffer of (at least) that many bytes for a received payload."""


def _address(buffer: _Payload) -> int:
    """The address of a (non-empty, writable) buffer's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _lay_out(
    header_len: int, lengths: tuple[int, ...], allocate: Allocate
) -> tuple[_Payload, list[tuple[int, int]]]:
    """Allocate a payload and place its parts: (payload, [(offset, length) per part]).

    The header goes first; each buffer starts at a multiple of _ALIGN bytes in memory, so
    arrays and tensors built on it are aligned (the wire carries no padding).
    """
    if not lengths:
        return (allocate(header_len) if header_len else bytearray()), [(0, header_len)]
    relative = [(0, header_len)]
    end = header_len
    for length in lengths:
        start = _align_up(end)
        relative.append((start, length))
        end = start + length
    payload = allocate(end + _ALIGN)
    origin = -_address(payload) % _ALIGN
    return payload, [(origin + start, length) for start, length in relative]


def _align_up(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN


def _byte_view(obj: object, what: str) -> memoryview:
    """A flat unsigned-byte view of ``obj`` without copying, or a clear error."""
    try:
        view = memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{what} must be a bytes-like object (bytes, bytearray, memoryview, ...), "
            f"got {type(obj).__name__}"
        ) from None
    if not view.c_contiguous:
        raise ValueError(
            f"{what} must be C-contiguous to be sent without copying; make a contiguous copy first"
        )
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class Connection:
    """One end of a thenable RPC connection, with no I/O of its own.

    Driving it::

        conn = Connection(key=key, identity=b"worker0")
        sock.sendall(conn.initiate())
        while conn.state is not ConnectionState.CLOSED:
            while (event := conn.next_event()) is not None:  # None: needs more data
                ...  # HandshakeComplete, Message; ConnectionClosed ends the loop
                if isinstance(event, ConnectionClosed):
                    break
            if out := conn.data_to_send():  # handshake replies
                sock.sendall(out)
            conn.receive_data(sock.recv(65536))  # b"" on EOF

    ``next_event()`` may queue handshake bytes: send ``data_to_send()`` whenever it returns
    None, before waiting for more data.  After EOF it returns ConnectionClosed on every
    call (the state is CLOSED).  Instead of ``recv``, a driver may ``recv_into`` the view
    from ``get_buffer()`` and report the count with ``buffer_updated()``.  Once OPEN,
    ``send_message()`` returns a scatter list for ``socket.sendmsg`` (split it into chunks
    of at most ``os.sysconf("SC_IOV_MAX")`` entries) or for writing part by part.

    Methods raise :class:`ProtocolError` (or :class:`AuthenticationError`) when the *peer*
    misbehaves, after which the state is ERROR; and RuntimeError / ValueError / TypeError
    when *this* side misuses the API.  A Connection is not thread-safe: use one thread per
    direction at most, i.e. one receiver calling receive/next_event and one sender calling
    send_message after the handshake.
    """

    def __init__(
        self,
        *,
        key: bytes | None,
        identity: bytes,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        nonce: bytes | None = None,
        allocate: Allocate = bytearray,
    ) -> None:
        """Prepare one end; ``key`` None means no authentication, ``nonce`` is for tests,
        ``allocate`` gives the memory received payloads are laid out in."""
        if key is not None:
            if not isinstance(key, (bytes, bytearray)) or not key:
                raise ValueError("key must be non-empty bytes, or None for no authentication")
            key = bytes(key)
        if not isinstance(identity, (bytes, bytearray)):
            raise TypeError(f"identity must be bytes, got {type(identity).__name__}")
        if len(identity) > MAX_IDENTITY_BYTES:
            raise ValueError(
                f"identity is {len(identity)} bytes, over the limit of {MAX_IDENTITY_BYTES}"
            )
        if not MIN_FRAME_BYTES <= max_frame_bytes <= _MAX_U64:
            raise ValueError(
                f"max_frame_bytes must be between {MIN_FRAME_BYTES} and 2**64-1, "
                f"got {max_frame_bytes}"
            )
        if nonce is None:
            nonce = os.urandom(NONCE_BYTES)
        elif len(nonce) != NONCE_BYTES:
            raise ValueError(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
        self._key = key
        self._identity = bytes(identity)
        self._max_frame_bytes = max_frame_bytes
        self._nonce = bytes(nonce)
        self._allocate = allocate
        self._state = ConnectionState.HANDSHAKING
        self._error: str | None = None
        self._my_hello: bytes | None = None
        self._peer_hello: bytes | None = None
        self._peer_identity: bytes | None = None
        self._peer_max_frame_bytes = MIN_FRAME_BYTES
        self._outbox = bytearray()
        # Receive side.
        self._rx = _Rx.HELLO
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._kind = 0
        self._request_id = 0
        self._flags = 0
        self._header_len = 0
        self._lengths: tuple[int, ...] = ()
        self._payload: _Payload | None = None
        self._payload_view: memoryview | None = None
        self._segments: list[tuple[int, int]] = []  # (offset in payload, length) per part
        self._segment = 0  # index of the part being filled
        self._segment_filled = 0
        self._filled = 0  # payload bytes received from the wire
        self._total = 0  # payload bytes the frame carries on the wire
        self._scratch: bytearray | None = None
        self._lent: str | None = None  # "payload" or "scratch" between get_buffer/updated

    # -- introspection -------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """HANDSHAKING, then OPEN; CLOSED after the peer's EOF; ERROR after a ProtocolError."""
        return self._state

    @property
    def peer_identity(self) -> bytes | None:
        """The identity blob from the peer's HELLO, once received."""
        return self._peer_identity

    @property
    def peer_max_frame_bytes(self) -> int:
        """The largest frame the peer accepts (from its HELLO); send_message enforces it."""
        return self._peer_max_frame_bytes

    @property
    def max_frame_bytes(self) -> int:
        """The largest frame this end accepts."""
        return self._max_frame_bytes

    # -- sending -------------------------------------------------------------------------

    def initiate(self) -> bytes:
        """Our HELLO; send it first, once, right after the transport connects."""
        if self._my_hello is not None:
            raise RuntimeError("initiate() was already called on this connection")
        flags = _HELLO_HAS_KEY if self._key is not None else 0
        self._my_hello = (
            _HELLO.pack(
                _MAGIC,
                PROTOCOL_VERSION,
                flags,
                self._nonce,
                self._max_frame_bytes,
                len(self._identity),
            )
            + self._identity
        )
        return self._my_hello

    def data_to_send(self) -> bytes:
        """Bytes the handshake wants sent to the peer (b"" if none); drains the queue."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def send_message(
        self,
        kind: MessageKind | int,
        request_id: int,
        header: bytes | bytearray | memoryview,
        buffers: Iterable[bytes | bytearray | memoryview] = (),
        flags: int = 0,
    ) -> list[bytes | memoryview]:
        """Frame one message as a scatter list; ``buffers`` are referenced, never copied.

        Keep the buffers unchanged until the list has been written.
        """
        if self._state is not ConnectionState.OPEN:
            raise RuntimeError(
                f"cannot send a message while the connection is {self._state.name}; "
                "wait for HandshakeComplete"
            )
        if (
            not buffers
            and type(header) is bytes
            and len(header) <= _INLINE_HEADER_BYTES
            and type(kind) is MessageKind
        ):
            # Fast path for the common small message: one bytes object, no buffers.
            total = _FRAME.size + len(header)
            if total <= self._peer_max_frame_bytes and 0 <= request_id <= _MAX_U64:
                if not 0 <= flags <= _MAX_U32:
                    raise ValueError(f"flags must fit in 32 bits unsigned, got {flags}")
                return [
                    _FRAME.pack(_FRAME_MAGIC, kind, 0, flags, request_id, len(header), 0) + header
                ]
        try:
            kind = MessageKind(kind)
        except ValueError:
            raise ValueError(
                f"unknown message kind {kind!r}; use one of "
                + ", ".join(f"{k.name}={k.value}" for k in MessageKind)
            ) from None
        if not 0 <= request_id <= _MAX_U64:
            raise ValueError(f"request_id must fit in 64 bits unsigned, got {request_id}")
        if not 0 <= flags <= _MAX_U32:
            raise ValueError(f"flags must fit in 32 bits unsigned, got {flags}")
        header_view = _byte_view(header, "header")
        views = [_byte_view(b, f"buffers[{i}]") for i, b in enumerate(buffers)]
        if len(views) > MAX_BUFFERS:
            raise ValueError(
                f"a message may carry at most {MAX_BUFFERS} buffers, got {len(views)}; "
                "concatenate small buffers or send several messages"
            )
        lengths = [v.nbytes for v in views]
        total = _FRAME.size + 8 * len(views) + header_view.nbytes + sum(lengths)
        if total > self._peer_max_frame_bytes:
            raise ValueError(
                f"message of {total} bytes exceeds the peer's limit of "
                f"{self._peer_max_frame_bytes} bytes (its max_frame_bytes); raise the limit "
                "on the peer or send the data in several messages"
            )
        prefix = _FRAME.pack(
            _FRAME_MAGIC, kind, 0, flags, request_id, header_view.nbytes, len(views)
        ) + struct.pack(f"!{len(lengths)}Q", *lengths)
        parts: list[bytes | memoryview] = []
        if header_view.nbytes <= _INLINE_HEADER_BYTES:  # small headers ride with the prefix
            parts.append(prefix + header_view.tobytes())
        else:
            parts.extend((prefix, header_view))
        parts.extend(v for v in views if v.nbytes)
        return parts

    def _queue_frame(self, kind: int, header: bytes) -> None:
        """Queue an internal (handshake) frame for data_to_send()."""
        self._outbox += _FRAME.pack(_FRAME_MAGIC, kind, 0, 0, 0, len(header), 0)
        self._outbox += header

    # -- receiving -----------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed (EOF).

        The data is copied (at most once), so the caller may reuse its buffer.  After a
        ProtocolError the connection is dead and data is dropped.
        """
        if self._state is ConnectionState.ERROR:
            return
        if self._eof:
            if data:
                raise RuntimeError("receive_data() called with data after EOF")
            return
        view = _byte_view(data, "data")
        if not view.nbytes:
            self._eof = True
            return
        self._take(view)

    def _take(self, view: memoryview) -> None:
        """Keep received bytes (a flat byte view, not at EOF): straight into the payload
        being received, if it is next, else into the buffer ``next_event`` parses."""
        if self._rx is _Rx.PAYLOAD and self._pos == len(self._buf):
            view = view[self._write_payload(view) :]
        if view.nbytes:
            self._buf += view

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable view to ``recv_into``; then call ``buffer_updated(nbytes)``.

        While a large payload is being received this is the payload itself (no copy at
        all); otherwise it is a staging area of at least ``sizehint`` bytes.
        """
        if (
            self._rx is _Rx.PAYLOAD
            and self._payload_view is not None
            and self._pos == len(self._buf)
            and self._segment < len(self._segments)
            and not self._eof
        ):
            offset, length = self._segments[self._segment]
            if length - self._segment_filled >= _DIRECT_READ_MIN:
                self._lent = "payload"
                return self._payload_view[offset + self._segment_filled : offset + length]
        size = max(sizehint, _SCRATCH_BYTES)
        if self._scratch is None or len(self._scratch) < size:
            self._scratch = bytearray(size)  # a new one: the old one may still be exported
        self._lent = "scratch"
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        """Commit ``nbytes`` written into the view from the last ``get_buffer()``.

        Zero is a no-op; report EOF with ``receive_data(b"")``.
        """
        lent, self._lent = self._lent, None
        if lent is None:
            raise RuntimeError("buffer_updated() called without a preceding get_buffer()")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if nbytes == 0:
            return
        if lent == "payload":
            room = self._segments[self._segment][1] - self._segment_filled
            if nbytes > room:
                raise ValueError(
                    f"buffer_updated({nbytes}) is more than the {room} bytes lent by get_buffer()"
                )
            self._advance_payload(nbytes)
            return
        assert self._scratch is not None
        if nbytes > len(self._scratch):
            raise ValueError(
                f"buffer_updated({nbytes}) is more than the {len(self._scratch)} bytes "
                "lent by get_buffer()"
            )
        if self._state is ConnectionState.ERROR:
            return
        if self._eof:
            raise RuntimeError("buffer_updated() called with data after EOF")
        self._take(memoryview(self._scratch)[:nbytes])  # (a flat byte view: no need to check)

    def next_event(self) -> Event | None:
        """The next event parsed from received bytes, or None if more data is needed.

        Raises ProtocolError (AuthenticationError) if the peer broke the protocol; the
        connection is then in the ERROR state and every later call raises again.
        """
        if (
            self._pos == len(self._buf)
            and self._rx is _Rx.FRAME_HEADER
            and self._state is ConnectionState.OPEN
            and not self._eof
        ):
            return None  # nothing buffered between frames: the usual case, decided at once
        if self._state is ConnectionState.ERROR:
            raise ProtocolError(f"connection already failed: {self._error}")
        if self._my_hello is None:
            raise RuntimeError("call initiate() and send its bytes before next_event()")
        if self._state is ConnectionState.CLOSED:
            return ConnectionClosed()
        try:
            return self._parse()
        except ProtocolError as exc:
            self._fail(str(exc))
            raise

    def has_buffered_data(self) -> bool:
        """Whether bytes of another frame have been received and not yet returned as an event
        (next_event() may then have more to give without new data)."""
        return len(self._buf) != self._pos or self._rx is not _Rx.FRAME_HEADER or self._eof

    def _fail(self, message: str) -> None:
        """Enter the ERROR state and drop everything buffered."""
        self._state = ConnectionState.ERROR
        self._error = message
        self._buf = bytearray()
        self._pos = 0
        self._payload = None
        self._payload_view = None
        self._outbox.clear()

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _consume(self, nbytes: int) -> None:
        """Advance the read offset; compact the buffer when much of it is consumed."""
        self._pos += nbytes
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= _COMPACT_BYTES and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0

    def _parse(self) -> Event | None:
        """Advance the receive state machine until an event or a need for data."""
        if self._rx is _Rx.FRAME_HEADER and self._state is ConnectionState.OPEN:
            small = self._parse_small_frame()
            if small is not None:
                return small
        while True:
            if self._rx is _Rx.HELLO:
                event = self._parse_hello()
                if event is not None or self._rx is _Rx.HELLO:
                    return event if event is not None else self._at_eof()
            elif self._rx is _Rx.FRAME_HEADER:
                if self._available() < _FRAME.size:
                    return self._at_eof()
                self._parse_frame_header()
            elif self._rx is _Rx.LENGTHS:
                if self._available() < 8 * len(self._lengths):
                    return self._at_eof()
                self._parse_lengths()
            else:
                event = self._fill_payload()
                if event is not None:
                    return event
                if self._rx is _Rx.PAYLOAD:
                    return self._at_eof()

    def _at_eof(self) -> Event | None:
        """None if more data may come; at EOF a clean close or a truncation error."""
        if not self._eof:
            return None
        if self._state is ConnectionState.HANDSHAKING:
            raise ProtocolError(
                "peer closed the connection during the handshake (it may have rejected "
                "this side's key, identity or protocol version)"
            )
        if self._rx is _Rx.FRAME_HEADER and self._available() == 0:
            self._state = ConnectionState.CLOSED
            return ConnectionClosed()
        if self._rx is _Rx.PAYLOAD:
            got = self._filled + self._available()
            raise ProtocolError(
                f"peer closed the connection mid-frame: received {got} of the "
                f"{self._total} payload bytes of a message"
            )
        raise ProtocolError(
            f"peer closed the connection mid-frame: {self._available()} bytes of an "
            "incomplete frame header"
        )

    def _parse_hello(self) -> Event | None:
        """Parse the peer's HELLO and answer it; None until it has fully arrived."""
        avail = self._available()
        head = bytes(self._buf[self._pos : self._pos + min(avail, len(_MAGIC))])
        if head != _MAGIC[: len(head)]:
            raise ProtocolError(
                f"bad magic {head!r} at the start of the connection, expected {_MAGIC!r}: "
                "the peer is not a thenable.rpc endpoint"
            )
        if avail < _HELLO.size:
            return None
        _, version, flags, nonce, peer_max, id_len = _HELLO.unpack_from(self._buf, self._pos)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"peer speaks protocol version {version}, this side speaks "
                f"{PROTOCOL_VERSION}: use the same thenable version on every worker"
            )
        if flags & ~_HELLO_HAS_KEY:
            raise ProtocolError(f"HELLO has unknown flag bits {flags:#04x}")
        if peer_max < MIN_FRAME_BYTES:
            raise ProtocolError(
                f"peer advertises max_frame_bytes={peer_max}, below the minimum {MIN_FRAME_BYTES}"
            )
        if avail < _HELLO.size + id_len:
            return None
        hello = bytes(self._buf[self._pos : self._pos + _HELLO.size + id_len])
        self._consume(len(hello))
        self._peer_hello = hello
        self._peer_identity = hello[_HELLO.size :]
        self._peer_max_frame_bytes = peer_max
        self._rx = _Rx.FRAME_HEADER
        peer_has_key = bool(flags & _HELLO_HAS_KEY)
        if self._key is None:
            if peer_has_key:
                raise AuthenticationError(
                    "peer failed authentication: wrong or missing key (the peer uses an "
                    "authentication key but none is configured on this side)"
                )
            self._state = ConnectionState.OPEN
            return HandshakeComplete(self._peer_identity)
        if not peer_has_key:
            raise AuthenticationError(
                "peer failed authentication: wrong or missing key (this side requires "
                "an authentication key but the peer has none configured)"
            )
        if nonce == self._nonce:
            raise AuthenticationError(
                "peer failed authentication: its HELLO carries this side's own nonce "
                "(a reflected handshake)"
            )
        if self._peer_identity == self._identity:
            raise AuthenticationError(
                f"peer failed authentication: it presents this side's own identity "
                f"{self._identity!r} (a reflected or relayed handshake, or two endpoints "
                "configured with the same identity; give each endpoint a distinct one)"
            )
        assert self._my_hello is not None
        self._queue_frame(_AUTH_KIND, _mac(self._key, self._my_hello, hello))
        return None

    def _parse_small_frame(self) -> Message | None:
        """Fast path: a whole small frame already received, taken in one step.

        Most RPC messages are small calls and replies (with a few small arrays or tensors at
        most); this skips the general payload machinery.  Anything unusual, large or incomplete
        is left to the general path, which validates it in full.
        """
        pos = self._pos
        buf = self._buf
        if len(buf) - pos < _FRAME.size:
            return None
        magic, kind, reserved, flags, request_id, header_len, nbuffers = _FRAME.unpack_from(
            buf, pos
        )
        if magic != _FRAME_MAGIC or reserved or nbuffers > _SMALL_FRAME_BUFFERS:
            return None
        message_kind = _KINDS_BY_VALUE.get(kind)
        if message_kind is None:
            return None
        start = pos + _FRAME.size + 8 * nbuffers
        if start > len(buf):
            return None
        if not nbuffers:
            end = start + header_len
            if end > len(buf) or end - pos > self._max_frame_bytes:
                return None
            header = memoryview(buf[start:end])  # a copy: the message owns its bytes
            self._consume(end - pos)  # (may clear buf: copy first)
            return Message(message_kind, request_id, flags, header, [])
        lengths = struct.unpack_from(f"!{nbuffers}Q", buf, pos + _FRAME.size)
        end = start + header_len + sum(lengths)
        if end > len(buf) or end - pos > min(self._max_frame_bytes, _SMALL_FRAME_BYTES):
            return None
        payload, segments = _lay_out(header_len, lengths, self._allocate)
        view = memoryview(payload)
        source = start
        parts = []
        for offset, length in segments:
            view[offset : offset + length] = buf[source : source + length]
            parts.append(view[offset : offset + length])
            source += length
        self._consume(end - pos)
        return Message(message_kind, request_id, flags, parts[0], parts[1:])

    def _parse_frame_header(self) -> None:
        """Validate a frame's fixed header before anything is allocated for it."""
        magic, kind, reserved, flags, request_id, header_len, nbuffers = _FRAME.unpack_from(
            self._buf, self._pos
        )
        if magic != _FRAME_MAGIC:
            raise ProtocolError(
                f"bad frame magic {magic!r}, expected {_FRAME_MAGIC!r}: the stream is "
                "corrupt or out of sync"
            )
        if reserved != 0:
            raise ProtocolError(f"reserved frame byte is {reserved}, expected 0")
        if self._state is ConnectionState.HANDSHAKING:
            if kind != _AUTH_KIND:
                raise ProtocolError(
                    f"message frame (kind {kind}) received before the handshake completed"
                )
            if (flags, request_id, header_len, nbuffers) != (0, 0, _MAC_BYTES, 0):
                raise ProtocolError(
                    f"malformed authentication frame: flags={flags}, request_id="
                    f"{request_id}, header_len={header_len}, nbuffers={nbuffers}"
                )
        elif kind == _AUTH_KIND:
            raise ProtocolError("authentication frame received after the handshake completed")
        elif kind not in _MESSAGE_KINDS:
            raise ProtocolError(f"unknown message kind {kind} in frame header")
        if nbuffers > MAX_BUFFERS:
            raise ProtocolError(
                f"frame declares {nbuffers} buffers, over the limit of {MAX_BUFFERS}"
            )
        fixed = _FRAME.size + 8 * nbuffers
        if fixed + header_len > self._max_frame_bytes:
            raise ProtocolError(
                f"frame header part of {header_len} bytes exceeds max_frame_bytes="
                f"{self._max_frame_bytes}"
            )
        self._consume(_FRAME.size)
        self._kind = kind
        self._request_id = request_id
        self._flags = flags
        self._header_len = header_len
        self._lengths = (0,) * nbuffers
        if nbuffers:
            self._rx = _Rx.LENGTHS
        else:
            self._start_payload(header_len)

    def _parse_lengths(self) -> None:
        """Read the buffer length table and check the whole frame against the limit."""
        count = len(self._lengths)
        self._lengths = struct.unpack_from(f"!{count}Q", self._buf, self._pos)
        self._consume(8 * count)
        payload = self._header_len + sum(self._lengths)
        frame = _FRAME.size + 8 * count + payload
        if frame > self._max_frame_bytes:
            raise ProtocolError(
                f"frame of {frame} bytes ({count} buffers) exceeds max_frame_bytes="
                f"{self._max_frame_bytes}"
            )
        self._start_payload(payload)

    def _start_payload(self, nbytes: int) -> None:
        """Allocate the payload (its size already validated) and start filling it.

        The header goes first; each buffer starts at a multiple of _ALIGN bytes in memory,
        so arrays and tensors built on it are aligned (the wire carries no padding).
        """
        self._total = nbytes
        self._filled = 0
        self._payload, self._segments = _lay_out(self._header_len, self._lengths, self._allocate)
        self._payload_view = memoryview(self._payload).cast("B")
        self._segment = -1
        self._advance_payload(0)
        self._rx = _Rx.PAYLOAD

    def _advance_payload(self, nbytes: int) -> None:
        """Count ``nbytes`` written into the current part; move past full and empty parts."""
        self._filled += nbytes
        self._segment_filled += nbytes
        segments = self._segments
        while self._segment < 0 or (
            self._segment < len(segments) and self._segment_filled == segments[self._segment][1]
        ):
            self._segment += 1
            self._segment_filled = 0

    def _write_payload(self, data: memoryview) -> int:
        """Copy the start of ``data`` into the payload's parts; how many bytes it took."""
        assert self._payload_view is not None
        done = 0
        while done < data.nbytes and self._segment < len(self._segments):
            offset, length = self._segments[self._segment]
            start = offset + self._segment_filled
            take = min(length - self._segment_filled, data.nbytes - done)
            self._payload_view[start : start + take] = data[done : done + take]
            done += take
            self._advance_payload(take)
        return done

    def _fill_payload(self) -> Event | None:
        """Move buffered bytes into the payload; the event once the frame is complete."""
        assert self._payload_view is not None
        if self._available() and self._filled < self._total:
            with memoryview(self._buf) as buf_view:
                taken = self._write_payload(buf_view[self._pos :])
            self._consume(taken)
        if self._filled < self._total:
            return None
        view = self._payload_view
        self._payload = None
        self._payload_view = None
        self._rx = _Rx.FRAME_HEADER
        parts = [view[offset : offset + length] for offset, length in self._segments]
        if self._state is ConnectionState.HANDSHAKING:
            return self._check_proof(parts[0].tobytes())
        return Message(MessageKind(self._kind), self._request_id, self._flags, parts[0], parts[1:])

    def _check_proof(self, proof: bytes) -> Event:
        """Verify the peer's AUTH proof and open the connection."""
        assert self._key is not None
        assert self._peer_hello is not None and self._my_hello is not None
        expected = _mac(self._key, self._peer_hello, self._my_hello)
        if not hmac.compare_digest(proof, expected):
            raise AuthenticationError(
                "peer failed authentication: wrong or missing key (its proof does not "
                "match the key configured on this side)"
            )
        self._state = ConnectionState.OPEN
        assert self._peer_identity is not None
        return HandshakeComplete(self._peer_identity)
