"""thenable.rpc: distributed RPC with RRefs, the counterpart of ``torch.distributed.rpc``.

Code written for torch runs after changing its import::

    from thenable import rpc      # was: from torch.distributed import rpc
"""

from thenable.rpc import functions as functions
from thenable.rpc._api import BackendType as BackendType
from thenable.rpc._api import get_worker_info as get_worker_info
from thenable.rpc._api import init_rpc as init_rpc
from thenable.rpc._api import remote as remote
from thenable.rpc._api import rpc_async as rpc_async
from thenable.rpc._api import rpc_sync as rpc_sync
from thenable.rpc._api import shutdown as shutdown
from thenable.rpc._options import RpcBackendOptions as RpcBackendOptions
from thenable.rpc._options import WorkerInfo as WorkerInfo
from thenable.rpc._protocol import AuthenticationError as AuthenticationError
from thenable.rpc._protocol import ProtocolError as ProtocolError
from thenable.rpc._rref import RRef as RRef
from thenable.rpc._serialize import RemoteError as RemoteError
from thenable.rpc._serialize import RemoteTraceback as RemoteTraceback
from thenable.rpc._serialize import SerializationError as SerializationError

# torch's name for the options of its (only) backend.
TensorPipeRpcBackendOptions = RpcBackendOptions

__all__ = (
    "AuthenticationError",
    "BackendType",
    "ProtocolError",
    "RRef",
    "RemoteError",
    "RemoteTraceback",
    "RpcBackendOptions",
    "SerializationError",
    "TensorPipeRpcBackendOptions",
    "WorkerInfo",
    "functions",
    "get_worker_info",
    "init_rpc",
    "remote",
    "rpc_async",
    "rpc_sync",
    "shutdown",
)
