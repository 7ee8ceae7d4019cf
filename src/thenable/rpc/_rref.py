"""Remote references (RRef) and the distributed reference counting that keeps their values.

Design note: the reference counting protocol
--------------------------------------------
Every RRef *object*, in any process, holds one *fork*: an id registered with the RRef's owner.
The owner keeps a value while at least one fork is registered, and drops it when none is.

- ``RRef(value)`` on the owner, and ``remote()`` (the owner registers the creator's fork when
  the creation request arrives), make the first fork.
- Pickling an RRef into a message makes the receiver's fork:
  1. the sender is the owner: the owner registers the new fork at once;
  2. the message is a request *to the owner*: no fork travels; the owner registers a local one
     when it unpickles, and the sender keeps its own RRef alive until the reply, so the value
     cannot be dropped in between;
  3. otherwise (a third worker, or a reply to the owner): the sender invents the fork id, tells
     the owner with an ``_add_fork`` call, and keeps its own RRef alive until the owner answers.
- When an RRef object is garbage collected, its fork is released: the id goes onto a queue
  (``__del__`` must not take locks or do I/O) that a background thread sends to the owner in
  batches, as one-way notifications.  The thread gathers releases for ``RELEASE_DELAY_S``
  after the first one, so that dropping RRefs one after another wakes it once per batch, not
  once per RRef.  A release can overtake its fork's registration (case 3); the owner then
  remembers it and cancels the registration when it comes.
- Shutdown flushes the queue before the barrier (with calls that each owner answers once the
  releases are applied), then drops every table: nothing outlives RPC.
A worker that dies keeps its forks registered; their values live until the owner shuts down.

The invariant.  Call a fork *live* from the moment it is made until the owner has applied its
release, and *registered* while the owner's entry lists it.  Every live fork that is not
registered has a *guardian*: a live fork, held by the worker that made the new one, that is
not released before the owner has registered the new one (case 3: the ``_add_fork`` answer;
case 2: the reply to the request, or, if the request timed out, its late reply or the loss of
the connection; case 1 needs none: the owner registers at once).  Following guardians ends at a
registered fork or at the creator's fork of a ``remote()`` whose creation request the owner
has not run yet (its entry, if requests overtook it, is marked not ``created`` and is never
dropped).  So while any fork is live, the owner's entry has a registered fork or is awaiting
its creation: the value is never dropped under a live reference.  The orders that this must
survive (a release before its registration, a fork forwarded before its own registration, a
request using the RRef before ``remote()``'s creation ran or while it runs, a message pickled
twice) each have a test in ``tests/rpc/test_rpc_rref.py``.
Owner-side reads of a value whose ``remote()`` creation is still running (``local_value()``,
``to_here()`` and the proxies on the owner) wait for it.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from thenable import _future
from thenable._future import Future, copy_outcome
from thenable.rpc._errors import RpcTimeoutError, SerializationError
from thenable.rpc._handlers import pinned
from thenable.rpc._options import WorkerInfo
from thenable.rpc._worker import context as _context
from thenable.rpc._worker import extensions as _extensions
from thenable.rpc._worker.callee_log import log_user_error
from thenable.rpc._worker.context import Worker
from thenable.rpc.functions import (
    async_execution,
    check_async_result,
    is_async_execution,
    reply_may_wait,
)

__all__ = ("RELEASE_DELAY_S", "OwnerTable", "RRef", "backward_root", "remote_call")

T = TypeVar("T")

_LOGGER = logging.getLogger("thenable.rpc.rref")

RRefId = tuple[int, int]  # (creator rank, counter)
ForkId = tuple[int, int]  # (rank that made the fork, counter)

_COUNTER = itertools.count(1)

RELEASE_DELAY_S = 0.01
"""How long the first release of a batch waits for others before it is sent."""


def _owners(agent: Worker) -> OwnerTable:
    """``agent.rrefs``, typed: below the agent, ``Worker.rrefs`` is opaque (see ``_context``)."""
    table: OwnerTable = agent.rrefs
    return table


def _new_id(agent: Worker) -> tuple[int, int]:
    return (agent.rank, next(_COUNTER))


class _Entry:
    """What the owner keeps for one RRef: its value (a Future) and the forks holding it."""

    __slots__ = ("created", "forks", "value")

    def __init__(self) -> None:
        self.value: Future[Any] = Future()
        self.forks: set[ForkId] = set()
        # False while a request using the RRef has overtaken remote()'s creation request:
        # the creator's fork is still on its way, so no fork count may drop the entry yet.
        self.created = False


class OwnerTable:
    """The owner's side of reference counting, and the queue of releases to send."""

    def __init__(self, agent: Worker) -> None:
        self._agent = agent
        self._lock = threading.Lock()
        # Invariant: a created entry has at least one fork; when its last fork goes, so does it.
        self._entries: dict[RRefId, _Entry] = {}
        # Releases that arrived before their fork was registered (case 3 of the protocol).
        self._early: set[tuple[RRefId, ForkId]] = set()
        # Releases waiting to be sent, and the releaser's wake-ups: a Future (flush), None
        # (close), or True (the first release after the releaser went idle).
        self._releases: collections.deque[tuple[int, RRefId, ForkId]] = collections.deque()
        self._wakeups: queue.SimpleQueue[Future[None] | bool | None] = queue.SimpleQueue()
        self._releaser_idle = False
        self._notified: set[int] = set()  # owners sent releases since the last flush
        self._releaser = threading.Thread(
            target=self._send_releases, name=f"thenable-rpc-rref-{agent.name}", daemon=True
        )
        self._releaser.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def statistics(self) -> dict[str, int]:
        """What ``rpc.get_stats`` reports of RRefs (see its fields)."""
        with self._lock:
            forks = sum(len(entry.forks) for entry in self._entries.values())
            owned, early = len(self._entries), len(self._early)
        return {
            "owned": owned,
            "forks": forks,
            "early_releases": early,
            "releases_queued": len(self._releases),
        }

    def create(self, rref_id: RRefId, fork: ForkId) -> Future[Any]:
        """Register the creator's ``fork``; return the value's Future for the creator to complete.

        The entry may exist already: a request using the RRef can overtake ``remote()``'s
        creation request, and registers its fork first (see ``add_fork``).
        """
        with self._lock:
            entry = self._entry_locked(rref_id)
            entry.created = True
            self._add_locked(rref_id, entry, fork)
            return entry.value

    def add_fork(self, rref_id: RRefId, fork: ForkId) -> None:
        """Register ``fork`` of an RRef this worker owns (its value may still be on its way)."""
        with self._lock:
            self._add_locked(rref_id, self._entry_locked(rref_id), fork)

    def _entry_locked(self, rref_id: RRefId) -> _Entry:
        """The entry of ``rref_id``, made now if none exists: a request using the RRef may
        overtake ``remote()``'s creation request (which then finds and completes it)."""
        entry = self._entries.get(rref_id)
        if entry is None:
            entry = self._entries[rref_id] = _Entry()
        return entry

    def _add_locked(self, rref_id: RRefId, entry: _Entry, fork: ForkId) -> None:
        if (rref_id, fork) in self._early:
            self._early.discard((rref_id, fork))
        else:
            entry.forks.add(fork)
        self._drop_if_unused_locked(rref_id, entry)

    def _drop_if_unused_locked(self, rref_id: RRefId, entry: _Entry) -> None:
        if entry.created and not entry.forks:
            del self._entries[rref_id]

    def release(self, rref_id: RRefId, fork: ForkId) -> None:
        with self._lock:
            entry = self._entries.get(rref_id)
            if entry is None or fork not in entry.forks:
                self._early.add((rref_id, fork))
                return
            entry.forks.discard(fork)
            self._drop_if_unused_locked(rref_id, entry)

    def fail_creation(self, rref_id: RRefId, fork: ForkId, error: BaseException) -> None:
        """``remote()``'s creation request failed before it ran here (it could not be
        decoded, say): register the creator's fork as ``create`` would have, and fail the
        value, so that requests waiting for it get an answer and the entry is freed as usual.

        If the creation did run (the creator only failed to read the answer), nothing changes.
        """
        with self._lock:
            entry = self._entry_locked(rref_id)
            if entry.created:
                return
            entry.created = True
            value = entry.value
            self._add_locked(rref_id, entry, fork)
        _future.complete(value, None, error, strict=False)

    def awaited_value(self, rref_id: RRefId) -> Future[Any]:
        """The value's Future for a caller that holds a fork of ``rref_id``.

        The entry may not exist yet: the request can overtake ``remote()``'s creation, which
        then completes this same Future.
        """
        with self._lock:
            return self._entry_locked(rref_id).value

    def value_future(self, rref_id: RRefId) -> Future[Any]:
        with self._lock:
            return self._get_locked(rref_id).value

    def _get_locked(self, rref_id: RRefId) -> _Entry:
        entry = self._entries.get(rref_id)
        if entry is None:
            raise KeyError(
                f"RRef {rref_id} is not owned by worker {self._agent.name} (any more): its "
                "value was dropped when the last reference to it went away"
            )
        return entry

    # -- releases -----------------------------------------------------------------------------

    def release_later(self, owner: int, rref_id: RRefId, fork: ForkId) -> None:
        """Queue a release; safe from ``__del__`` (no lock is taken: deque.append and
        SimpleQueue.put are atomic and reentrant)."""
        self._releases.append((owner, rref_id, fork))
        if self._releaser_idle:
            self._releaser_idle = False
            self._wakeups.put(True)

    def flush(self, timeout: float | None = None) -> None:
        """Send every queued release and wait until the owners have applied them."""
        done: Future[None] = Future()
        self._wakeups.put(done)
        done.wait(timeout)

    def close(self) -> None:
        """Stop the releaser and forget every value (shutdown)."""
        self._wakeups.put(None)
        if self._releaser is not threading.current_thread():
            self._releaser.join(timeout=5)
        with self._lock:
            self._entries.clear()
            self._early.clear()

    def _send_releases(self) -> None:
        """The releaser: wait for a release, gather more for ``RELEASE_DELAY_S``, send them.

        It marks itself idle *before* it looks at the queue for the last time, so a release
        queued after that look finds it idle and wakes it (a wake-up that finds the queue
        already emptied is harmless).
        """
        wakeups = self._wakeups
        while True:
            self._releaser_idle = True
            if self._releases:
                self._releaser_idle = False
                wakeup = _get_within(wakeups, RELEASE_DELAY_S)  # a flush or close cuts it short
            else:
                wakeup = wakeups.get()
                if wakeup is True:
                    wakeup = _get_within(wakeups, RELEASE_DELAY_S)
            self._releaser_idle = False
            markers: list[Future[None]] = []
            stop = False
            while True:  # every wake-up that came meanwhile
                if wakeup is None:
                    stop = True
                elif isinstance(wakeup, Future):
                    markers.append(wakeup)
                try:
                    wakeup = wakeups.get_nowait()
                except queue.Empty:
                    break
            batch: dict[int, list[tuple[RRefId, ForkId]]] = {}
            releases = self._releases
            while releases:
                owner, rref_id, fork = releases.popleft()
                batch.setdefault(owner, []).append((rref_id, fork))
            try:
                self._release(batch, confirmed=bool(markers or stop))
            finally:
                for marker in markers:  # flush() must never hang, whatever happened above
                    marker.set_result(None)
            if stop:
                return

    def _release(self, batch: dict[int, list[tuple[RRefId, ForkId]]], confirmed: bool) -> None:
        """Apply releases here, or send them to their owners: as one-way notifications, or
        (``confirmed``, for ``flush``) as calls whose answers say they were applied.

        A confirmed round also calls every owner notified since the last one: it applies
        notifications before it reads the call that follows them on the connection.
        """
        agent = self._agent
        sent: list[tuple[int, Future[Any]]] = []
        if confirmed:
            for owner in self._notified - batch.keys():
                batch[owner] = []
            self._notified.clear()
        for owner, forks in batch.items():
            try:
                if owner == agent.rank:
                    for rref_id, fork in forks:
                        self.release(rref_id, fork)
                elif confirmed:
                    sent.append((owner, agent.call(owner, _release_forks, (forks,), {}, 0)))
                else:
                    agent.notify(owner, _release_forks, (forks,))
                    self._notified.add(owner)
            except Exception as exc:  # e.g. shut down meanwhile: log, and go on with the rest
                _LOGGER.info("releasing RRefs owned by rank %d failed: %s", owner, exc)
        for owner, done in sent:
            try:
                done.wait()
            except Exception as exc:  # the owner is gone: nothing left to release there
                _LOGGER.info("releasing RRefs owned by rank %d failed: %s", owner, exc)


class RRef(Generic[T]):
    """A reference to a value that lives on one worker, its owner.

    ``RRef(value)`` makes an owner RRef of a local value; ``rpc.remote`` makes one whose value
    is created on another worker.  RRefs may be passed in and returned from RPC calls to any
    worker; the owner keeps the value while any worker holds a reference (see the module's
    design note).
    """

    __slots__ = ("__weakref__", "_agent", "_created", "_fork", "_id", "_owner", "_type")

    def __init__(self, value: T, type_hint: object = None) -> None:
        agent = _context.require_agent()
        self._init(agent, agent.rank, _new_id(agent), _new_id(agent))
        _owners(agent).create(self._id, self._fork).set_result(value)

    def _init(
        self,
        agent: Worker,
        owner: int,
        rref_id: RRefId,
        fork: ForkId,
        created: Future[Any] | None = None,
    ) -> None:
        self._agent = agent
        self._owner = owner
        self._id = rref_id
        self._fork = fork
        # For remote(): the creation call; the owner has confirmed the RRef once it is done.
        self._created = created
        self._type: type | None = None  # the value's, once _get_type has fetched it

    @classmethod
    def _make(
        cls,
        agent: Worker,
        owner: int,
        rref_id: RRefId,
        fork: ForkId,
        created: Future[Any] | None = None,
    ) -> RRef[Any]:
        rref: RRef[Any] = cls.__new__(cls)
        rref._init(agent, owner, rref_id, fork, created)
        return rref

    def __del__(self) -> None:
        agent = _context.current_agent()  # after shutdown there is nothing left to release
        if agent is None:
            return
        mine: object = getattr(self, "_agent", None)  # unset if __init__ failed
        if mine is agent:
            _owners(agent).release_later(self._owner, self._id, self._fork)

    def __repr__(self) -> str:
        kind = "OwnerRRef" if self.is_owner() else "UserRRef"
        return f"{kind}(id={self._id}, owner={self.owner_name()!r})"

    # -- identity -----------------------------------------------------------------------------

    def owner(self) -> WorkerInfo:
        """The owner's WorkerInfo."""
        return WorkerInfo(self._agent.name_of(self._owner), self._owner)

    def owner_name(self) -> str:
        """The name of the worker that owns the value."""
        return self._agent.name_of(self._owner)

    def is_owner(self) -> bool:
        """Whether this worker owns the value."""
        return self._owner == self._agent.rank

    def confirmed_by_owner(self) -> bool:
        """Whether the owner is known to hold this RRef's value.

        False only for a ``remote()`` result whose creation call is still unanswered.  An RRef
        received from another worker counts as confirmed at once (unlike torch, which waits for
        the owner's acknowledgement): its sender keeps the value alive until the owner has
        registered the new reference, so it is safe to use either way.
        """
        created = self._created
        return created is None or created.done()

    # -- value --------------------------------------------------------------------------------

    def local_value(self) -> T:
        """The value, on its owner.

        If ``remote()`` is still creating the value (a call using the RRef can overtake the
        creation request), this waits for it, as torch does, for at most the RPC timeout.

        Raises:
            RuntimeError: this worker is not the owner (use ``to_here()``).
            TimeoutError: the value was still being created after the RPC timeout.
            Exception: whatever creating the value raised.
        """
        if not self.is_owner():
            raise RuntimeError(
                f"local_value() called on a UserRRef: the value lives on {self.owner_name()!r}; "
                "use to_here() to fetch a copy"
            )
        return self._owner_value(-1.0)

    def _owner_value(self, timeout: float) -> T:
        """On the owner: the value, once ``remote()`` has created it (``timeout`` as in
        ``to_here``)."""
        value = _owners(self._agent).value_future(self._id)
        if value.done():
            return value.value()  # type: ignore[no-any-return]
        seconds = agent_timeout(self._agent, timeout)
        try:
            return value.wait(seconds if seconds > 0 else None)  # type: ignore[no-any-return]
        except TimeoutError:
            if value.done():
                raise  # the creation itself failed with a TimeoutError
            raise RpcTimeoutError.after_timeout(
                f"the value of {self!r} was still being created after {seconds} s", seconds
            ) from None

    def to_here(self, timeout: float = -1.0) -> T:
        """A copy of the value on this worker (the value itself on the owner).

        Args:
            timeout: seconds; -1 for the RPC default, 0 for no limit.

        Raises:
            TimeoutError: the value did not arrive in time, or ``remote()``'s creation call
                timed out (as in torch: the RRef's next use raises it).
            Exception: whatever creating the value raised, or the error that made the owner
                refuse ``remote()``'s request (an argument it could not unpickle, say).
        """
        agent = self._agent
        if self.is_owner():
            return self._owner_value(timeout)
        # Only the id travels: this RRef (its fork) stays alive while we wait, so the owner
        # keeps the value without registering a fork for the request.
        seconds = agent_timeout(agent, timeout)
        self._raise_if_creation_failed()
        result = agent.call(self._owner, _fetch_value, (self._id,), {}, seconds)
        try:
            return result.wait()  # type: ignore[no-any-return]
        except Exception:
            self._raise_if_creation_failed()  # the cause, rather than its echo from the owner
            raise

    def _raise_if_creation_failed(self) -> None:
        """Raise the failure of ``remote()``'s creation call, if it failed (it timed out,
        say, or could not be decoded by the owner)."""
        created = self._created
        if created is not None and created.done() and _future.exception_of(created) is not None:
            created.wait()

    def _get_type(self, timeout: float = -1.0, blocking: bool = True) -> Any:
        """The type of the value (torch's ``RRef._get_type``), fetched from the owner once and
        then kept; with ``blocking=False``, a Future of it.

        Raises:
            TimeoutError, Exception: as ``to_here``.
        """
        found = self._type
        if found is not None:
            ready: Future[type] = Future()
            ready.set_result(found)
            return found if blocking else ready
        agent = self._agent
        if self.is_owner():
            typed = _owners(agent).value_future(self._id).then(_type_of)
        else:
            self._raise_if_creation_failed()
            seconds = agent_timeout(agent, timeout)
            typed = agent.call(self._owner, _value_type, (self._id,), {}, seconds)
        typed.add_done_callback(self._keep_type)
        return typed.wait() if blocking else typed

    def _keep_type(self, typed: Future[type]) -> None:
        if _future.exception_of(typed) is None:
            self._type = _future.result_of(typed)

    # -- autograd -----------------------------------------------------------------------------

    def backward(self, dist_autograd_ctx_id: int = -1, retain_graph: bool = False) -> None:
        """Backward from this RRef's value, a scalar tensor.

        With a context id, the distributed pass of that context (``thenable.autograd``),
        started on the owner; gradients go to the context.  Without one (-1), a local
        ``torch.autograd.backward`` on the owner, into ``.grad``.
        """
        if dist_autograd_ctx_id == -1:
            if not self.is_owner():
                raise RuntimeError(
                    "RRef.backward() without a context id runs a local backward pass, which only "
                    f"the owner ({self.owner_name()!r}) can do; pass the distributed autograd "
                    "context id to run it from here"
                )
            import torch

            value = backward_root(self.local_value())
            torch.autograd.backward(value, retain_graph=retain_graph)
            return
        extension = _extensions.installed
        if extension is None:
            raise RuntimeError(
                "RRef.backward(context_id) runs distributed autograd: import thenable.autograd "
                "and make the forward pass inside `with dist_autograd.context()`"
            )
        extension.rref_backward(self._agent, self, dist_autograd_ctx_id, retain_graph)

    # -- proxies ------------------------------------------------------------------------------

    def rpc_sync(self, timeout: float = -1.0) -> Any:
        """A proxy: ``rref.rpc_sync().method(*args)`` runs the method on the owner, blocking."""
        return _Proxy(self, timeout, _wait_for)

    def rpc_async(self, timeout: float = -1.0) -> Any:
        """A proxy: ``rref.rpc_async().method(*args)`` returns the Future of the method's result."""
        return _Proxy(self, timeout, _as_is)

    def remote(self, timeout: float = -1.0) -> Any:
        """A proxy: ``rref.remote().method(*args)`` returns an RRef to the result, on the owner."""
        return _RemoteProxy(self, timeout)

    # -- pickling -----------------------------------------------------------------------------

    def __reduce__(self) -> tuple[Any, ...]:
        context = _context.sending_to()
        if context is None:
            raise SerializationError(
                "an RRef can only be pickled by thenable.rpc while sending it to another worker "
                "(pass it as an argument or return value of an RPC call)"
            )
        agent, destination, record = context
        reduced = record.reductions.get(id(self))  # pickled already, in a first pass
        if reduced is not None:
            return reduced
        if destination == self._owner and agent.rank != self._owner and record.is_request:
            # Case 2: the owner registers a local fork; we hold ours until it has read this.
            record.holds.append(self)
            reduced = (_rebuild_rref, (self._owner, self._id, None))
        else:
            fork = _new_id(agent)
            if agent.rank == self._owner:  # case 1
                _owners(agent).add_fork(self._id, fork)
                record.undo.append(lambda: _owners(agent).release(self._id, fork))
            else:  # case 3
                record.after_send.append(lambda: _announce_fork(agent, self, fork))
            reduced = (_rebuild_rref, (self._owner, self._id, fork))
        record.reductions[id(self)] = reduced
        return reduced


def _get_within(wakeups: queue.SimpleQueue[Any], seconds: float) -> Any:
    """The next wake-up if one comes within ``seconds``, else True."""
    try:
        return wakeups.get(timeout=seconds)
    except queue.Empty:
        return True


def _wait_for(future: Future[Any]) -> Any:
    return future.wait()


def _as_is(future: Future[Any]) -> Any:
    return future


def agent_timeout(agent: Worker, timeout: float) -> float:
    """Seconds for a call: -1 means the agent's default, 0 no limit."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be seconds (-1: default, 0: none), got {timeout!r}")
    if timeout < 0:
        if timeout != -1:
            raise ValueError(f"timeout must be -1 (default), 0 (none) or positive, got {timeout}")
        return agent.rpc_timeout
    return float(timeout)


def _announce_fork(agent: Worker, rref: RRef[Any], fork: ForkId) -> None:
    """Case 3: tell the owner about ``fork``; ``rref`` stays alive until the owner answers."""
    try:
        done = agent.call(rref._owner, _add_fork, (rref._id, fork), {}, 0)
    except RuntimeError:
        return
    done.add_done_callback(functools.partial(_log_fork_failure, rref=rref))


def _log_fork_failure(done: Future[Any], rref: RRef[Any]) -> None:
    error = _future.exception_of(done)
    if error is not None:
        _LOGGER.warning("could not register a reference to %r: %s", rref, error)


@pinned
def _rebuild_rref(owner: int, rref_id: RRefId, fork: ForkId | None) -> RRef[Any]:
    context = _context.received_from()
    agent = context[0] if context is not None else _context.require_agent()
    if fork is None:  # case 2: we are the owner; the sender holds its fork meanwhile
        fork = _new_id(agent)
        _owners(agent).add_fork(rref_id, fork)
    return RRef._make(agent, owner, rref_id, fork)


class _Proxy:
    """``rref.rpc_sync()`` / ``rref.rpc_async()``: attribute access names a method to call."""

    def __init__(
        self, rref: RRef[Any], timeout: float, finish: Callable[[Future[Any]], Any]
    ) -> None:
        self._rref = rref
        self._timeout = timeout
        self._finish = finish

    def __getattr__(self, name: str) -> Callable[..., Any]:
        rref, timeout, finish = self._rref, self._timeout, self._finish

        def call(*args: Any, **kwargs: Any) -> Any:
            agent = rref._agent
            seconds = agent_timeout(agent, timeout)
            future = agent.call(rref._owner, _invoke, (rref, name, args, kwargs), {}, seconds)
            return finish(future)

        return call


class _RemoteProxy:
    """``rref.remote()``: attribute access names a method whose result stays on the owner."""

    def __init__(self, rref: RRef[Any], timeout: float) -> None:
        self._rref = rref
        self._timeout = timeout

    def __getattr__(self, name: str) -> Callable[..., RRef[Any]]:
        rref, timeout = self._rref, self._timeout

        def call(*args: Any, **kwargs: Any) -> RRef[Any]:
            _check_method(rref, name, timeout)
            return remote_call(
                rref._agent, rref._owner, _invoke, (rref, name, args, kwargs), {}, timeout
            )

        return call


def backward_root(value: object) -> Any:
    """``value``, the root of ``RRef.backward``, or torch's error if it is not a tensor."""
    import torch

    if not isinstance(value, torch.Tensor):
        raise RuntimeError(
            "RRef should contain a tensor for .backward(): this one holds a "
            f"{type(value).__module__}.{type(value).__qualname__}"
        )
    return value


def _check_method(rref: RRef[Any], name: str, timeout: float) -> None:
    """``rref.remote().name()`` of a value without ``name`` raises AttributeError at the call,
    as torch's does (its result would hold only the error); the value's type is fetched once."""
    value_type = rref._get_type(timeout)
    if hasattr(value_type, name):
        return
    agent = rref._agent
    if rref.is_owner():
        has = hasattr(rref._owner_value(timeout), name)
    else:  # an attribute of the instance only: ask the owner
        seconds = agent_timeout(agent, timeout)
        has = agent.call(rref._owner, _has_attribute, (rref._id, name), {}, seconds).wait()
    if not has:
        raise AttributeError(
            f"{value_type.__qualname__!r} object has no attribute {name!r} (the value of {rref!r})"
        )


def remote_call(
    agent: Worker,
    owner: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float,
) -> RRef[Any]:
    """``rpc.remote``: create ``fn(*args, **kwargs)`` on ``owner``; return an RRef to it."""
    seconds = agent_timeout(agent, timeout)
    rref_id = _new_id(agent)
    fork = _new_id(agent)
    if owner == agent.rank:  # run here, in the caller's autograd context (see _extensions)
        target = _owners(agent).create(rref_id, fork)
        carried = _extensions.carried(agent)
        agent.pool.submit(_produce, target, fn, args, kwargs, carried, agent, agent.rank)
        return RRef._make(agent, owner, rref_id, fork)
    created = agent.call(owner, _remote_create, (rref_id, fork, fn, args, kwargs), {}, seconds)
    created.add_done_callback(
        functools.partial(_report_failed_creation, agent=agent, owner=owner, ids=(rref_id, fork))
    )
    return RRef._make(agent, owner, rref_id, fork, created)


def _report_failed_creation(
    created: Future[Any], agent: Worker, owner: int, ids: tuple[RRefId, ForkId]
) -> None:
    """The owner answered ``remote()``'s creation call with an error, so the call did not run
    there: tell the owner, whose requests waiting for the value would wait forever else.

    (A timeout or a lost connection says nothing of the owner: it may still create the value.)
    """
    error = _future.exception_of(created)
    if error is None or isinstance(error, (TimeoutError, ConnectionError)):
        return
    reason = RuntimeError(f"creating the value of this RRef failed on the owner: {error}")
    try:
        agent.notify(owner, _fail_creation, (*ids, reason))
    except Exception as exc:  # shut down or disconnected meanwhile: nobody is left waiting
        _LOGGER.info("could not report a failed remote() to rank %d: %s", owner, exc)


def _produce(
    target: Future[Any],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    carried: object = None,
    agent: Worker | None = None,
    caller: int | None = None,
) -> None:
    """Complete ``target`` with ``fn``'s result, following the Future of async functions;
    ``fn`` runs under ``carried``, the caller's state when it is not this thread's (see
    ``_extensions.run_carried``)."""
    if agent is None:
        agent = _context.require_agent()
    try:
        result = _extensions.run_carried(agent, carried, fn, *args, **kwargs)
        if is_async_execution(fn):
            check_async_result(fn, result).add_done_callback(
                functools.partial(copy_outcome, target=target)
            )
            return
    except BaseException as exc:
        log_user_error(agent, fn, exc, caller)
        _future.complete(target, None, exc, exc.__traceback__)
        return
    _future.complete(target, result, None)


# -- functions run on the owner, by RPC ------------------------------------------------------


@pinned
@reply_may_wait  # its caller goes on without it; to_here()'s reply usually follows at once
def _remote_create(
    rref_id: RRefId,
    fork: ForkId,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """On the owner: register the creator's fork, then make the value."""
    _produce(_owners(_context.require_agent()).create(rref_id, fork), fn, args, kwargs)


@pinned
@async_execution
def _fetch_value(rref_id: RRefId) -> Future[Any]:
    """On the owner: the value's Future; the reply is sent when it completes."""
    return _owners(_context.require_agent()).awaited_value(rref_id)


def _type_of(value: Future[Any]) -> type:
    return type(value.value())


@pinned
@async_execution
def _value_type(rref_id: RRefId) -> Future[type]:
    """On the owner: the Future of the value's type."""
    return _owners(_context.require_agent()).awaited_value(rref_id).then(_type_of)


@pinned
@async_execution
def _has_attribute(rref_id: RRefId, name: str) -> Future[bool]:
    """On the owner: whether the value has attribute ``name``."""
    value = _owners(_context.require_agent()).awaited_value(rref_id)
    return value.then(lambda done: hasattr(done.value(), name))


@pinned
@async_execution
def _invoke(
    rref: RRef[Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Future[Any]:
    """On the owner: call ``value.name(*args, **kwargs)`` once the value exists (in the
    caller's autograd context, also when that is after this handler has returned; calls that
    waited run concurrently, as handlers do, so one may wait for another)."""
    agent = rref._agent
    carried = _extensions.carried(agent)
    result: Future[Any] = Future()

    def call(value: Future[Any]) -> None:
        if _future.exception_of(value) is not None:
            # Passed on as it is: raising the stored exception here would hang this call's
            # frames on its traceback, and with them the RRef, which would never be freed.
            copy_outcome(value, result)
            return
        try:
            method = getattr(_future.result_of(value), name)
        except BaseException as exc:
            _future.complete(result, None, exc, exc.__traceback__)
            return
        _produce(result, method, args, kwargs, carried, agent)

    value = _owners(agent).value_future(rref._id)
    if value.done():
        call(value)
    else:  # each call waiting for the value runs on a thread of its own once it exists
        value.add_done_callback(lambda done: agent.pool.submit(call, done))
    return result


@pinned
def _fail_creation(rref_id: RRefId, fork: ForkId, error: BaseException) -> None:
    _owners(_context.require_agent()).fail_creation(tuple(rref_id), tuple(fork), error)  # type: ignore[arg-type]


@pinned
def _add_fork(rref_id: RRefId, fork: ForkId) -> None:
    _owners(_context.require_agent()).add_fork(rref_id, fork)


@pinned
def _release_forks(forks: list[tuple[RRefId, ForkId]]) -> None:
    agent = _context.current_agent()
    if agent is None:  # a release read while this worker shuts down: its values are gone
        return
    table = _owners(agent)
    for rref_id, fork in forks:
        table.release(tuple(rref_id), tuple(fork))  # type: ignore[arg-type]
