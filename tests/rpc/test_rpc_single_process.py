"""RPC within one process (world size 1): calls to itself take the same path as remote ones."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest
from _harness import free_port

from thenable import rpc

_RELEASE = threading.Event()


def _blocked_for_a_while() -> str:
    _RELEASE.wait(timeout=2.0)
    return "late"


@pytest.fixture
def solo() -> Iterator[None]:
    options = rpc.RpcBackendOptions(init_method=f"tcp://127.0.0.1:{free_port()}", rpc_timeout=10)
    rpc.init_rpc("solo", rank=0, world_size=1, rpc_backend_options=options)
    try:
        yield
    finally:
        _RELEASE.set()
        with contextlib.suppress(RuntimeError):  # the test shut it down already
            rpc.shutdown(graceful=False)
        _RELEASE.clear()


def test_graceful_shutdown_is_not_failed_by_a_call_that_timed_out(solo: None) -> None:
    """A call that ends with its own TimeoutError is not the shutdown running out of time."""
    call = rpc.rpc_async("solo", _blocked_for_a_while, timeout=0.2)
    started = time.monotonic()
    rpc.shutdown()  # graceful, no time limit: waits for the call to end, then stops
    assert time.monotonic() - started < 10
    with pytest.raises(TimeoutError, match=r"timed out after 0\.2 s"):
        call.wait(timeout=0)


def test_self_call_copies_arguments(solo: None) -> None:
    data = [1, 2, 3]
    assert rpc.rpc_sync("solo", list.copy, args=(data,)) == data
    assert rpc.rpc_sync(0, len, args=(data,)) == 3
