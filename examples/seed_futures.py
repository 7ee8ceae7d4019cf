"""The torch.futures and torch.jit.fork/wait documentation examples, run on thenable.

Each block is the example from PyTorch's pages with only the import changed
(``torch.futures`` -> ``thenable.futures``, ``torch.jit.fork/wait`` -> ``thenable.fork/wait``);
the comments give what the documentation says it prints.  With torch installed the values are
tensors, as in the documentation; without it, plain Python lists stand in for them.

Run:  python examples/seed_futures.py
"""

from __future__ import annotations

import threading
import time
from typing import Any

import thenable
import thenable.futures

try:
    import torch
except ImportError:  # the examples run on plain Python values too
    torch = None


def ones_times_3() -> Any:
    return torch.ones(2) * 3 if torch is not None else [3.0, 3.0]


def set_result_example() -> None:
    print("== Future.set_result (a value set from another thread)")

    def slow_set_future(fut: thenable.futures.Future[Any], value: Any) -> None:
        time.sleep(0.5)
        fut.set_result(value)

    fut: thenable.futures.Future[Any] = thenable.futures.Future()
    t = threading.Thread(target=slow_set_future, args=(fut, ones_times_3()))
    t.start()
    print(fut.wait())  # tensor([3., 3.])
    t.join()


def then_example() -> None:
    print("== Future.then (chained callbacks)")

    def callback(fut: thenable.futures.Future[int]) -> None:
        print(f"RPC return value is {fut.wait()}.")

    fut: thenable.futures.Future[int] = thenable.futures.Future()
    cb_fut = fut.then(callback)
    chain_cb_fut = cb_fut.then(lambda x: print(f"Chained cb done. {x.wait()}"))
    fut.set_result(5)
    # RPC return value is 5.
    # Chained cb done. None
    chain_cb_fut.wait()


def add_done_callback_example() -> None:
    print("== Future.add_done_callback")

    def callback(fut: thenable.futures.Future[int]) -> None:
        print("This will run after the future has finished.")
        print(fut.wait())

    fut: thenable.futures.Future[int] = thenable.futures.Future()
    fut.add_done_callback(callback)
    fut.set_result(5)
    # This will run after the future has finished.
    # 5


def set_exception_example() -> None:
    print("== Future.set_exception")
    fut: thenable.futures.Future[int] = thenable.futures.Future()
    fut.set_exception(ValueError("foo"))
    try:
        fut.wait()
    except ValueError as exc:
        print(f"ValueError: {exc}")  # ValueError: foo


def collect_all_example() -> None:
    print("== collect_all")
    fut0: thenable.futures.Future[int] = thenable.futures.Future()
    fut1: thenable.futures.Future[int] = thenable.futures.Future()
    fut = thenable.futures.collect_all([fut0, fut1])
    fut0.set_result(0)
    fut1.set_result(1)
    fut_list = fut.wait()
    print(f"fut0 result = {fut_list[0].wait()}")  # fut0 result = 0
    print(f"fut1 result = {fut_list[1].wait()}")  # fut1 result = 1


def wait_all_example() -> None:
    print("== wait_all (returns the values; exits early on the first error)")
    futures = [thenable.fork(lambda i=i: i * i) for i in range(5)]
    print(thenable.futures.wait_all(futures))  # [0, 1, 4, 9, 16]


def fork_free_function_example() -> None:
    print("== fork / wait: a free function")

    def foo(a: Any, b: int) -> Any:
        return a + b

    def bar(a: Any) -> Any:
        fut = thenable.fork(foo, a, b=2)
        return thenable.wait(fut)

    value = torch.tensor(2) if torch is not None else 2
    print(bar(value))  # tensor(4)


def fork_module_example() -> None:
    print("== fork / wait: a module (any callable object)")
    if torch is None:
        print("(torch not installed: skipping the nn.Module example)")
        return

    class AddMod(torch.nn.Module):
        def forward(self, a: Any, b: int) -> Any:
            return a + b

    class Mod(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mod = AddMod()

        def forward(self, input: Any) -> Any:
            fut = thenable.fork(self.mod, input, b=2)
            return thenable.wait(fut)

    print(Mod()(torch.tensor(2)))  # tensor(4)


def fork_parallel_example() -> None:
    print("== fork really runs in parallel (torch.jit.fork in eager mode does not)")
    start = time.perf_counter()
    futures = [thenable.fork(time.sleep, 0.2) for _ in range(4)]
    thenable.futures.wait_all(futures)
    elapsed = time.perf_counter() - start
    print(f"4 x sleep(0.2) forked on {thenable.get_num_interop_threads()} threads: {elapsed:.2f} s")


def main() -> None:
    set_result_example()
    then_example()
    add_done_callback_example()
    set_exception_example()
    collect_all_example()
    wait_all_example()
    fork_free_function_example()
    fork_module_example()
    fork_parallel_example()


if __name__ == "__main__":
    main()
