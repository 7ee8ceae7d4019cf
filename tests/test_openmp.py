"""``_openmp.settle``: one parked OpenMP team more, so torch's idle OpenMP workers spin briefly
(run in fresh interpreters: the team lives as long as its process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from thenable import _openmp  # noqa: E402 - after the skip

_PROBE = textwrap.dedent(
    """
    import json, os, sys, threading
    import torch
    from thenable import _openmp
    def tasks():
        return len(os.listdir("/proc/self/task"))
    before = tasks()
    first = _openmp.settle()
    after = tasks()
    again = _openmp.settle()
    names = [t.name for t in threading.enumerate()]
    print(json.dumps({"first": first, "again": again, "added": after - before,
                      "threads": torch.get_num_threads(), "names": names,
                      "gnu": _openmp._gnu_openmp_loaded()}))
    """
)


def _run(code: str, env: dict[str, str] | None = None) -> str:
    """``code``'s output in a fresh interpreter, with none of the user's OpenMP wait choices
    but those in ``env``."""
    environ = {k: v for k, v in os.environ.items() if k not in _openmp._USER_CHOICES}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environ, **(env or {})},
        check=True,
    )
    return done.stdout


def _probe(env: dict[str, str] | None = None) -> dict[str, object]:
    result: dict[str, object] = json.loads(_run(_PROBE, env).strip().splitlines()[-1])
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU OpenMP is Linux's")
def test_settle_parks_one_team_once() -> None:
    found = _probe({"OMP_NUM_THREADS": "2"})
    if not found["gnu"]:
        pytest.skip("this torch does not run on GNU OpenMP")
    assert found["first"] is True
    assert found["again"] is True  # (the same team: settle is idempotent)
    assert found["names"].count(_openmp.THREAD_NAME) == 1  # type: ignore[attr-defined]
    # The parked thread and its team's worker: libgomp now manages more threads than CPUs.
    assert found["added"] >= found["threads"]  # type: ignore[operator]


@pytest.mark.parametrize("choice", ["OMP_WAIT_POLICY", "GOMP_SPINCOUNT"])
def test_settle_leaves_a_users_choice_alone(choice: str) -> None:
    found = _probe({"OMP_NUM_THREADS": "2", choice: "PASSIVE" if "POLICY" in choice else "0"})
    assert found["first"] is False
    assert _openmp.THREAD_NAME not in found["names"]  # type: ignore[operator]


def test_settle_does_nothing_with_one_thread() -> None:
    found = _probe({"OMP_NUM_THREADS": "1"})
    assert found["first"] is False
    assert _openmp.THREAD_NAME not in found["names"]  # type: ignore[operator]


def test_settle_does_nothing_without_torch() -> None:
    code = (
        "import sys; from thenable import _openmp; print(_openmp.settle(), 'torch' in sys.modules)"
    )
    assert _run(code).split() == ["False", "False"]  # and it never imports torch


def test_init_rpc_settles_openmp() -> None:
    """A worker started with torch imported has the parked team."""
    code = textwrap.dedent(
        """
        import socket, threading, torch
        from thenable import _openmp, rpc
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
        options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}")
        rpc.init_rpc("w0", rank=0, world_size=1, rpc_backend_options=options)
        try:
            print([t.name for t in threading.enumerate()].count(_openmp.THREAD_NAME))
        finally:
            rpc.shutdown()
        """
    )
    found = _run(code, {"OMP_NUM_THREADS": "2"})
    assert found.split()[-1] == ("1" if _openmp._gnu_openmp_loaded() else "0")
