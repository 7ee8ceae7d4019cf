"""``python -m thenable launch``: the seed example, output prefixes, the workers' environment,
a failing worker, and Ctrl-C.

Every launcher runs in a session of its own; whatever is left of it (the launcher or any of its
workers) is killed at the end of each test.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _harness import without_launcher_variables

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 60.0


class Launcher:
    """One ``thenable launch`` process, its output read line by line by a thread."""

    def __init__(self, nproc: int, script: Path, *args: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "thenable", "launch", "-n", str(nproc), str(script), *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: the finalizer kills all of it
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="launcher-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout: float = LAUNCH_TIMEOUT_S) -> str:
        line = self.lines.get(timeout=timeout)
        assert line is not None, "the launcher's output ended"
        return line

    def finish(self, timeout: float = LAUNCH_TIMEOUT_S) -> tuple[int, list[str], str]:
        """Wait for the launcher to exit: (exit code, remaining stdout lines, stderr)."""
        assert self.process.stderr is not None
        code = self.process.wait(timeout)
        stderr = self.process.stderr.read()
        self._reader.join(timeout)
        assert not self._reader.is_alive()
        rest: list[str] = []
        while (line := self.lines.get_nowait()) is not None:
            rest.append(line)
        return code, rest, stderr

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # the launcher and its workers
        self.process.wait(10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        self._reader.join(10)


@pytest.fixture
def launch() -> Iterator[type[Launcher]]:
    launchers: list[Launcher] = []

    class Tracked(Launcher):
        def __init__(self, nproc: int, script: Path, *args: str, env: dict[str, str]) -> None:
            super().__init__(nproc, script, *args, env=env)
            launchers.append(self)

    yield Tracked
    for launcher in launchers:
        launcher.kill()


@pytest.fixture
def env() -> dict[str, str]:
    """This environment without the variables the launcher sets."""
    return without_launcher_variables(os.environ)


def _script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "worker_script.py"
    path.write_text(textwrap.dedent(text))
    return path


def _assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


EXAMPLE_LINES = [
    "async_add_chained: {three}",
    "static_async_add: {four}",
    "class_async_add: {four}",
    "rref.rpc_sync(): {four}",
    "rref.rpc_async(): {four}",
    "rref.remote(): {four}",
    "bound method: {four}",
]


def without_torch(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """``env`` in which ``import torch`` fails, as on a machine without torch."""
    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked for this test')\n")
    paths = [str(blocker), env.get("PYTHONPATH", "")]
    return dict(env, PYTHONPATH=os.pathsep.join(p for p in paths if p))


@pytest.mark.parametrize(
    ("torch", "three", "four"),
    [(True, "tensor([3., 3.])", "tensor([4., 4.])"), (False, "[3. 3.]", "[4. 4.]")],
    ids=["torch", "numpy"],
)
def test_async_execution_example_prints_the_documented_values(
    launch: type[Launcher],
    env: dict[str, str],
    tmp_path: Path,
    torch: bool,
    three: str,
    four: str,
) -> None:
    """With torch the values are tensors, as in torch's documentation; without, numpy arrays."""
    pytest.importorskip("numpy")
    if torch:
        pytest.importorskip("torch")
    else:
        env = without_torch(env, tmp_path)
    launcher = launch(3, ROOT / "examples" / "async_execution.py", env=env)
    code, lines, stderr = launcher.finish(120.0)
    assert code == 0, stderr
    assert lines == [f"[0] {line.format(three=three, four=four)}" for line in EXAMPLE_LINES]


@pytest.mark.parametrize("preset_key", [None, "key-from-the-environment"])
def test_output_is_prefixed_and_workers_get_their_environment(
    launch: type[Launcher], env: dict[str, str], tmp_path: Path, preset_key: str | None
) -> None:
    script = _script(
        tmp_path,
        """
        import json, os, sys
        print("hello from", os.environ["RANK"], sys.argv[1:])
        names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "THENABLE_AUTH_KEY"]
        print(json.dumps({name: os.environ.get(name) for name in names}))
        sys.stdout.write("no newline at the end")
        """,
    )
    if preset_key is not None:
        env["THENABLE_AUTH_KEY"] = preset_key
    code, lines, stderr = launch(3, script, "--flag", "value", env=env).finish()
    assert code == 0, stderr
    assert len(lines) == 9, lines
    seen: dict[int, dict[str, str]] = {}
    for line in lines:
        match = re.fullmatch(r"\[(\d)\] (.*)", line)
        assert match, line
        rank, text = int(match[1]), match[2]
        if text.startswith("{"):
            seen[rank] = json.loads(text)
        else:
            assert text in (f"hello from {rank} ['--flag', 'value']", "no newline at the end")
    assert sorted(seen) == [0, 1, 2]
    ports = {info["MASTER_PORT"] for info in seen.values()}
    keys = {info["THENABLE_AUTH_KEY"] for info in seen.values()}
    assert len(ports) == 1 and 0 < int(ports.pop()) < 65536
    assert len(keys) == 1
    key = keys.pop()
    if preset_key is None:
        assert re.fullmatch(r"[0-9a-f]{64}", key), key  # a fresh random key
    else:
        assert key == preset_key
    for rank, info in seen.items():
        assert info["RANK"] == info["LOCAL_RANK"] == str(rank)
        assert info["WORLD_SIZE"] == "3"
        assert info["MASTER_ADDR"] == "127.0.0.1"


def test_failing_worker_stops_the_others(
    launch: type[Launcher], env: dict[str, str], tmp_path: Path
) -> None:
    """Worker 1 exits with code 3 once worker 0 is up; worker 0 would block forever."""
    fifo = tmp_path / "ready"
    os.mkfifo(fifo)
    script = _script(
        tmp_path,
        """
        import os, sys, threading
        if os.environ["RANK"] == "0":
            print("pid", os.getpid(), flush=True)
            with open(sys.argv[1], "w") as ready:  # opens once worker 1 opens it to read
                ready.write("up")
            threading.Event().wait()  # forever
        else:
            with open(sys.argv[1]) as ready:
                ready.read()
            sys.exit(3)
        """,
    )
    start = time.monotonic()
    launcher = launch(2, script, str(fifo), env=env)
    first = launcher.next_line()
    match = re.fullmatch(r"\[0\] pid (\d+)", first)
    assert match, first
    code, lines, stderr = launcher.finish()
    assert code == 3, (lines, stderr)
    assert "worker 1 exited with code 3; stopping the others" in stderr
    assert lines == []
    _assert_gone(int(match[1]))
    assert time.monotonic() - start < 30.0  # stopped, not waited for


def test_sigint_stops_all_workers(
    launch: type[Launcher], env: dict[str, str], tmp_path: Path
) -> None:
    script = _script(
        tmp_path,
        """
        import os, threading
        print("ready", os.getpid(), flush=True)
        threading.Event().wait()  # forever
        """,
    )
    launcher = launch(2, script, env=env)
    pids = {}
    for _ in range(2):
        line = launcher.next_line()
        match = re.fullmatch(r"\[(\d)\] ready (\d+)", line)
        assert match, line
        pids[int(match[1])] = int(match[2])
    assert sorted(pids) == [0, 1]
    launcher.process.send_signal(signal.SIGINT)
    code, lines, stderr = launcher.finish()
    assert code == 128 + signal.SIGINT, (lines, stderr)
    for pid in pids.values():
        _assert_gone(pid)
