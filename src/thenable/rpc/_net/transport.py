"""Framed send/receive on an authenticated connection (made by ``_sockets``).

Theory of operation
-------------------
Each connection is driven by one sans-IO :class:`~thenable.rpc._wire.protocol.Connection`.  One
*reader* thread per connection receives frames (straight into the payload buffer for large
messages) and hands each message to the owner's ``on_message``.  Senders write from their own
threads under a per-connection lock with scatter/gather ``sendmsg``, so large buffers are never
copied; frames without buffers are queued and written in batches by whoever holds the lock.

Sending never blocks the caller on its peer.  Every write is non-blocking; a sender whose frame
the socket does not take waits at most ``_PATIENCE_S`` for it to take more (a healthy peer
reads that fast), then leaves the rest (copied, when it is the caller's memory) in the
connection's *backlog*, which a writer thread of the connection's own drains as the peer reads.
While the backlog is not empty, new frames join it, in order.  It holds at most
``max_send_queue_bytes``: beyond that a send fails at once (``SendQueueFullError``).  A request
whose call times out while its frame waits, untouched, in the backlog is taken out of it
(``drop``); a frame begun is always finished (or the connection closed), never cut.

A heartbeat finds peers that are frozen or gone without a reset: a connection that has heard
nothing for ``heartbeat_s`` sends a PING (any frame answers it: the peer replies PONG), and one
silent for ``_HEARTBEAT_MISSES`` times as long, its PING unanswered, is closed, so the calls
waiting on it fail.

``on_message`` runs in the reader thread.  If it blocks in ``Future.wait`` (a user callback of an
RPC future calling ``rpc_sync``, say), the reader hands its job to a fresh reader thread first
(leader/follower), so a blocked callback never stops the connection from delivering the very
reply it waits for.

After a frame arrives, a reader whose recent waits were short polls the socket for the next
one for up to ``busy_poll_s`` before it sleeps in ``recv`` (``PeerConnection._poll``): on a
virtual machine, waking a sleeping CPU costs more than a whole no-op call, and a CPU that
polls stays awake.  A connection whose frames come further apart than that polls only once in
``_PROBE_EVERY`` waits (``_PollPolicy``), and an idle one not at all.

On a same-host (Unix-domain) connection, large payloads travel through shared memory
(``_shm``) instead of the socket.  A watchdog thread makes sure that a request run by a reader
itself never stalls the connection (see ``PeerConnection.run_inline``).

A connection that breaks the protocol (garbage, an oversized frame) is closed and logged; every
other connection keeps going.
"""

from __future__ import annotations

import array
import collections
import contextlib
import dataclasses
import logging
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from thenable._future import _PER_THREAD
from thenable._tracing import recorder as _recorder
from thenable.rpc._errors import SendQueueFullError
from thenable.rpc._net import memory as _recycled
from thenable.rpc._net import shm as _shm
from thenable.rpc._net.sockets import FD_SPACE, close_all, descriptors_in
from thenable.rpc._wire.protocol import (
    FLAG_PING,
    FLAG_PONG,
    FLAG_RELEASE,
    FLAG_RETIRE,
    FLAG_STAGED,
    Connection,
    ConnectionClosed,
    Message,
    MessageKind,
    ProtocolError,
)

__all__ = ("INLINE_PATIENCE_S", "INLINE_QUICK_S", "IncomingLink", "Link", "PeerConnection", "owned")

_LOGGER = logging.getLogger("thenable.rpc.transport")

_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
_RECV_BYTES = 1 << 18
# A reader stops polling after this many waits in a row longer than busy_poll_s, and then
# polls again once in _PROBE_EVERY waits (see _PollPolicy).
_LONG_WAITS = 2
_PROBE_EVERY = 16
# How long a clean close waits to write the frames still queued.
_FLUSH_TIMEOUT_S = 1.0
# How long a sender waits for the socket to take more of its frame before it leaves the rest to
# the connection's writer thread (a peer that reads at all drains a socket buffer much faster).
_PATIENCE_S = 0.05
# A peer silent for this many heartbeat intervals is declared unreachable.
_HEARTBEAT_MISSES = 3
MessageHandler = Callable[["PeerConnection", Message], None]
ClosedHandler = Callable[["PeerConnection", BaseException | None], None]


@dataclasses.dataclass(slots=True, eq=False)
class _Frame:
    """A frame, or what is left of it, in a connection's backlog (see the module docstring)."""

    views: list[memoryview]
    nbytes: int
    fd: int | None = None  # a shared memory descriptor, to go with its first byte
    staged: _shm.Staged | None = None  # its shared memory, given back if it is dropped
    key: int | None = None  # the request id by which it may be dropped, until started
    started: bool = False  # some of it is written: it must be finished
    dropped: bool = False


class Link(Protocol):
    """Where a worker sends a peer's messages: a ``PeerConnection``, one still being dialed
    (``_dialing.Dialing``), or the worker itself (the agent's local link)."""

    @property
    def closed(self) -> bool:
        """Whether sending here fails from now on."""
        ...

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
        """Send one message (see ``PeerConnection.send``)."""
        ...

    def drop(self, request_id: int) -> bool:
        """Take back the request ``request_id`` if it is still queued, unsent (``droppable``)."""
        ...


class IncomingLink(Link, Protocol):
    """A link messages come in on (a connection, or the local link): replies go back on it,
    and a request may run on its reading thread."""

    peer_rank: int

    def may_run_inline(self) -> bool:
        """Whether a request may run on the thread that read it."""
        ...

    def run_inline(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the reading thread (another thread reads meanwhile if it
        takes long)."""
        ...


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
        descriptors: Sequence[int] = (),
        busy_poll_s: float = 0.0,
        max_send_queue_bytes: int = 256 << 20,
        heartbeat_s: float = 0.0,
    ) -> None:
        """``descriptors``: file descriptors received during the handshake; owned from now.
        ``busy_poll_s``: how long the reader may poll for a frame before it sleeps (0: never).
        ``max_send_queue_bytes``: the bound of the backlog; ``heartbeat_s``: the heartbeat's
        interval (0: none).  See the module docstring.
        """
        self._sock = sock
        self._busy_poll_s = busy_poll_s
        self._protocol = protocol
        self.peer_rank = peer_rank  # which worker is on the other end
        self.description = description
        self._on_message = on_message
        self._on_closed = on_closed
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        # When the reader began running a request itself (run_inline), or None.
        self._inline_since: float | None = None
        # Whether the last request run inline was quick (under INLINE_QUICK_S), which lets
        # the next one run inline too even with more frames waiting (see may_run_inline).
        self._inline_quick = False
        self._closing = False  # close() has begun (it runs once, in _closer)
        self._closer: threading.Thread | None = None
        self._closed_event = threading.Event()  # ... and has released everything
        self._closed = False  # ... and no longer sends
        self._reader: threading.Thread | None = None
        self._reader_ident: int | None = None  # its thread id (set by itself, as it starts)
        # Readers taken over, their handlers done, parked for the next take-over (see
        # _start_reader): (thread, the lock it waits on).
        self._spares: list[tuple[threading.Thread, threading.Lock]] = []
        # Same-host connections stage large payloads in shared memory (see _shm).
        self._outbox: _shm.Outbox | None = None
        self._inbox: _shm.Inbox | None = None
        if sock.family == socket.AF_UNIX and _shm.available():
            self._outbox = _shm.Outbox()
            self._inbox = _shm.Inbox(self._release)
            self._inbox.add_descriptors(descriptors)
        else:
            close_all(descriptors)
        # Frames waiting for whoever next holds the send lock (see _enqueue).
        self._queue: collections.deque[list[bytes | memoryview]] = collections.deque()
        # The oldest queued frame at the watchdog's last look (see _left_behind).
        self._head_at_last_look: list[bytes | memoryview] | None = None
        # What the socket did not take yet, in order, and its size (send lock held).
        self._backlog: collections.deque[_Frame] = collections.deque()
        self._backlog_bytes = 0
        self._max_backlog_bytes = max_send_queue_bytes
        self._droppable: dict[int, _Frame] = {}  # backlog frames not started, by request id
        self._writer: threading.Thread | None = None  # drains the backlog; started lazily
        self._backlog_waits = threading.Event()  # set while the backlog is not empty
        self._heartbeat_s = heartbeat_s
        self._heard = time.monotonic()  # when the peer last sent anything
        self._pinged = 0.0  # when we last sent a PING

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<PeerConnection {self.description} {state}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def is_local(self) -> bool:
        """Whether this is a same-host (Unix-domain) connection."""
        return self._sock.family == socket.AF_UNIX

    def start(self) -> None:
        """Start delivering received messages to ``on_message``."""
        self._start_reader()

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
        """Send one message, without blocking on the peer (see the module docstring).

        A message without buffers (its header is an immutable bytes object) may be written
        later by another thread, batched with others, so that threads replying on one
        connection never queue up on its lock; with ``defer``, it waits for the next frame
        sent on this connection (or the watchdog, within ``2 * INLINE_PATIENCE_S``), which saves
        a write when one follows soon.  A message with buffers is written, staged in shared
        memory or copied into the backlog before this returns: the buffers are the caller's
        memory, which may change afterwards.  With ``droppable``, ``drop(request_id)`` may take
        the message back while it waits untouched in the backlog.

        Raises:
            SendQueueFullError: the backlog is full (the peer does not read).
            ConnectionError: the connection is (or becomes) broken.
        """
        if self._closed:
            raise ConnectionError(f"connection to {self.description} is closed")
        key = request_id if droppable else None
        frame: list[bytes | memoryview] | None = None
        if not buffers:
            frame = self._protocol.send_message(kind, request_id, header)
            if defer:
                self._queue.append(frame)
                _WATCHDOG.arm()
                return
            if not self._backlog_bytes:  # (else it joins the backlog, below)
                if not self._queue and self._send_lock.acquire(blocking=False):
                    self._unlock_send(frame)  # the common case: written at once, by this thread
                else:
                    self._enqueue(frame)
                return
            self._check_room(len(header))
        else:
            self._check_room(len(header) + sum(buffer.nbytes for buffer in buffers))
        with self._sending():
            if self._closed:
                raise ConnectionError(f"connection to {self.description} is closed")
            staged = None
            if frame is None:
                staged = self._stage(buffers) if self._outbox is not None else None
                if staged is None:
                    frame = self._protocol.send_message(kind, request_id, header, buffers)
            if staged is None:
                assert frame is not None
                self._write(frame, key=key)
            else:
                self._send_staged(kind, request_id, header, staged, key)

    def _stage(self, buffers: Sequence[memoryview]) -> _shm.Staged | None:
        """Copy large buffers into shared memory (None: send them inline); traced as a span."""
        assert self._outbox is not None
        if not _recorder.recording:
            return self._outbox.stage(buffers)
        start = _recorder.now()
        staged = self._outbox.stage(buffers)
        if staged is not None:
            size = sum(buffer.nbytes for buffer in buffers)
            args = {"bytes": size, "segment": staged.segment_id, "peer": self.description}
            _recorder.complete("shm copy", "shm", start, args)
        return staged

    @contextlib.contextmanager
    def _sending(self) -> Iterator[None]:
        """The send lock held for the block; an OSError in it closes the connection and comes
        out as ConnectionError (frames queued meanwhile are written on unlock)."""
        self._send_lock.acquire()
        error: OSError | None = None
        try:
            yield
        except OSError as exc:
            error = exc
        finally:
            self._unlock_send()
        if error is not None:
            try:
                self.close(error)
                raise ConnectionError(f"sending to {self.description} failed: {error}") from error
            finally:
                # The error's traceback holds this frame: a name for it here would be a cycle
                # that keeps the sender's buffers (a lent segment: its mapping) until collected.
                del error

    def _check_room(self, nbytes: int) -> None:
        """Refuse a message of ``nbytes`` that would overfill the backlog (one that finds it
        empty is taken whatever its size: it could never be sent otherwise)."""
        waiting = self._backlog_bytes
        if waiting and waiting + nbytes > self._max_backlog_bytes:
            raise SendQueueFullError(
                f"{self.description} is not reading: {waiting} bytes already wait for it, and "
                f"{nbytes} more would exceed max_send_queue_bytes={self._max_backlog_bytes}; "
                "retry once earlier calls to it have completed, or raise "
                "RpcBackendOptions.max_send_queue_bytes"
            )

    def _send_staged(
        self,
        kind: MessageKind,
        request_id: int,
        header: bytes,
        staged: _shm.Staged,
        key: int | None,
    ) -> None:
        """Send a message whose buffers wait in shared memory (send lock held)."""
        assert self._outbox is not None
        try:
            parts = self._protocol.send_message(
                kind, request_id, header, [memoryview(staged.descriptor)], flags=FLAG_STAGED
            )
        except BaseException:
            self._outbox.abandon(staged)
            if staged.fd is not None:
                os.close(staged.fd)
            raise
        # The descriptor arrives with the queued frames' bytes, and waits in the peer's
        # Inbox for this frame.
        self._write(parts, staged.fd, staged, key)

    def _write(
        self,
        parts: list[bytes | memoryview],
        fd: int | None = None,
        staged: _shm.Staged | None = None,
        key: int | None = None,
    ) -> None:
        """Write one frame, after the queued ones, without blocking on the peer: what the
        socket does not take within ``_PATIENCE_S`` goes to the backlog (send lock held).
        This owns ``fd`` (closed once sent)."""
        if self._backlog:
            self._queued_to_backlog()
            self._to_backlog(parts, fd, staged, key)
            return
        total = 0 if key is None else sum(memoryview(part).nbytes for part in parts)
        if self._queue:
            parts = self._take_queued() + parts
            key = None  # (batched: not taken apart again)
        try:
            left, fd_sent = _send_some(self._sock, parts, fd)
        except BaseException:
            if fd is not None:
                os.close(fd)
            if staged is not None and self._outbox is not None:
                self._outbox.abandon(staged)
            raise
        if fd is not None and fd_sent:
            os.close(fd)
            fd = None
        if left:
            untouched = key is not None and sum(view.nbytes for view in left) == total
            self._to_backlog(left, fd, staged, key if untouched else None, started=not untouched)

    def _to_backlog(
        self,
        parts: Sequence[bytes | memoryview],
        fd: int | None,
        staged: _shm.Staged | None,
        key: int | None,
        started: bool = False,
    ) -> None:
        """Put (the rest of) a frame at the end of the backlog, in memory of its own, and have
        the writer thread write it (send lock held)."""
        views = [owned(part) for part in parts]
        frame = _Frame(views, sum(view.nbytes for view in views), fd, staged, key, started)
        self._backlog.append(frame)
        self._backlog_bytes += frame.nbytes
        if key is not None and not started:
            self._droppable[key] = frame
        self._backlog_waits.set()
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_loop, name=f"thenable-rpc-writer {self.description}", daemon=True
            )
            self._writer.start()

    def _queued_to_backlog(self) -> None:
        """Move the queued frames behind the backlog, in order (send lock held)."""
        while self._queue:
            self._to_backlog(self._queue.popleft(), None, None, None)

    def _drain(self) -> bool:
        """Write as much of the backlog as the socket takes now; whether it is empty (send
        lock held).  A descriptor goes with the first byte of its frame's write."""
        backlog = self._backlog
        while backlog:
            frames: list[_Frame] = []
            views: list[memoryview] = []
            fd = None
            for frame in backlog:
                if frame.dropped:
                    continue
                if frame.fd is not None:
                    if frames:
                        break  # its descriptor starts the next write
                    fd = frame.fd
                frames.append(frame)
                views += frame.views
                if len(views) >= _IOV_MAX:
                    break
            if not frames:
                backlog.clear()
                break
            ancillary = [] if fd is None else _rights(fd)
            try:
                sent = self._sock.sendmsg(views[:_IOV_MAX], ancillary, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            if fd is not None:
                os.close(fd)
                frames[0].fd = None
            for frame in frames:
                if not sent:
                    break
                if not frame.started:
                    frame.started = True
                    if frame.key is not None:
                        self._droppable.pop(frame.key, None)
                taken = min(sent, frame.nbytes)
                _advance(frame.views, taken)
                frame.nbytes -= taken
                self._backlog_bytes -= taken
                sent -= taken
            while backlog and (backlog[0].dropped or not backlog[0].nbytes):
                backlog.popleft()
        return True

    def statistics(self) -> dict[str, Any]:
        """This connection's queued bytes and shared memory, for ``rpc.get_stats``."""
        stats: dict[str, Any] = {"send_queue_bytes": self._backlog_bytes}
        if self._outbox is not None:
            stats["shm_out"] = self._outbox.statistics()
        if self._inbox is not None:
            stats["shm_in"] = self._inbox.statistics()
        return stats

    def drop(self, request_id: int) -> bool:
        """Take back a droppable message that waits untouched in the backlog (its call timed
        out): whether it was taken.  A message begun, or already written, is not."""
        if request_id not in self._droppable:
            return False
        with self._send_lock:
            frame = self._droppable.pop(request_id, None)
            if frame is None or frame.started or frame.dropped:
                return False
            frame.dropped = True
            self._backlog_bytes -= frame.nbytes
            frame.views = []
            frame.nbytes = 0
            if frame.fd is not None:
                os.close(frame.fd)
                frame.fd = None
            if frame.staged is not None and self._outbox is not None:
                self._outbox.withdraw(frame.staged)
        return True

    def _write_loop(self) -> None:
        """The writer thread: drains the backlog as the socket takes it, until closed."""
        poller = select.poll()
        with contextlib.suppress(ValueError):  # (closed already: the loop ends at once)
            poller.register(self._sock.fileno(), select.POLLOUT)
        while True:
            self._backlog_waits.wait()
            if self._closed:
                return
            poller.poll(1000)  # until the socket takes more (or a second: look at _closed)
            try:
                with self._sending():
                    if not self._closed and self._drain():
                        self._backlog_waits.clear()
            except ConnectionError:
                return  # (closed by _sending)

    def _discard_backlog(self) -> None:
        """The connection is closed: what waits is never sent (send lock held)."""
        for frame in self._backlog:
            if frame.fd is not None:
                os.close(frame.fd)
                frame.fd = None
        self._backlog.clear()
        self._droppable.clear()
        self._backlog_bytes = 0
        self._backlog_waits.set()  # (the writer thread wakes and ends)

    def _release(self, segment_id: int) -> None:
        """Queue a RELEASE of a segment: it goes out with the next frame sent on this
        connection (in the same system call), or within ``2 * INLINE_PATIENCE_S`` from the
        watchdog if nothing is sent meanwhile.

        Called by the Inbox when the last view of a received message is collected: in any
        thread, maybe one that holds the send lock, so it only appends to the queue.
        """
        self._queue_control(segment_id, FLAG_RELEASE)

    def _queue_control(self, segment_id: int, flag: int) -> None:
        """Queue a RELEASE or RETIRE, to go out with the next frame (or the watchdog's tick):
        whoever calls this (a finalizer, the reader) must not block."""
        if self._closing:
            return
        try:
            frame = self._protocol.send_message(MessageKind.CONTROL, segment_id, b"", flags=flag)
        except RuntimeError:  # the protocol is closed: the peer is gone
            return
        self._queue.append(frame)
        _WATCHDOG.arm()

    def _enqueue(self, frame: list[bytes | memoryview]) -> None:
        """Queue a frame; write it now if the send lock is free, else its holder will."""
        self._queue.append(frame)
        self._flush_soon()

    def _flush_soon(self) -> None:
        """Write the queued frames now if the send lock is free, else leave them to its holder."""
        if self._send_lock.acquire(blocking=False):
            self._unlock_send()

    def _write_queued(self) -> None:
        """Write every queued frame, many per system call (send lock held)."""
        while self._queue:
            if self._backlog:
                self._queued_to_backlog()
                return
            self._write(self._take_queued())

    def _take_queued(self) -> list[bytes | memoryview]:
        """The parts of (up to ``_IOV_MAX`` parts' worth of) queued frames, in order."""
        queue = self._queue
        batch: list[bytes | memoryview] = []
        while queue and len(batch) < _IOV_MAX:
            batch += queue.popleft()
        return batch

    def _unlock_send(self, first: list[bytes | memoryview] | None = None) -> None:
        """Write ``first`` (if given) and the queued frames, then release the send lock.

        A frame queued while the lock was held, after the holder's last look at the queue,
        is seen either by its own thread (which then finds the lock free) or by the check
        after the release here, so none is left behind.
        """
        while True:
            error: OSError | None = None
            try:
                if not self._closed:
                    if first is not None:
                        self._write(first)
                        first = None
                    self._write_queued()
            except OSError as exc:
                error = exc
            finally:
                if self._closed or error is not None:
                    self._queue.clear()  # calls waiting for replies fail in close()
                self._send_lock.release()
            if error is not None:
                self.close(error)
                del error, first  # (no cycle error -> traceback -> this frame: see _sending)
                return
            if not self._queue or not self._send_lock.acquire(blocking=False):
                return

    def close(self, error: BaseException | None = None) -> None:
        """Close the socket (once) and report it through ``on_closed``.

        A clean close (no ``error``) first writes the frames still queued (replies sent just
        before a graceful shutdown) and the backlog, waiting at most ``_FLUSH_TIMEOUT_S``.
        """
        with self._state_lock:
            if self._closing:
                if self._closer is not threading.current_thread():
                    self._closed_event.wait()  # return once the connection is really closed
                return
            self._closing = True
            self._closer = threading.current_thread()
            spares, self._spares = self._spares, []
        for _, park in spares:
            park.release()  # (they end: none is the reader)
        deadline = time.monotonic() + _FLUSH_TIMEOUT_S
        locked = self._send_lock.acquire(timeout=_FLUSH_TIMEOUT_S if error is None else 0)
        try:
            if locked and error is None:
                with contextlib.suppress(OSError):
                    self._flush(deadline)
            self._closed = True
            with contextlib.suppress(OSError):  # already disconnected
                self._sock.shutdown(socket.SHUT_RDWR)
            if not locked:  # a sender holds it: the shutdown above makes it let go
                self._send_lock.acquire()
                locked = True
            if self._outbox is not None:  # under the send lock: no sender is copying into it
                self._outbox.close()
        finally:
            if locked:
                self._queue.clear()
                self._discard_backlog()
                self._send_lock.release()
        if self._inbox is not None:
            self._inbox.close()
        self._sock.close()
        self._closed_event.set()
        _WATCHDOG.arm()  # (its thread ends once no connection is open)
        self._on_closed(self, error)

    def _flush(self, deadline: float) -> None:
        """Write the queued frames and the backlog, until ``deadline`` (send lock held)."""
        self._write_queued()
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLOUT)
        while not self._drain():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            poller.poll(left * 1000)

    def _check_heartbeat(self, now: float) -> None:
        """The watchdog's look: PING a peer silent for a heartbeat; close the connection to
        one silent for ``_HEARTBEAT_MISSES`` of them that left a PING unanswered (in a
        thread: closing takes locks).  The watchdog looks at least twice a heartbeat."""
        interval = self._heartbeat_s
        if not interval or self._closing:
            return
        silent = now - self._heard
        unanswered = (
            self._pinged > self._heard and now - self._pinged >= (_HEARTBEAT_MISSES - 1) * interval
        )
        if silent >= _HEARTBEAT_MISSES * interval and unanswered:
            error = ConnectionError(
                f"{self.description} has sent nothing for {silent:.1f} s, not even an answer "
                f"to heartbeats (heartbeat_s={interval}): it is frozen, overloaded or "
                "unreachable"
            )
            _LOGGER.warning("dropping connection %s: %s", self.description, error)
            threading.Thread(target=self.close, args=(error,), daemon=True).start()
        elif silent >= interval and self._pinged <= self._heard:  # (none outstanding)
            self._pinged = now
            self._queue_control(0, FLAG_PING)

    # -- reading ------------------------------------------------------------------------------

    def _start_reader(self) -> None:
        """Let a spare reader read from now on, or a new thread (``_state_lock`` held, but at
        the start).

        A reader taken over (its handler blocked or ran long) parks once its handler is done,
        as a spare for the next take-over: a connection whose handlers block often (a
        ``to_here()`` in a handler, each step) would else start a thread each time, and a new
        thread that runs torch ops also starts an OpenMP team of its own.
        """
        if self._spares:
            reader, park = self._spares.pop()
            self._reader = reader
            park.release()
        else:
            park = threading.Lock()
            park.acquire()
            reader = threading.Thread(
                target=self._read_and_park,
                args=(park,),
                name=f"thenable-rpc-reader {self.description}",
                daemon=True,
            )
            self._reader = reader
            reader.start()
        _WATCHDOG.watch(self)

    def _read_and_park(self, park: threading.Lock) -> None:
        """A reader's thread: read until taken over, then wait as a spare to read again (or,
        with spares enough or the connection closing, end)."""
        me = threading.current_thread()
        while True:
            self._read_loop()
            with self._state_lock:
                if self._closing or len(self._spares) >= _SPARE_READERS:
                    return
                self._spares.append((me, park))
            park.acquire()  # released by _start_reader (read again) or close (end)
            if self._reader is not me:
                return

    def _take_over(self, reader: threading.Thread, inline_before: float | None = None) -> None:
        """If ``reader`` still reads this connection, let a new thread read from now on
        (``reader`` stops reading once its current message is handled).

        With ``inline_before``, only if ``reader`` is running a request inline that it began
        before then: a reader back in ``recv`` must keep the connection to itself.
        """
        with self._state_lock:
            if self._reader is not reader or self._closing:
                return
            if inline_before is not None:
                since = self._inline_since
                if since is None or since > inline_before:
                    return
            self._inline_since = None
            self._inline_quick = False  # the request that held the reader was not quick
            self._start_reader()

    def _hand_off(self) -> Callable[[], None]:
        """The reader is about to block in a callback: let a new thread read meanwhile."""
        self._take_over(threading.current_thread())
        return _noop

    def may_run_inline(self) -> bool:
        """Whether the calling thread may run a received request itself: it is the reader,
        and either no other frame is waiting, or the last request it ran was quick.

        Requests waiting behind a slow one go to a pool, where they run concurrently; behind
        quick ones (a stream of small calls, or a ``remote()`` followed by its fetch) a pool
        hand-off would cost more than the wait.
        """
        return self._reader_ident == threading.get_ident() and (
            self._inline_quick or not self._protocol.has_buffered_data()
        )

    def run_inline(self, fn: Callable[..., object], *args: Any) -> None:
        """Run a request in the reader thread, which saves a thread switch per call.

        While it runs, nothing else is read from this connection; so if it blocks in
        ``Future.wait`` (through ``on_block``) or runs longer than ``INLINE_PATIENCE_S``
        (the watchdog), another thread takes over the reading.  A slow or blocking handler
        therefore delays the peer's next messages by at most that long, and a handler that
        waits for a reply arriving on this very connection still gets it.
        """
        me = threading.get_ident()
        began = time.monotonic()
        with self._state_lock:
            self._inline_since = began
        _WATCHDOG.arm()
        try:
            fn(*args)
        finally:
            with self._state_lock:
                if self._reader_ident == me:  # (not if another thread took over the reading)
                    self._inline_since = None
                    self._inline_quick = time.monotonic() - began < INLINE_QUICK_S

    # -- what the watchdog asks of a connection (see _Watchdog) --------------------------------

    def tick(self, now: float, stalled: bool) -> None:
        """The watchdog's look, every tick: the heartbeat (``stalled``: this process stood
        still, so silence since is not the peer's), a request run inline too long, and
        frames left queued a whole tick, which a thread of their own writes (a write can
        block, and the watchdog must not)."""
        if stalled:
            self._heard = max(self._heard, now)
        self._check_heartbeat(now)
        self._check_inline(now)
        if self._left_behind():  # (RELEASEs, deferred replies) no sender came for them
            threading.Thread(
                target=self._flush_soon, name="thenable-rpc-flush", daemon=True
            ).start()

    def needs_tick(self) -> bool:
        """Whether the watchdog must look again next tick: a request runs inline, or frames
        are queued."""
        return self._inline_since is not None or bool(self._queue)

    @property
    def heartbeat_s(self) -> float:
        """Seconds between heartbeats (0: none)."""
        return self._heartbeat_s

    def retire_idle(self, now: float) -> None:
        """The watchdog's look: retire the shared memory segments left free for
        ``_shm.IDLE_S`` (the RETIRE frames go out with the watchdog's flush)."""
        if self._outbox is None or self._closing:
            return
        for segment_id in self._outbox.retire_idle(now):
            self._queue_control(segment_id, FLAG_RETIRE)

    def _left_behind(self) -> bool:
        """The watchdog's look: whether the oldest queued frame was already the oldest at its
        previous look, a tick ago, so nothing has written it since (else it likely rides
        with the next frame sent, and a write of its own would be wasted)."""
        try:
            head = self._queue[0]
        except IndexError:  # (empty, or emptied by a sender meanwhile)
            head = None
        left = head is not None and head is self._head_at_last_look
        self._head_at_last_look = head
        return left

    def _check_inline(self, now: float) -> None:
        """The watchdog's look: take the reading over from a handler run inline too long."""
        since = self._inline_since
        reader = self._reader
        if since is not None and reader is not None and now - since >= INLINE_PATIENCE_S:
            self._take_over(reader, inline_before=now - INLINE_PATIENCE_S)

    def _receive(self, view: memoryview, flags: int = 0) -> int:
        """One ``recv`` into ``view``; on a same-host connection, ``recvmsg``, which also
        takes the shared memory descriptors the peer sends ahead of their frames."""
        if self._inbox is None:
            return self._sock.recv_into(view, 0, flags)
        received, ancillary, msg_flags, _ = self._sock.recvmsg_into([view], FD_SPACE, flags)
        if ancillary:
            self._inbox.add_descriptors(descriptors_in(ancillary, msg_flags))
        return received

    def _poll(self, view: memoryview, deadline: float) -> int | None:
        """``_receive`` without sleeping: try until data comes (its size) or ``deadline``
        passes (None).

        Sleeping in ``recv`` lets the CPU halt; on a virtual machine, waking it again when
        the next frame comes costs tens of microseconds, more than the rest of a no-op call.
        Between tries the thread yields the CPU to any other runnable thread, and drops the
        GIL in each system call, so the poll takes little from other work.
        """
        clock = time.monotonic
        while True:
            try:
                return self._receive(view, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if clock() >= deadline:
                    return None
                os.sched_yield()

    def _read_loop(self) -> None:
        _PER_THREAD.on_block = self._hand_off
        protocol = self._protocol
        busy_poll_s = self._busy_poll_s
        policy = _PollPolicy(busy_poll_s)
        clock = time.monotonic
        me = threading.current_thread()
        with self._state_lock:
            if self._reader is me:  # (else taken over already, before it even started)
                self._reader_ident = threading.get_ident()
        error: BaseException | None = None
        try:
            while self._reader is me:
                event = protocol.next_event()
                if event is None:
                    view = protocol.get_buffer(_RECV_BYTES)
                    began = clock()
                    received = self._poll(view, began + busy_poll_s) if policy.poll() else None
                    if received is None:
                        received = self._receive(view)
                    heard = self._heard = clock()
                    policy.waited(heard - began)
                    if received:
                        protocol.buffer_updated(received)
                    else:
                        protocol.receive_data(b"")
                    continue
                if isinstance(event, Message):
                    if event.flags:
                        # (No second name for the message: a reference left in this frame
                        # would keep a lent segment busy until the next message arrives.)
                        event = self._unwrap(event)
                        if event is None:
                            continue
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
        event = None  # (what this frame holds lives as long as the error's traceback)
        if self._reader is me:
            self.close(error)
        del error  # (no cycle error -> traceback -> this frame: see _sending)

    def _unwrap(self, message: Message) -> Message | None:
        """Resolve a shared-memory frame: a staged message's buffers, or None for a RELEASE."""
        flags = message.flags
        if message.kind is MessageKind.CONTROL and flags in (FLAG_PING, FLAG_PONG):
            if flags == FLAG_PING:
                self._queue_control(0, FLAG_PONG)
            return None
        if self._inbox is not None and self._outbox is not None:
            if flags == FLAG_RELEASE and message.kind is MessageKind.CONTROL:
                for segment_id in self._outbox.release(message.request_id):
                    self._queue_control(segment_id, FLAG_RETIRE)
                return None
            if flags == FLAG_RETIRE and message.kind is MessageKind.CONTROL:
                self._inbox.retire([message.request_id])
                return None
            if flags == FLAG_STAGED and len(message.buffers) == 1:
                buffers = self._inbox.unstage(message.buffers[0])
                if _recorder.recording:
                    size = sum(buffer.nbytes for buffer in buffers)
                    _recorder.instant("shm receive", "shm", {"bytes": size})
                return Message(message.kind, message.request_id, 0, message.header, buffers)
        raise ProtocolError(f"unexpected frame flags {flags:#x} from {self.description}")


def _noop() -> None:
    return None


class _PollPolicy:
    """Whether a reader polls for its next frame before it sleeps (``PeerConnection._poll``).

    It polls while its waits for data are shorter than ``busy_poll_s``: the next one likely
    is too.  One long wait (a preemption, a garbage collection) does not stop the polling;
    ``_LONG_WAITS`` in a row do.  From then on it polls only once in ``_PROBE_EVERY`` waits,
    so that a stream whose waits are short only when the reader polls (sleeping, it also
    pays for the wake-ups) gets polled again.
    """

    __slots__ = ("_busy_poll_s", "_long_waits", "_unpolled")

    def __init__(self, busy_poll_s: float) -> None:
        self._busy_poll_s = busy_poll_s
        self._long_waits = _LONG_WAITS  # nothing received yet: no reason to poll
        self._unpolled = 0  # waits since the last poll

    def poll(self) -> bool:
        """Whether to poll for the next frame (``waited`` reports how long it took)."""
        if not self._busy_poll_s:
            return False
        if self._long_waits < _LONG_WAITS or self._unpolled >= _PROBE_EVERY:
            self._unpolled = 0
            return True
        self._unpolled += 1
        return False

    def waited(self, seconds: float) -> None:
        """The wait for data took ``seconds``, polled or slept."""
        self._long_waits = 0 if seconds < self._busy_poll_s else self._long_waits + 1


_SPARE_READERS = 2
"""Readers a connection keeps parked after a take-over, at most (see ``_start_reader``)."""

INLINE_PATIENCE_S = 0.01
"""How long a request run by a connection's reader may keep others from being read."""
INLINE_QUICK_S = 0.0002
"""A request run by the reader in less time than this lets the next run there too, even with
more frames waiting: for such requests, a hand-off to the pool (a thread wake-up, tens of
microseconds of CPU) costs more than running them one after the other."""
IDLE_CHECK_S = 1.0
"""How often the watchdog looks for memory left unused."""


class _Watchdog:
    """One thread per process, alive while any connection is open, that every
    ``INLINE_PATIENCE_S`` hands reading to a new thread where a request run inline has taken
    too long, and writes frames that were left queued a whole tick (no sender came); and
    every ``IDLE_CHECK_S``, frees the shared memory segments and received-payload mappings
    that were left unused for a while (``_shm.IDLE_S``, ``_recycled.IDLE_S``).

    When no connection runs a request inline or has frames queued, it dozes until
    ``IDLE_CHECK_S`` (or half the shortest heartbeat) passes or ``arm`` wakes it, so an idle
    process does not wake up a hundred times a second.  Whoever makes work for it
    (``run_inline``, a queued frame) calls ``arm`` afterwards; the watchdog announces
    ``dozing`` before its last look at the connections, so either that look sees the work or
    ``arm`` sees ``dozing``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: weakref.WeakSet[PeerConnection] = weakref.WeakSet()
        self._thread: threading.Thread | None = None
        self.dozing = False
        self._wake = threading.Event()

    def arm(self) -> None:
        """There is work for the watchdog's next tick: wake it if it dozes (rare: once per
        quiet spell, not once per call)."""
        if self.dozing:
            self._wake.set()

    def watch(self, conn: PeerConnection) -> None:
        with self._lock:
            self._connections.add(conn)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="thenable-rpc-watchdog", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        idle_checked = last_look = time.monotonic()
        while True:
            with self._lock:
                connections = [conn for conn in self._connections if not conn.closed]
                if not connections:
                    self._thread = None
                    return
            now = time.monotonic()
            if now - idle_checked >= IDLE_CHECK_S:
                idle_checked = now
                _recycled.drop_idle(now)
                for conn in connections:
                    conn.retire_idle(now)
            stalled = now - last_look > 3 * IDLE_CHECK_S  # this process (not a peer) stood still
            last_look = now
            for conn in connections:
                conn.tick(now, stalled)
            self._pause(connections)

    def _pause(self, connections: list[PeerConnection]) -> None:
        """Until the next look: ``INLINE_PATIENCE_S`` (a periodic look, like a scheduler
        tick) while any connection has work for the watchdog, else a doze."""
        if any(conn.needs_tick() for conn in connections):
            time.sleep(INLINE_PATIENCE_S)
            return
        self.dozing = True
        # The last look, after announcing the doze: work made from now on calls arm().
        woken = False
        if not any(conn.needs_tick() or conn.closed for conn in connections):
            woken = self._wake.wait(_doze_s(connections))
        self.dozing = False
        self._wake.clear()
        if woken:
            # Look one tick after the work appeared, as for work seen at a tick: by then a
            # queued frame has usually gone out with the next one, and a request run inline
            # has usually ended.
            time.sleep(INLINE_PATIENCE_S)


def _doze_s(connections: list[PeerConnection]) -> float:
    """How long the watchdog may doze: ``IDLE_CHECK_S``, or half the shortest heartbeat."""
    beats = [conn.heartbeat_s for conn in connections if conn.heartbeat_s]
    return min([IDLE_CHECK_S, *(beat / 2 for beat in beats)])


_WATCHDOG = _Watchdog()


def _rights(fd: int) -> list[tuple[int, int, bytes]]:
    """The ancillary data that passes ``fd`` (SCM_RIGHTS) on a Unix-domain socket."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]


def owned(part: bytes | memoryview) -> memoryview:
    """``part`` as bytes that nobody can change: itself if it is immutable, else a copy (the
    caller's memory may change once ``send`` returns)."""
    view = memoryview(part)
    if type(view.obj) is bytes:
        return view.cast("B")
    return memoryview(view.tobytes())


def _advance(views: list[memoryview], nbytes: int) -> None:
    """Drop the first ``nbytes`` of ``views``, written."""
    while nbytes:
        first = views[0]
        if nbytes >= first.nbytes:
            nbytes -= first.nbytes
            del views[0]
        else:
            views[0] = first[nbytes:]
            nbytes = 0
    while views and not views[0].nbytes:
        del views[0]


def _send_some(
    sock: socket.socket, parts: list[bytes | memoryview], fd: int | None = None
) -> tuple[list[memoryview], bool]:
    """Write ``parts`` with non-blocking scatter/gather ``sendmsg``, resuming after partial
    writes while the socket takes more within ``_PATIENCE_S``: what is left (empty when all
    went), and whether ``fd`` went, with the first byte (SCM_RIGHTS, on a Unix-domain socket).
    """
    if fd is None and len(parts) == 1 and type(parts[0]) is bytes:  # a small frame
        try:
            sent = sock.send(parts[0], socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent == len(parts[0]):
            return [], True
        parts = [memoryview(parts[0])[sent:]]
    views = [memoryview(part).cast("B") for part in parts]
    ancillary = [] if fd is None else _rights(fd)
    poller: select.poll | None = None
    while views:
        try:
            sent = sock.sendmsg(views[:_IOV_MAX], ancillary, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if poller is None:
                poller = select.poll()
                poller.register(sock.fileno(), select.POLLOUT)
            if not poller.poll(_PATIENCE_S * 1000):
                return views, not ancillary
            continue
        ancillary = []
        _advance(views, sent)
    return [], True
