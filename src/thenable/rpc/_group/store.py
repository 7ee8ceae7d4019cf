"""Joining the group through a torch c10d store, when one already serves the master port.

Under torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``) the launcher's agent serves a TCPStore on
``MASTER_PORT``, and in a program that called ``torch.distributed.init_process_group`` with
``env://`` rank 0 serves one there: rank 0 cannot listen on that port itself.  There, as torch's
own ``init_rpc`` does, every worker joins through that store instead: it publishes its address
under a key of its rank and reads the others', and rank 0 listens on an ephemeral port like the
rest.  Everything after the join (the connections, the shutdown barrier at rank 0) is the same.

The store is unauthenticated, as torch's is: a forged address in it leads to a connection that
fails the workers' HMAC handshake, never to unpickling.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import itertools
import json
import sys
import time
from collections.abc import Mapping
from typing import Any

from thenable.rpc._errors import RendezvousError, RpcTimeoutError, WorkerNameError
from thenable.rpc._worker.agent import WorkerAddress

__all__ = ("StoreRendezvous", "store_rendezvous")

# init_rpc calls in this process: every worker of a job makes the same sequence of them, so the
# count keeps the keys of successive groups on one store apart (torch counts likewise).
_GENERATIONS = itertools.count()


def store_rendezvous(
    init_method: str, env: Mapping[str, str], master: tuple[str, int], rank: int
) -> StoreRendezvous | None:
    """The store to join through (see the module docstring), or None to join through rank 0.

    Only for ``env://``; torch must be installed (it is, where either case arises).
    """
    if not init_method.startswith("env://"):
        return None
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return StoreRendezvous(master, server=False, env=env)
    distributed = sys.modules.get("torch.distributed")
    initialized = getattr(distributed, "is_initialized", None)
    if initialized is not None and distributed.is_available() and initialized():  # type: ignore[union-attr]
        return StoreRendezvous(master, server=rank == 0, env=env)
    return None


class StoreRendezvous:
    """A join through a c10d TCPStore at the master address.

    Args:
        master: the store's (host, port).
        server: this process serves the store if no one in it does yet (a process group's
            rank 0: torch's multi-tenant store is shared within the process).
    """

    def __init__(self, master: tuple[str, int], *, server: bool, env: Mapping[str, str]) -> None:
        self.master = master
        self._server = server
        restarts = env.get("TORCHELASTIC_RESTART_COUNT", "0")
        self._prefix = f"thenable/rpc/{restarts}/{next(_GENERATIONS)}/"

    def join(
        self, me: WorkerAddress, world_size: int, deadline: float | None
    ) -> list[WorkerAddress]:
        """Publish ``me`` and return every worker's address, by rank.

        Raises:
            RpcTimeoutError: not all ranks published theirs in time (the message names them).
            WorkerNameError: two workers have the same name (every worker raises it).
            RendezvousError: a rank was published twice, or with another world size.
        """
        distributed: Any = importlib.import_module("torch.distributed")  # (see above)

        seconds = 0.0 if deadline is None else max(0.001, deadline - time.monotonic())
        timeout = datetime.timedelta(seconds=seconds or 365 * 24 * 3600)
        host, port = self.master
        store: Any = distributed.TCPStore(
            host, port, is_master=self._server, timeout=timeout, multi_tenant=True
        )
        mine = json.dumps({"worker": dataclasses.asdict(me), "world_size": world_size})
        store.set(f"{self._prefix}worker/{me.rank}", mine)
        keys = [f"{self._prefix}worker/{rank}" for rank in range(world_size)]
        try:
            store.wait(keys, timeout)
        except RuntimeError:  # torch's DistStoreError: the time ran out
            missing = [rank for rank, key in enumerate(keys) if not store.check([key])]
            raise RpcTimeoutError(
                f"init_rpc: rank(s) {missing} did not join within {seconds:g} s (through the "
                f"c10d store at {host}:{port})"
            ) from None
        workers = []
        for key in keys:
            entry = json.loads(store.get(key))
            if entry["world_size"] != world_size:
                worker = entry["worker"]
                raise RendezvousError(
                    f"worker {worker['name']!r} (rank {worker['rank']}) was started with "
                    f"world_size={entry['world_size']}, but this worker has {world_size}"
                )
            workers.append(WorkerAddress(**entry["worker"]))
        if workers[me.rank] != me:  # another process wrote its address under our rank
            raise RendezvousError(
                f"rank {me.rank} joined twice (as {workers[me.rank].name!r} and {me.name!r}); "
                "every worker needs its own rank"
            )
        _check_unique_names(workers)
        return workers


def _check_unique_names(workers: list[WorkerAddress]) -> None:
    seen: dict[str, int] = {}
    for worker in workers:
        if worker.name in seen:
            raise WorkerNameError(
                f"worker name {worker.name!r} is used by ranks {seen[worker.name]} and "
                f"{worker.rank}; names must be unique"
            )
        seen[worker.name] = worker.rank
