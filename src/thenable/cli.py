"""``thenable launch``: run a script as N local RPC workers, torchrun-style; ``thenable trace``:
merge and draw timeline traces.

Each worker gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` and a
fresh ``THENABLE_AUTH_KEY`` (so the workers authenticate each other), and each line it prints is
prefixed with ``[rank]``.  If a worker fails, the others are stopped and the launcher exits with
that worker's code; Ctrl-C or SIGTERM stops them all.

``thenable trace merge DIR`` merges the part files that ``THENABLE_TRACE=DIR`` left (after a
crash, or a job that did not shut RPC down gracefully) into ``DIR/trace.json``;
``thenable trace plot TRACE.json -o PICTURE.png`` draws a merged trace (needs matplotlib).
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
    trace = commands.add_parser("trace", help="merge or draw timeline traces")
    actions = trace.add_subparsers(dest="action", required=True)
    merge = actions.add_parser("merge", help="merge the part files of THENABLE_TRACE=DIR")
    merge.add_argument("directory", help="the directory THENABLE_TRACE named")
    merge.add_argument("-o", "--output", help="the merged trace (default: DIR/trace.json)")
    plot = actions.add_parser("plot", help="draw a merged trace to a picture (matplotlib)")
    plot.add_argument("trace", help="a merged trace (JSON)")
    plot.add_argument("-o", "--output", required=True, help="the picture (.png, .svg...)")
    plot.add_argument("--title", default="", help="the picture's title")
    plot.add_argument("--last-ms", type=float, help="draw only the trace's last milliseconds")
    options = parser.parse_args(argv)
    if options.command == "trace":
        return _trace_command(parser, options)
    if options.nproc < 1:
        parser.error(f"-n must be >= 1, got {options.nproc}")
    if not os.path.isfile(options.script):
        parser.error(f"script not found: {options.script}")
    port = options.master_port or _free_port(options.master_addr)
    return launch_workers(
        options.nproc, options.script, options.args, master_addr=options.master_addr, port=port
    )


def _trace_command(parser: argparse.ArgumentParser, options: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from thenable._tracing import trace_file as _trace_file

    if options.action == "merge":
        directory = Path(options.directory)
        files = sorted(directory.glob("*.part.jsonl"))
        if not files:
            parser.error(f"no trace parts (*.part.jsonl) in {directory}")
        try:
            parts = [_trace_file.read_part(path) for path in files]
        except ValueError as exc:
            parser.error(str(exc))
        # Rank 0 first: its clock is the reference (then the other ranks, then non-workers).
        parts.sort(key=lambda p: (p["process"].get("rank") is None, p["process"].get("rank")))
        output = Path(options.output) if options.output else directory / "trace.json"
        _trace_file.write_trace(_trace_file.merge(parts), output)
        incomplete = [p["process"]["label"] for p in parts if not p["complete"]]
        print(f"merged {len(parts)} part(s) into {output}")
        if incomplete:
            print(f"(ended early, kept up to their last flush: {', '.join(incomplete)})")
        return 0
    from thenable._tracing.trace_plot import plot_trace

    try:
        trace = json.loads(Path(options.trace).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        parser.error(f"cannot read the trace {options.trace}: {exc}")
    plot_trace(trace, options.output, title=options.title, last_ms=options.last_ms)
    print(f"drew {options.trace} to {options.output}")
    return 0


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
