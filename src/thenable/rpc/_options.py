"""Configuration of an RPC worker: backend options, worker identity, and the launchers' env."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from thenable._errors import type_name
from thenable.rpc._errors import DestinationTypeError, WorkerNameError

__all__ = (
    "DEFAULT_BUSY_POLL_US",
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_INIT_METHOD",
    "DEFAULT_MAX_SEND_QUEUE_BYTES",
    "DEFAULT_NUM_WORKER_THREADS",
    "DEFAULT_RPC_TIMEOUT_SEC",
    "RpcBackendOptions",
    "WorkerInfo",
    "check_worker_name",
    "destination_type_error",
    "resolve_auth_key",
    "resolve_rank_and_world_size",
)

DEFAULT_RPC_TIMEOUT_SEC = 60.0
"""``RpcBackendOptions.rpc_timeout``'s default: seconds a call may take before it fails."""
DEFAULT_INIT_METHOD = "env://"
"""``RpcBackendOptions.init_method``'s default: rank 0's address from ``MASTER_ADDR`` and
``MASTER_PORT``."""
DEFAULT_BUSY_POLL_US = 500
"""``RpcBackendOptions.busy_poll_us``'s default, in microseconds."""
DEFAULT_NUM_WORKER_THREADS = 16
"""``RpcBackendOptions.num_worker_threads``'s default: threads that run incoming calls (the
pool grows beyond it while handlers block)."""
# Room for a few large tensors waiting for a slow peer, not for an unbounded pile-up.
DEFAULT_MAX_SEND_QUEUE_BYTES = 256 << 20
"""``RpcBackendOptions.max_send_queue_bytes``'s default: 256 MiB per peer."""
# A frozen peer is declared unreachable after 3 heartbeats of silence: 30 s, half torch's
# default call timeout, and long enough for a peer stuck a while in one GIL-holding call.
DEFAULT_HEARTBEAT_S = 10.0
"""``RpcBackendOptions.heartbeat_s``'s default, in seconds."""
_AUTH_KEY_ENV = "THENABLE_AUTH_KEY"

_LOGGER = logging.getLogger("thenable.rpc")

# (rank variable, world size variable) of the launchers we understand, in order of preference.
_LAUNCHER_ENV = (
    ("RANK", "WORLD_SIZE"),  # torchrun, thenable launch
    ("SLURM_PROCID", "SLURM_NTASKS"),  # Slurm's srun
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),  # Open MPI's mpirun
    ("PMI_RANK", "PMI_SIZE"),  # MPICH / Intel MPI
)
LAUNCHER_VARIABLES: tuple[str, ...] = (
    *(name for pair in _LAUNCHER_ENV for name in pair),
    "MASTER_ADDR",  # env:// rendezvous (_rendezvous)
    "MASTER_PORT",
    "SLURM_JOB_ID",  # the rendezvous address under Slurm
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "TORCHELASTIC_USE_AGENT_STORE",  # torchrun's store (_store)
    "TORCHELASTIC_RESTART_COUNT",
    "THENABLE_AUTH_KEY",
)
"""Every environment variable that changes how ``init_rpc`` starts: the ones launchers set."""


_WORKER_NAME = re.compile(r"[A-Za-z0-9_:-]{1,127}")


def check_worker_name(name: object) -> None:
    """Accept the worker names torch accepts: 1 to 127 letters, digits, ``_``, ``-``, ``:``.

    ``init_rpc`` and ``WorkerInfo`` check their names with it.

    Raises:
        TypeError: ``name`` is not a string.
        WorkerNameError: it is empty, too long or has another character; the message has
            torch's words ("Worker name must match ...") too.
    """
    if not isinstance(name, str):
        raise TypeError(f"a worker name must be a str, got {type(name).__qualname__}")
    _check_name_text(name)


def _check_name_text(name: str) -> None:
    if _WORKER_NAME.fullmatch(name) is None:
        raise WorkerNameError(
            f"invalid worker name {name!r}: it must be 1 to 127 characters, each a letter, a "
            "digit, '_', '-' or ':' (torch: Worker name must match ^[A-Za-z0-9-_:]*$, and must "
            "be non-empty and shorter than 128 chars)"
        )


class WorkerInfo:
    """A worker's name and id (its rank), as ``get_worker_info`` returns it.

    As torch's: read-only ``name`` and ``id``, equal when both are, hashed by ``id``, not
    ordered, and usable as the destination of a call.

    Raises:
        TypeError: ``name`` is not a str, or ``id`` not an int.
        WorkerNameError: ``name`` is not a valid worker name (see ``check_worker_name``).
    """

    __slots__ = ("_id", "_name")

    def __init__(self, name: str, id: int) -> None:  # (torch's parameter names)
        if not isinstance(name, str):
            raise TypeError(f"WorkerInfo name must be a str, got {type(name).__qualname__}")
        if isinstance(id, bool) or not isinstance(id, int):
            raise TypeError(f"WorkerInfo id must be an int, got {type(id).__qualname__}")
        _check_name_text(name)
        self._name = name
        self._id = id

    @property
    def name(self) -> str:
        """The worker's name."""
        return self._name

    @property
    def id(self) -> int:
        """The worker's rank."""
        return self._id

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WorkerInfo):
            return NotImplemented
        return self._id == other._id and self._name == other._name

    def __hash__(self) -> int:
        return hash(self._id)

    def __repr__(self) -> str:
        return f"WorkerInfo(id={self._id}, name={self._name})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (WorkerInfo, (self._name, self._id))


def destination_type_error(to: object) -> DestinationTypeError:
    """The error for a call's destination that is not a worker name, rank or WorkerInfo."""
    shown = "None" if to is None else f"{to!r} ({type_name(to)})"
    return DestinationTypeError(
        f"cannot get a WorkerInfo from {shown}: the destination must be a worker name (str), "
        "rank (int) or WorkerInfo"
    )


@dataclasses.dataclass
class RpcBackendOptions:
    """Options of ``init_rpc``, named as torch's ``TensorPipeRpcBackendOptions``.

    Attributes:
        init_method: ``"env://"`` (``MASTER_ADDR``/``MASTER_PORT``) or ``"tcp://host:port"``,
            where rank 0 listens and every worker finds the others.
        rpc_timeout: default seconds a call may take before it fails with TimeoutError;
            0 means no limit.  Also bounds ``init_rpc``'s wait for the other workers.
        num_worker_threads: threads that run incoming calls; the pool grows beyond this while
            handlers block in nested calls, so nested calls cannot deadlock.
        auth_key: shared secret the workers prove to each other before any data is unpickled;
            default ``THENABLE_AUTH_KEY`` from the environment; ``None`` there too means no
            authentication (as in torch).
        max_message_bytes: the largest message this worker accepts.
        same_host_ipc: workers on one host talk over Unix-domain sockets and pass payloads of
            256 KiB or more through shared memory (Linux; see ``thenable.rpc._net.shm``); False
            makes them use TCP like workers on other hosts.
        busy_poll_us: after a frame arrives, how long (microseconds) a connection's reader
            may poll for the next one before it sleeps, if its recent waits were that short
            too.  Polling keeps the CPU awake; waking a sleeping one costs tens of
            microseconds on a virtual machine, more than a whole no-op call.  Connections
            whose messages come further apart poll once in 16 waits, and an idle process uses
            no CPU.  0: never poll.
        max_send_queue_bytes: how many bytes may wait, per peer, for a peer that does not
            read (frozen, overloaded) before new calls to it fail at once with
            ``SendQueueFullError`` instead of queueing more (a single larger message is still
            taken when nothing waits).  Sending never blocks the caller: what the socket does
            not take waits in this queue, written by the connection's own thread.
        heartbeat_s: how often (seconds) a connection that has heard nothing from its peer
            for that long asks it for a sign of life; a peer that stays silent (frozen, or on a
            host that vanished without a reset) is declared unreachable after three to three
            and a half times as long, and every call waiting on it fails with
            ``RpcConnectionError``.  0: no heartbeat (a
            frozen peer is then noticed only by each call's own timeout).
        device_maps: accepted for compatibility with torch; CUDA tensors are not sent yet,
            so it must stay empty.
        devices: accepted for compatibility with torch; it must stay empty, as
            ``device_maps``.
        _transports: torch's TensorPipe transports, accepted so that torch scripts run
            unchanged.  A list without ``"shm"`` or ``"ibv"`` (``["uv"]``: TCP only) makes
            the workers use TCP, as ``same_host_ipc=False`` does; ``"uv"`` and ``"shm"`` are
            what thenable has anyway.  Other names (``"ibv"``: InfiniBand) are ignored, with
            one log line on the ``thenable.rpc`` logger.
        _channels: torch's TensorPipe channels (``["basic"]``, ``["cma"]``...): ignored,
            with that log line; thenable has none (payloads travel in its own frames, through
            shared memory between workers on one host).
    """

    init_method: str = DEFAULT_INIT_METHOD
    rpc_timeout: float = DEFAULT_RPC_TIMEOUT_SEC
    num_worker_threads: int = DEFAULT_NUM_WORKER_THREADS
    auth_key: bytes | str | None = None
    max_message_bytes: int = 1 << 30
    same_host_ipc: bool = True
    busy_poll_us: int = DEFAULT_BUSY_POLL_US
    max_send_queue_bytes: int = DEFAULT_MAX_SEND_QUEUE_BYTES
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    device_maps: dict[str, Any] = dataclasses.field(default_factory=dict)
    devices: list[Any] = dataclasses.field(default_factory=list)
    _transports: list[str] | None = None
    _channels: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.init_method, str) or not self.init_method.startswith(
            ("env://", "tcp://")
        ):
            raise ValueError(
                f"init_method must be 'env://' or 'tcp://host:port', got {self.init_method!r}"
            )
        if isinstance(self.rpc_timeout, bool) or not isinstance(self.rpc_timeout, (int, float)):
            raise TypeError(f"rpc_timeout must be seconds, got {self.rpc_timeout!r}")
        if self.rpc_timeout < 0:
            raise ValueError(f"rpc_timeout must be >= 0 (0: no limit), got {self.rpc_timeout}")
        if isinstance(self.num_worker_threads, bool) or not isinstance(
            self.num_worker_threads, int
        ):
            raise TypeError(f"num_worker_threads must be an int, got {self.num_worker_threads!r}")
        if self.num_worker_threads < 1:
            raise ValueError(f"num_worker_threads must be >= 1, got {self.num_worker_threads}")
        if self.auth_key is not None and not isinstance(self.auth_key, (bytes, str)):
            raise TypeError(f"auth_key must be bytes or str, got {type(self.auth_key).__name__}")
        if not isinstance(self.same_host_ipc, bool):
            raise TypeError(f"same_host_ipc must be True or False, got {self.same_host_ipc!r}")
        if isinstance(self.busy_poll_us, bool) or not isinstance(self.busy_poll_us, int):
            raise TypeError(
                f"busy_poll_us must be an int (microseconds), got {self.busy_poll_us!r}"
            )
        if not 0 <= self.busy_poll_us <= 1_000_000:
            raise ValueError(
                f"busy_poll_us must be between 0 (never poll) and 1000000, got {self.busy_poll_us}"
            )
        if isinstance(self.max_send_queue_bytes, bool) or not isinstance(
            self.max_send_queue_bytes, int
        ):
            raise TypeError(
                f"max_send_queue_bytes must be an int (bytes), got {self.max_send_queue_bytes!r}"
            )
        if self.max_send_queue_bytes < 1 << 20:
            raise ValueError(
                "max_send_queue_bytes must be at least 1 MiB (1048576), got "
                f"{self.max_send_queue_bytes}"
            )
        if isinstance(self.heartbeat_s, bool) or not isinstance(self.heartbeat_s, (int, float)):
            raise TypeError(f"heartbeat_s must be seconds, got {self.heartbeat_s!r}")
        if not (self.heartbeat_s == 0 or 0.1 <= self.heartbeat_s <= 3600):
            raise ValueError(
                f"heartbeat_s must be 0 (no heartbeat) or between 0.1 and 3600 seconds, got "
                f"{self.heartbeat_s}"
            )
        if self.device_maps or self.devices:
            raise NotImplementedError(
                "device_maps/devices: sending CUDA tensors over RPC is not supported yet; move "
                "tensors to CPU before sending them"
            )
        self._apply_tensorpipe_options()

    def _apply_tensorpipe_options(self) -> None:
        """torch's ``_transports``/``_channels``: map what means something here, and log what
        is ignored (in one line)."""
        transports = _names_or_none(self._transports, "_transports")
        channels = _names_or_none(self._channels, "_channels")
        ignored = []
        if transports is not None:
            if not {"shm", "ibv"} & set(transports):
                self.same_host_ipc = False  # TCP only, as torch's transports say
            others = [name for name in transports if name not in _TRANSPORTS_KEPT]
            if others:
                ignored.append(
                    f"_transports {others!r} (thenable's are TCP, torch's 'uv', and same-host "
                    "shared memory, torch's 'shm')"
                )
        if channels is not None:
            ignored.append(
                f"_channels={channels!r} (thenable has no TensorPipe channels: payloads travel "
                "in its own frames)"
            )
        if ignored:
            _LOGGER.info("RpcBackendOptions: ignored %s", "; ".join(ignored))


# torch's TensorPipe transports that thenable has: TCP and same-host shared memory.
_TRANSPORTS_KEPT = frozenset({"uv", "shm"})


def _names_or_none(value: object, option: str) -> list[str] | None:
    """A list of TensorPipe names (``_transports``, ``_channels``), or None."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{option} must be a list of str (or None), got {value!r}")
    return list(value)


def resolve_auth_key(options: RpcBackendOptions, env: Mapping[str, str]) -> bytes | None:
    """The key from the options, else from ``THENABLE_AUTH_KEY``, else None."""
    key = options.auth_key if options.auth_key is not None else env.get(_AUTH_KEY_ENV) or None
    if isinstance(key, str):
        key = key.encode()
    if key is not None and not key:
        raise ValueError("auth_key is empty; give a non-empty secret or None")
    return key


def resolve_rank_and_world_size(
    rank: int, world_size: int | None, env: Mapping[str, str] = os.environ
) -> tuple[int, int]:
    """Rank and world size from the arguments, else from a launcher's environment variables.

    Raises:
        ValueError: neither the arguments nor the environment give them, or they are invalid.
    """
    for rank_var, size_var in _LAUNCHER_ENV:
        if rank_var in env and size_var in env:
            if rank < 0:
                rank = _int_env(env, rank_var)
            if world_size is None:
                world_size = _int_env(env, size_var)
            break
    if rank < 0 or world_size is None:
        raise ValueError(
            "init_rpc needs rank and world_size: pass them, or run under a launcher that sets "
            "RANK/WORLD_SIZE (thenable launch, torchrun), SLURM_PROCID/SLURM_NTASKS or "
            "OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE"
        )
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    return rank, world_size


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None
