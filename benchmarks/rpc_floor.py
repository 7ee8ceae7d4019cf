#!/usr/bin/env python
"""The physical floor under bench_rpc.py's rows: two Python processes on this host, no framework.

- ping-pong: a small pickled message there and back between two processes over a Unix socket,
  with blocking ``sendall``/``recv`` and a pickle on each side (what any RPC must at least do);
- copy: one numpy copy of a payload into a preallocated buffer (the single copy that a
  shared-memory transfer cannot avoid).

bench_rpc.py measures these in every round, next to both backends, and prints each RPC row
also as a multiple of its floor.  Run alone, this prints the floor of this machine::

    python benchmarks/rpc_floor.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import statistics
import sys
import tempfile
import time

MIB = 1 << 20
MESSAGE = (1, "a")  # the small arguments of bench_rpc's no-op rows
_BUFSIZE = 65536


def _pong(path: str) -> None:
    """The other process: answer every message with its unpickled-and-repickled self."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        while True:
            data = sock.recv(_BUFSIZE)
            if not data:
                return
            sock.sendall(pickle.dumps(pickle.loads(data)))


def pingpong_s(round_trips: int = 2000, samples: int = 5) -> float:
    """Median over ``samples`` of the time of one round trip, in seconds.

    One message is in flight at a time and it is far smaller than the socket's buffer, so each
    ``recv`` returns one whole message.
    """
    with tempfile.TemporaryDirectory(prefix="rpc_floor_") as tmp:
        path = os.path.join(tmp, "s")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            listener.listen(1)
            child = mp.get_context("spawn").Process(target=_pong, args=(path,), daemon=True)
            child.start()
            try:
                listener.settimeout(60.0)
                conn, _ = listener.accept()
                with conn:
                    times = []
                    for sample in range(samples + 1):  # the first one warms up
                        t0 = time.perf_counter()
                        for _ in range(round_trips):
                            conn.sendall(pickle.dumps(MESSAGE))
                            if pickle.loads(conn.recv(_BUFSIZE)) != MESSAGE:
                                raise AssertionError("ping-pong: the message came back wrong")
                        if sample:
                            times.append((time.perf_counter() - t0) / round_trips)
            finally:
                child.join(10.0)
                if child.is_alive():
                    child.kill()
    return statistics.median(times)


def copy_gbps(nbytes: int, samples: int = 5) -> float:
    """Median bandwidth of one numpy copy of ``nbytes`` into a preallocated buffer, in GB/s."""
    import numpy as np

    source = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    target = np.empty_like(source)
    np.copyto(target, source)  # fault the pages in
    repeats = max(1, (64 * MIB) // nbytes)
    rates = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(repeats):
            np.copyto(target, source)
        rates.append(nbytes * repeats / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def measure() -> dict[str, float]:
    """The floor of every bench_rpc row, measured now."""
    return {
        "pingpong_s": pingpong_s(),
        "copy1_gbps": copy_gbps(MIB),
        "copy100_gbps": copy_gbps(100 * MIB),
    }


def main() -> int:
    floor = measure()
    print(f"ping-pong, a small pickled message, Unix socket: {floor['pingpong_s'] * 1e6:.1f} us")
    print(f"one copy of 1 MiB: {floor['copy1_gbps']:.2f} GB/s")
    print(f"one copy of 100 MiB: {floor['copy100_gbps']:.2f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
