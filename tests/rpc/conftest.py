"""Fixtures of the multi-process RPC tests (see _harness.py)."""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The workers are spawned processes that import the harness and the remote functions by module
# name: they find them through sys.path, which spawn copies from this process.  pytest's default
# import mode puts this directory there already; make it independent of the import mode.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from _harness import Group  # noqa: E402  (needs the sys.path entry above)

GroupFactory = Callable[..., Group]


@pytest.fixture
def make_group() -> Iterator[GroupFactory]:
    """``make_group(n, **kwargs)``: start a Group of n workers, killed at the end of the test.

    The test closes it (``group.close()``) to assert a clean exit; whatever is still running at
    the end of the test is killed here, and the test's own assertions decide its outcome.
    """
    groups: list[Group] = []

    def make(size: int, **kwargs: Any) -> Group:
        group = Group(size, **kwargs)
        groups.append(group)
        return group

    yield make
    for group in groups:
        group.terminate()
    for group in groups:
        for rank, process in enumerate(group.processes):
            assert not process.is_alive(), f"worker {rank} outlived its test"


@pytest.fixture(scope="module", autouse=True)
def no_worker_left_behind() -> Iterator[None]:
    """After each module (and its module-scoped groups): no worker process is still running."""
    yield
    left = multiprocessing.active_children()
    assert not left, f"worker processes left running: {left}"


def running_group(size: int, rpc_timeout: float = 30.0, **options: Any) -> Iterator[Group]:
    """A Group of ``size`` workers with RPC up (``options``: more ``init_worker`` arguments),
    for module-scoped fixtures: yields it, then shuts RPC down and asserts that every worker
    exits cleanly."""
    import _remote_fns as fns

    with Group(size) as group:
        group.init_all(fns.init_worker, rpc_timeout=rpc_timeout, **options)
        yield group
        group.call_all(fns.shutdown_if_running)
        group.close()


@pytest.fixture(scope="module")
def group(request: pytest.FixtureRequest) -> Iterator[Group]:
    """The module's group of workers with RPC up: ``GROUP_SIZE`` of them (3 if the module does
    not say), started with the module's ``GROUP_OPTIONS`` (``init_worker`` arguments)."""
    size = getattr(request.module, "GROUP_SIZE", 3)
    yield from running_group(size, **getattr(request.module, "GROUP_OPTIONS", {}))
