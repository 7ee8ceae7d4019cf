"""The exceptions of ``thenable.rpc``: precise types, each also the type torch raises.

torch.distributed.rpc raises ``RuntimeError`` for almost every failure, so code written for it
catches ``RuntimeError``.  Every error here derives from ``RpcError``, a ``RuntimeError``, and
from the built-in type that says what went wrong (``TimeoutError``, ``ConnectionError``,
``TypeError``, ``ValueError``), so ``except RuntimeError``, ``except TimeoutError`` and
``except rpc.RpcTimeoutError`` all work.

What raises what (torch raises ``RuntimeError`` in each case, or where noted):

- ``RpcTimeoutError``: a call runs past its timeout (the message has torch's "RPC ran for more
  than set timeout", which torch's tests and programs match); ``init_rpc`` or a graceful
  ``shutdown`` runs out of time.
- ``RpcConnectionError``: the peer died, the connection broke, the peer stopped answering
  heartbeats, RPC shut down under a call.
- ``SendQueueFullError`` (an ``RpcConnectionError``): the peer has not read what was sent to
  it, and more than ``max_send_queue_bytes`` wait for it.
- ``SerializationError``: an argument (torch: ``TypeError``), result or RRef cannot be
  pickled; the callee cannot load a call (a function it cannot import, say).
- ``RemoteError``: a remote exception that cannot be re-created here.
- ``UnknownWorkerError``: no worker has that name or rank.
- ``DestinationTypeError`` (an ``UnknownWorkerError`` and a ``TypeError``): the destination of
  a call is not a name, rank or WorkerInfo (``rpc_sync(1.0, f)``; torch: ``ValueError``).
- ``WorkerNameError``: an invalid worker name, or one that two workers have.
- ``RendezvousError``: a rank taken twice, workers started with different world sizes.
- ``AsyncExecutionError``: an ``@async_execution`` function returned no Future.
"""

from __future__ import annotations

__all__ = (
    "AsyncExecutionError",
    "DestinationTypeError",
    "RemoteError",
    "RendezvousError",
    "RpcConnectionError",
    "RpcError",
    "RpcTimeoutError",
    "SendQueueFullError",
    "SerializationError",
    "UnknownWorkerError",
    "WorkerNameError",
)


class RpcError(RuntimeError):
    """Base of the errors of thenable.rpc (a RuntimeError, as torch's RPC errors are)."""


class RpcTimeoutError(TimeoutError, RpcError):
    """A call, ``init_rpc``'s rendezvous or a graceful ``shutdown`` ran out of time."""

    @classmethod
    def after_timeout(cls, message: str, timeout: float) -> RpcTimeoutError:
        """The error of a call past its ``timeout`` (seconds): ``message``, then torch's words
        for it, "RPC ran for more than set timeout (500 ms) and will now be marked with an
        error", that torch's tests and programs match."""
        milliseconds = timeout * 1000
        shown = f"{milliseconds:.0f}" if milliseconds >= 1 else f"{milliseconds:g}"
        return cls(
            f"{message}: RPC ran for more than set timeout ({shown} ms) and will now be marked "
            "with an error"
        )


class RpcConnectionError(ConnectionError, RpcError):
    """A peer cannot be reached or went away (the message says which and why)."""


class SendQueueFullError(RpcConnectionError):
    """A peer does not read (frozen, overloaded) and the bytes waiting for it would exceed
    ``RpcBackendOptions.max_send_queue_bytes``: the call fails at once instead of queueing."""


class SerializationError(TypeError, RpcError):
    """An object cannot be pickled for sending, or a received call cannot be loaded; the
    message says which and what to do."""


class UnknownWorkerError(ValueError, RpcError):
    """No worker of the group has that name or rank."""


class DestinationTypeError(TypeError, UnknownWorkerError):
    """The destination of a call is not a worker name (str), rank (int) or WorkerInfo.

    A TypeError for what it is, and an ``UnknownWorkerError`` (so a ``ValueError`` and a
    ``RuntimeError``) because that is what torch raises: ``ValueError("Cannot get WorkerInfo
    from name 1.0")``.
    """


class WorkerNameError(ValueError, RpcError):
    """A worker name that is not valid, or that another worker of the group already has."""


class RendezvousError(ValueError, RpcError):
    """The workers started disagree about their group (a rank taken twice, another world
    size): every worker's ``init_rpc`` fails with it."""


class AsyncExecutionError(TypeError, RpcError):
    """An ``@async_execution`` function returned something other than a Future."""


class RemoteError(RpcError):
    """A remote exception that could not be sent as itself (it failed to pickle/unpickle).

    ``type_name`` is the original ``module.qualname``, ``message`` its str(), ``reason`` why
    it could not be transferred, and ``traceback_text`` the remote traceback.
    """

    def __init__(
        self, type_name: str, message: str, traceback_text: str = "", reason: str = ""
    ) -> None:
        super().__init__(type_name, message, traceback_text, reason)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text
        self.reason = reason

    def __str__(self) -> str:
        text = f"{self.type_name}: {self.message}" if self.message else self.type_name
        if self.reason:  # (torch's words, which its tests match)
            text += (
                f" (Original exception on remote side was {self.type_name}; the exception itself "
                f"could not be transferred: {self.reason})"
            )
        return text
