"""The ``rpc.functions.async_execution`` documentation examples, run on thenable.rpc.

Every example is PyTorch's, with only the import changed (``from torch.distributed import rpc``
-> ``from thenable import rpc``, ``torch.futures`` -> ``thenable.futures``).  Worker 0 makes the
calls; worker 1 runs the async functions, which call worker 2.  The comments give what the
documentation says each prints.  Without torch, numpy arrays (or plain floats) stand in for the
tensors and ``operator.add`` for ``torch.add``.

Run:  thenable launch -n 3 examples/async_execution.py
"""

from __future__ import annotations

import operator
import os
from typing import Any

import thenable.futures
from thenable import rpc

try:
    import torch

    add: Any = torch.add

    def ones(n: int) -> Any:
        return torch.ones(n)

except ImportError:  # the examples run without torch too
    torch = None
    add = operator.add
    try:
        import numpy as np

        def ones(n: int) -> Any:
            return np.ones(n)

    except ImportError:

        def ones(n: int) -> Any:
            return 1.0


@rpc.functions.async_execution
def async_add_chained(to: str, x: Any, y: Any, z: Any) -> thenable.futures.Future[Any]:
    # This function runs on "worker1" and returns immediately when the callback is installed
    # through the `then(cb)` API. In the mean time, the `rpc_async` to "worker2" can run
    # concurrently. When the return value of that `rpc_async` arrives at "worker1", "worker1"
    # will run the lambda function accordingly and set the value for the previously returned
    # `Future`, which will then trigger RPC to send the result back to "worker0".
    return rpc.rpc_async(to, add, args=(x, y)).then(lambda fut: fut.wait() + z)


class AsyncExecutionClass:
    @staticmethod
    @rpc.functions.async_execution
    def static_async_add(to: str, x: Any, y: Any, z: Any) -> thenable.futures.Future[Any]:
        return rpc.rpc_async(to, add, args=(x, y)).then(lambda fut: fut.wait() + z)

    @classmethod
    @rpc.functions.async_execution
    def class_async_add(cls, to: str, x: Any, y: Any, z: Any) -> thenable.futures.Future[Any]:
        ret_fut: thenable.futures.Future[Any] = thenable.futures.Future()
        rpc.rpc_async(to, add, args=(x, y)).then(lambda fut: ret_fut.set_result(fut.wait() + z))
        return ret_fut

    @rpc.functions.async_execution
    def bound_async_add(self, to: str, x: Any, y: Any, z: Any) -> thenable.futures.Future[Any]:
        return rpc.rpc_async(to, add, args=(x, y)).then(lambda fut: fut.wait() + z)


def run_examples() -> None:
    print(
        "async_add_chained:",
        rpc.rpc_sync("worker1", async_add_chained, args=("worker2", ones(2), 1, 1)),
    )  # prints tensor([3., 3.])

    print(
        "static_async_add:",
        rpc.rpc_sync(
            "worker1", AsyncExecutionClass.static_async_add, args=("worker2", ones(2), 1, 2)
        ),
    )  # prints tensor([4., 4.])

    print(
        "class_async_add:",
        rpc.rpc_sync(
            "worker1", AsyncExecutionClass.class_async_add, args=("worker2", ones(2), 1, 2)
        ),
    )  # prints tensor([4., 4.])

    rref = rpc.remote("worker1", AsyncExecutionClass)
    ret = rref.rpc_sync().static_async_add("worker2", ones(2), 1, 2)
    print("rref.rpc_sync():", ret)  # prints tensor([4., 4.])

    rref = rpc.remote("worker1", AsyncExecutionClass)
    ret = rref.rpc_async().static_async_add("worker2", ones(2), 1, 2).wait()
    print("rref.rpc_async():", ret)  # prints tensor([4., 4.])

    rref = rpc.remote("worker1", AsyncExecutionClass)
    ret = rref.remote().static_async_add("worker2", ones(2), 1, 2).to_here()
    print("rref.remote():", ret)  # prints tensor([4., 4.])

    ret = rref.rpc_sync().bound_async_add("worker2", ones(2), 1, 2)
    print("bound method:", ret)  # prints tensor([4., 4.])


def main() -> None:
    rank = int(os.environ["RANK"])
    rpc.init_rpc(f"worker{rank}")  # rank, world size and rank 0's address from the launcher
    if rank == 0:
        run_examples()
    rpc.shutdown()  # waits until every worker has finished its outstanding work


if __name__ == "__main__":
    main()
