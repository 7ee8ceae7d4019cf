"""torch's ``torch.distributed.rpc.constants``: the defaults, under torch's names."""

from thenable.rpc._options import DEFAULT_INIT_METHOD as DEFAULT_INIT_METHOD
from thenable.rpc._options import DEFAULT_NUM_WORKER_THREADS as DEFAULT_NUM_WORKER_THREADS
from thenable.rpc._options import DEFAULT_RPC_TIMEOUT_SEC as DEFAULT_RPC_TIMEOUT_SEC
from thenable.rpc.api import UNSET_RPC_TIMEOUT as UNSET_RPC_TIMEOUT

DEFAULT_SHUTDOWN_TIMEOUT = 0
"""``shutdown()``'s default ``timeout``: no limit (``rpc.api``'s barrier has its own)."""

__all__ = (
    "DEFAULT_INIT_METHOD",
    "DEFAULT_NUM_WORKER_THREADS",
    "DEFAULT_RPC_TIMEOUT_SEC",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "UNSET_RPC_TIMEOUT",
)
