"""Exceptions raised by user code that a worker runs for a call are logged on that worker, once,
on the ``thenable.rpc`` logger (as torch logs them on the callee): the caller gets the exception,
and an operator reading the callee's log sees where it failed."""

from __future__ import annotations

import logging
import traceback

from thenable.rpc._worker.context import Worker

__all__ = ("log_user_error",)

_LOGGER = logging.getLogger("thenable.rpc")


def log_user_error(agent: Worker, fn: object, exc: BaseException, caller: int | None) -> None:
    """Log that ``fn``, run here for worker ``caller`` (None: not known here), raised ``exc``
    (thenable's own internal functions are not logged: what they pass on was logged where it
    was raised)."""
    if fn is None or getattr(fn, "__module__", "").startswith("thenable."):
        return
    if not _LOGGER.isEnabledFor(logging.WARNING):
        return
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    by = "" if caller is None else f", called by {agent.name_of(caller)},"
    _LOGGER.warning(
        "worker %s (rank %d): %s%s raised %s: %s%s (sent back to the caller)",
        agent.name,
        agent.rank,
        name,
        by,
        type(exc).__qualname__,
        exc,
        where,
    )
