"""Requests in: each runs on the thread that read it (when the transport allows) or on the
pool, and its reply goes back on the link it came on - for an ``@async_execution`` function, when
its Future completes.  The requests received and not yet answered are counted, under the agent's
lock, so that shutdown can wait for them (``wait_answered``)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from thenable import _future
from thenable._future import Future
from thenable._tracing import recorder as _recorder
from thenable._tracing.trace_hooks import name_of
from thenable.rpc._errors import RpcTimeoutError, SerializationError
from thenable.rpc._net.transport import IncomingLink
from thenable.rpc._wire.protocol import Message, MessageKind
from thenable.rpc._wire.serialize import ATOMS, dumps, dumps_exception, loads
from thenable.rpc._worker import context as _context
from thenable.rpc._worker import extensions as _extensions
from thenable.rpc._worker.callee_log import log_user_error
from thenable.rpc._worker.calls import flow_id
from thenable.rpc.functions import check_async_result, is_async_execution, may_reply_later

__all__ = ("Host", "Serving")

_LOGGER = logging.getLogger("thenable.rpc")


class Host(_context.Worker, Protocol):
    """What serving uses of its agent (``agent.Agent`` provides it): named here by what it
    does, so that neither module imports the other."""

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
        """Record a span of an RPC message."""
        ...

    def load_error(self, what: str, exc: Exception) -> SerializationError:
        """The error for a received message that cannot be unpickled here."""
        ...


class Serving:
    """The requests an agent receives (see the module docstring)."""

    def __init__(self, agent: Host, lock: threading.Lock) -> None:
        self._agent = agent
        self._lock = lock
        self._unanswered = 0  # requests received and not yet answered
        self._answered = threading.Condition(lock)
        self._awaiting_answers = 0  # threads in wait_answered()

    def on_request(self, link: IncomingLink, message: Message) -> None:
        """A request arrived on ``link``: run it inline, or on the pool."""
        with self._lock:
            self._unanswered += 1
        if _recorder.recording:
            self._on_request_traced(link, message)
        elif link.may_run_inline():
            link.run_inline(self.serve, link, message)
        else:
            self._agent.pool.submit(self.serve, link, message)

    def unanswered_locked(self) -> int:
        """Requests received and not yet answered (the caller holds the agent's lock)."""
        return self._unanswered

    def on_notification(self, link: IncomingLink, message: Message) -> None:
        """Run a one-way message on the reading thread (its failures are logged)."""
        start = _recorder.now() if _recorder.recording else 0
        fn = None
        try:
            with _context.receiving(self._agent, link.peer_rank):
                fn, args, kwargs = loads(message.header, message.buffers)
            fn(*args, **kwargs)
        except Exception:
            _LOGGER.exception("a notification from %r failed", link)
        if start:
            self._agent.traced(f"notify {name_of(fn)}", start, link.peer_rank, 0)

    def _on_request_traced(self, link: IncomingLink, message: Message) -> None:
        """``on_request`` while tracing: the handler records its span."""
        if link.may_run_inline():
            link.run_inline(self._serve_traced, link, message)
        else:
            self._agent.pool.submit(self._serve_traced, link, message, _recorder.now())

    def _serve_traced(self, link: IncomingLink, message: Message, received_ns: int = 0) -> None:
        """``_serve``, recorded as a span with the arrow from its call; ``queued_us`` is the
        time from the request's arrival to its handler's start (0: run where it arrived)."""
        peer, request_id = link.peer_rank, message.request_id
        start = _recorder.flow_in_span("f", flow_id(peer, request_id, False), "rpc")
        fn = self.serve(link, message)
        queued_us = round((start - received_ns) / 1000, 3) if received_ns else 0.0
        self._agent.traced(f"handle {name_of(fn)}", start, peer, request_id, queued_us=queued_us)

    def serve(self, link: IncomingLink, message: Message) -> object:
        """Run one incoming request on this (pool) thread and send its reply; return the
        function it called (None if the request could not be loaded), for the trace."""
        request_id = message.request_id
        try:
            with _context.receiving(self._agent, link.peer_rank) as received:
                call = loads(message.header, message.buffers)
            fn, args, kwargs = call[:3]
            extra = call[3] if len(call) == 4 else None
            extension = _extensions.installed
            if extra is not None and extension is not None:
                extension.received(self._agent, link.peer_rank, extra, received.grad_tensors)
        except Exception as exc:
            self._send_error(link, request_id, self._agent.load_error("the call", exc))
            return None
        try:
            del message, call, received
            if extra is None or extension is None:
                result = fn(*args, **kwargs)
            else:
                with extension.serving(self._agent, extra):
                    result = fn(*args, **kwargs)
            if is_async_execution(fn):
                check_async_result(fn, result).add_done_callback(
                    lambda done: self._reply_with(link, request_id, done, extra, fn)
                )
                return fn
        except BaseException as exc:
            log_user_error(self._agent, fn, exc, link.peer_rank)
            self._send_error(link, request_id, exc)
            return fn
        self._send_result(link, request_id, result, defer=may_reply_later(fn), extra=extra)
        return fn

    def _reply_with(
        self, link: IncomingLink, request_id: int, done: Future[Any], extra: object, fn: object
    ) -> None:
        """An @async_execution function's Future completed: send its outcome as the reply."""
        start = _recorder.now() if _recorder.recording else 0
        error = _future.exception_of(done)
        if error is not None:
            log_user_error(self._agent, fn, error, link.peer_rank)
            self._send_error(link, request_id, error)
        else:
            self._send_result(link, request_id, _future.result_of(done), extra=extra)
        if start:
            self._agent.traced("async_execution done", start, link.peer_rank, request_id)

    def _send_result(
        self,
        link: IncomingLink,
        request_id: int,
        result: Any,
        *,
        defer: bool = False,
        extra: object = None,
    ) -> None:
        """Reply ``result``; ``extra``: the request's extension data (see ``_extensions``)."""
        extension = _extensions.installed
        reply_extra = None
        if extra is not None and extension is not None and type(result) not in ATOMS:
            reply_extra = extension.reply_extra(self._agent, link.peer_rank, extra)
        if reply_extra is None:
            if type(result) in ATOMS:  # None, a number, a string...: no RRef inside
                self._send_reply(link, MessageKind.RESPONSE, request_id, *dumps(result), defer)
                return
            try:
                with _context.sending(self._agent, link.peer_rank, is_request=False) as message:
                    header, buffers = dumps(result)
            except Exception as exc:
                self._send_error(link, request_id, exc)
                return
        else:
            try:
                with _context.sending(
                    self._agent, link.peer_rank, is_request=False, note_grads=True
                ) as message:
                    header, buffers = dumps(_extensions.Reply(result, reply_extra))
            except Exception as exc:
                self._send_error(link, request_id, exc)
                return
            extension.sent(self._agent, link.peer_rank, reply_extra, message.grad_tensors())  # type: ignore[union-attr]
        record = message.record
        if self._send_reply(link, MessageKind.RESPONSE, request_id, header, buffers, defer):
            record.sent()
        else:
            record.unsent()

    def _send_error(self, link: IncomingLink, request_id: int, exc: BaseException) -> None:
        header, buffers = dumps_exception(
            exc, origin=f"worker {self._agent.name} (rank {self._agent.rank})"
        )
        self._send_reply(link, MessageKind.ERROR_RESPONSE, request_id, header, buffers)

    def _send_reply(
        self,
        link: IncomingLink,
        kind: MessageKind,
        request_id: int,
        header: bytes,
        buffers: list[memoryview],
        defer: bool = False,
    ) -> bool:
        start = 0
        if _recorder.recording:
            arrow = flow_id(link.peer_rank, request_id, True)
            start = _recorder.flow_in_span("s", arrow, "rpc reply")
        try:
            link.send(kind, request_id, header, buffers, defer=defer)
        except ConnectionError as exc:
            _LOGGER.info("could not reply to request %d: %s", request_id, exc)
            return False
        finally:
            with self._lock:
                self._unanswered -= 1
                if not self._unanswered and self._awaiting_answers:
                    self._answered.notify_all()
            if start:
                self._agent.traced("send reply", start, link.peer_rank, request_id, header, buffers)
        return True

    def wait_answered(self, deadline: float | None) -> None:
        """Block until every request received so far has been answered (or ``deadline``)."""
        with self._lock:
            self._awaiting_answers += 1
            try:
                while self._unanswered:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise RpcTimeoutError(
                            f"{self._unanswered} request(s) to worker {self._agent.name!r} still "
                            "unanswered"
                        )
                    self._answered.wait(left)
            finally:
                self._awaiting_answers -= 1
