"""thenable: futures, fork/join tasks and RPC in the shape of torch's, for any Python program.

The public front: everything here is re-exported from private modules.  ``trace`` and
``Trace`` are imported on first use (tracing's modules cost ``import thenable`` about 15 ms
that a program which never traces need not pay), unless ``THENABLE_TRACE`` asks to trace the
whole process.
"""

import os as _os
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from thenable._aio import from_asyncio as from_asyncio
from thenable._aio import from_concurrent as from_concurrent
from thenable._aio import from_torch as from_torch
from thenable._aio import to_asyncio as to_asyncio
from thenable._aio import to_concurrent as to_concurrent
from thenable._combinators import as_completed as as_completed
from thenable._combinators import collect_all as collect_all
from thenable._combinators import collect_any as collect_any
from thenable._combinators import wait_all as wait_all
from thenable._future import Future as Future
from thenable._future import FutureState as FutureState
from thenable._pool import InteropPool as InteropPool
from thenable._pool import TaskExecutor as TaskExecutor
from thenable._pool import fork as fork
from thenable._pool import get_num_interop_threads as get_num_interop_threads
from thenable._pool import set_num_interop_threads as set_num_interop_threads
from thenable._pool import wait as wait

__version__ = "0.1.0"
"""This release's version."""

__all__ = (
    "Future",
    "FutureState",
    "InteropPool",
    "TaskExecutor",
    "Trace",
    "__version__",
    "as_completed",
    "collect_all",
    "collect_any",
    "fork",
    "from_asyncio",
    "from_concurrent",
    "from_torch",
    "get_num_interop_threads",
    "set_num_interop_threads",
    "to_asyncio",
    "to_concurrent",
    "trace",
    "wait",
    "wait_all",
)

if _TYPE_CHECKING:
    from thenable._tracing.trace import Trace as Trace
    from thenable._tracing.trace import trace as trace


def __getattr__(name: str) -> _Any:
    if name in ("trace", "Trace"):
        from thenable._tracing import trace as _trace

        return getattr(_trace, name)
    raise AttributeError(f"module 'thenable' has no attribute {name!r}")


if _os.environ.get("THENABLE_TRACE"):  # trace this whole process (see thenable._tracing.trace)
    from thenable._tracing.trace import start_from_environment as _start_from_environment

    _start_from_environment()
