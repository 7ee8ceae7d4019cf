"""``thenable launch``: run a script as N local RPC workers, torchrun-style.

Each worker gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` and a
fresh ``THENABLE_AUTH_KEY`` (so the workers authenticate each other), and each line it prints is
prefixed with ``[rank]``.  If a worker fails, the others are stopped and the launcher exits with
that worker's code; Ctrl-C or SIGTERM stops them all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

__all__ = ("main",)

# How long a stopped worker gets to exit after SIGTERM before it is killed.
_TERMINATE_GRACE_S = 5.0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``thenable`` command; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="thenable", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    launch = commands.add_parser("launch", help="run a script as N local RPC workers")
    launch.add_argument("-n", "--nproc", type=int, required=True, help="number of workers")
    launch.add_argument("--master-addr", default="127.0.0.1", help="rank 0's address")
    launch.add_argument("--master-port", type=int, default=0, help="rank 0's port (0: a free one)")
    launch.add_argument("script", help="the Python script each worker runs")
    launch.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    options = parser.parse_args(argv)
    if options.nproc < 1:
        parser.error(f"-n must be >= 1, got {options.nproc}")
    if not os.path.isfile(options.script):
        parser.error(f"script not found: {options.script}")
    port = options.master_port or _free_port(options.master_addr)
    return launch_workers(
        options.nproc, options.script, options.args, master_addr=options.master_addr, port=port
    )


def launch_workers(
    nproc: int, script: str, args: Sequence[str], *, master_addr: str, port: int
) -> int:
    """Start ``nproc`` workers of ``script`` and supervise them; return the exit code."""
    key = os.environ.get("THENABLE_AUTH_KEY") or secrets.token_hex(32)
    workers: list[subprocess.Popen[bytes]] = []
    pumps: list[threading.Thread] = []
    output_lock = threading.Lock()
    for rank in range(nproc):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(port),
            THENABLE_AUTH_KEY=key,
            PYTHONUNBUFFERED="1",
        )
        worker = subprocess.Popen(
            [sys.executable, script, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        workers.append(worker)
        assert worker.stdout is not None
        pump = threading.Thread(
            target=_pump, args=(worker.stdout, f"[{rank}] ", output_lock), daemon=True
        )
        pump.start()
        pumps.append(pump)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = _supervise(workers)
    except KeyboardInterrupt:
        _stop(workers)
        code = 128 + signal.SIGINT
    except _Terminated:
        _stop(workers)
        code = 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    for pump in pumps:
        pump.join(timeout=_TERMINATE_GRACE_S)
    return code


class _Terminated(Exception):
    """The launcher got SIGTERM: stop the workers, then exit."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _supervise(workers: list[subprocess.Popen[bytes]]) -> int:
    """Wait for every worker; on the first failure stop the rest and return its code."""
    running = list(workers)
    while running:
        for worker in list(running):
            code = worker.poll()
            if code is None:
                continue
            running.remove(worker)
            if code != 0:
                rank = workers.index(worker)
                print(
                    f"thenable launch: worker {rank} exited with code {code}; stopping the others",
                    file=sys.stderr,
                )
                _stop(running)
                return code if code > 0 else 128 - code
        if running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                running[0].wait(timeout=0.05)
    return 0


def _stop(workers: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every worker still running, then SIGKILL what outlives the grace period."""
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    deadline = time.monotonic() + _TERMINATE_GRACE_S
    for worker in workers:
        try:
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _pump(stream: IO[bytes], prefix: str, lock: threading.Lock) -> None:
    """Copy a worker's output to ours, line by line, each line prefixed with its rank."""
    out = sys.stdout.buffer
    encoded = prefix.encode()
    for line in iter(stream.readline, b""):
        with lock:
            out.write(encoded + line if line.endswith(b"\n") else encoded + line + b"\n")
            out.flush()
    stream.close()


def _free_port(host: str) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


if __name__ == "__main__":
    sys.exit(main())
