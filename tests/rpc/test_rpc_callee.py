"""What torch programs and tests rely on of the callee side: an exception raised by user code
is logged on the callee (once, naming the worker and the function) and raised on the caller;
``rref.remote().missing()`` raises AttributeError at the call; ``remote()`` of an
``@async_execution`` function that returns no Future fails in ``to_here`` with torch's words;
``RRef.backward`` of a value that is no tensor raises torch's RuntimeError."""

from __future__ import annotations

import _callee_fns as fns
import pytest
from _harness import Failure, Group

GROUP_SIZE = 2


@pytest.mark.parametrize("tag", ["sync", "async_execution", "remote"])
def test_an_exception_in_user_code_is_logged_once_on_the_callee(group: Group, tag: str) -> None:
    stderr = group.call(1, fns.stderr_while_called, tag)
    lines = [line for line in stderr.splitlines() if fns.EXPECTED in line]
    assert len(lines) == 1, stderr
    function = "async_fails" if tag == "async_execution" else "raise_value_error"
    assert "worker worker1 (rank 1)" in lines[0]
    assert f"{function}" in lines[0] and "ValueError" in lines[0]
    if tag != "remote":
        assert "called by worker0" in lines[0]


def _is_attribute_error(failure: Failure) -> None:
    assert "builtins.AttributeError" in failure.bases, failure.traceback
    assert "has no attribute 'non_exist'" in failure.message


def test_a_proxy_of_a_missing_method_raises_attribute_error(group: Group) -> None:
    out = group.call(0, fns.check_missing_methods)
    for owner in ("remote", "local"):
        for mode in ("sync", "async", "remote"):
            _is_attribute_error(out[f"{owner} {mode}"])
        assert out[f"{owner} method"] == "method"
        assert out[f"{owner} instance attribute"] == "instance"


def test_async_execution_returning_no_future_fails_with_torch_words(group: Group) -> None:
    out = group.call(0, fns.check_async_wrong_return_type)
    assert set(out) == {"sync", "async", "remote", "remote to self"}
    for failure in out.values():
        assert "builtins.RuntimeError" in failure.bases
        assert failure.message.startswith(
            "Functions decorated with @rpc.async_function must return a torch.futures.Future "
            "object, but got builtins.int"
        ), failure.message


def test_backward_of_an_rref_holding_no_tensor_raises_torch_error(group: Group) -> None:
    out = group.call(0, fns.check_backward_of_a_non_tensor)
    assert set(out) == {"local", "owned elsewhere", "owned here"}
    for failure in out.values():
        assert "builtins.RuntimeError" in failure.bases
        assert "RRef should contain a tensor for .backward()" in failure.message, failure.message


def test_async_execution_may_return_a_torch_future(group: Group) -> None:
    assert group.call(0, fns.check_async_torch_future) == [5, 6, 7, 8]


@pytest.mark.parametrize("owner", ["worker1", "worker0"])
def test_proxy_calls_waiting_for_their_value_run_concurrently(group: Group, owner: str) -> None:
    assert group.call(0, fns.check_proxy_calls_waiting_for_the_value_run_concurrently, owner)
