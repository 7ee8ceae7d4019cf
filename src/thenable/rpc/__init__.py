"""thenable.rpc: distributed RPC with RRefs, the counterpart of ``torch.distributed.rpc``.

Code written for torch runs after changing its import:

    from thenable import rpc      # was: from torch.distributed import rpc
"""

from thenable.rpc import _handlers
from thenable.rpc import api as api
from thenable.rpc import constants as constants
from thenable.rpc import functions as functions
from thenable.rpc._api import BackendType as BackendType
from thenable.rpc._api import _set_rpc_timeout as _set_rpc_timeout
from thenable.rpc._api import get_rpc_timeout as get_rpc_timeout
from thenable.rpc._api import get_stats as get_stats
from thenable.rpc._api import get_worker_info as get_worker_info
from thenable.rpc._api import init_rpc as init_rpc
from thenable.rpc._api import is_available as is_available
from thenable.rpc._api import remote as remote
from thenable.rpc._api import rpc_async as rpc_async
from thenable.rpc._api import rpc_sync as rpc_sync
from thenable.rpc._api import shutdown as shutdown
from thenable.rpc._errors import AsyncExecutionError as AsyncExecutionError
from thenable.rpc._errors import DestinationTypeError as DestinationTypeError
from thenable.rpc._errors import RemoteError as RemoteError
from thenable.rpc._errors import RendezvousError as RendezvousError
from thenable.rpc._errors import RpcConnectionError as RpcConnectionError
from thenable.rpc._errors import RpcError as RpcError
from thenable.rpc._errors import RpcTimeoutError as RpcTimeoutError
from thenable.rpc._errors import SendQueueFullError as SendQueueFullError
from thenable.rpc._errors import SerializationError as SerializationError
from thenable.rpc._errors import UnknownWorkerError as UnknownWorkerError
from thenable.rpc._errors import WorkerNameError as WorkerNameError
from thenable.rpc._options import RpcBackendOptions as RpcBackendOptions
from thenable.rpc._options import WorkerInfo as WorkerInfo
from thenable.rpc._rref import RRef as RRef
from thenable.rpc._wire.protocol import AuthenticationError as AuthenticationError
from thenable.rpc._wire.protocol import ProtocolError as ProtocolError
from thenable.rpc._wire.serialize import RemoteTraceback as RemoteTraceback
from thenable.rpc.api import RpcAgent as RpcAgent
from thenable.rpc.api import _get_current_rpc_agent as _get_current_rpc_agent
from thenable.rpc.api import _is_current_rpc_agent_set as _is_current_rpc_agent_set

TensorPipeRpcBackendOptions = RpcBackendOptions
"""torch's name for the options of its (only) backend: the same class as ``RpcBackendOptions``."""
PyRRef = RRef
"""torch's name for the RRef class its RRef type derives from (isinstance checks use it): the
same class as ``RRef``."""

__all__ = (
    "AsyncExecutionError",
    "AuthenticationError",
    "BackendType",
    "DestinationTypeError",
    "ProtocolError",
    "PyRRef",
    "RRef",
    "RemoteError",
    "RemoteTraceback",
    "RendezvousError",
    "RpcAgent",
    "RpcBackendOptions",
    "RpcConnectionError",
    "RpcError",
    "RpcTimeoutError",
    "SendQueueFullError",
    "SerializationError",
    "TensorPipeRpcBackendOptions",
    "UnknownWorkerError",
    "WorkerInfo",
    "WorkerNameError",
    "_get_current_rpc_agent",
    "_is_current_rpc_agent_set",
    "_set_rpc_timeout",
    "api",
    "constants",
    "functions",
    "get_rpc_timeout",
    "get_stats",
    "get_worker_info",
    "init_rpc",
    "is_available",
    "remote",
    "rpc_async",
    "rpc_sync",
    "shutdown",
)

_handlers.publish(__name__, globals(), __all__)  # exceptions travel as thenable.rpc.<Name>
