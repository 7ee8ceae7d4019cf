"""Names on the wire are stable: internal handlers, rebuild functions and classes travel under
pinned names (``_handlers.WIRE_NAMES``), public classes under their public path, never under a
private module's path (moving a file would change the protocol)."""

from __future__ import annotations

import importlib
import pickle
import re

import _wire_fns as fns
import pytest
from _harness import Group

import thenable.autograd
import thenable.rpc
from thenable.rpc import _handlers


@pytest.mark.parametrize("name", sorted(_handlers.WIRE_NAMES))
def test_each_wire_name_is_pinned_where_it_lives_and_round_trips(name: str) -> None:
    module_name, attribute = _handlers.WIRE_NAMES[name].split(":")
    obj = getattr(importlib.import_module(module_name), attribute)
    assert (obj.__module__, obj.__qualname__) == ("thenable.rpc._handlers", name)
    wire = pickle.dumps(obj)
    assert b"thenable.rpc._handlers" in wire and module_name.encode() not in wire
    assert pickle.loads(wire) is obj


def test_an_unpinned_location_and_an_unknown_name_are_clear_errors() -> None:
    def stray() -> None: ...

    stray.__module__ = "thenable.rpc._nowhere"
    with pytest.raises(LookupError, match=r"has no wire name: add it to .*WIRE_NAMES"):
        _handlers.pinned(stray)
    assert stray.__module__ == "thenable.rpc._nowhere"
    copy_elsewhere = type("Copy", (), {"__module__": "m"})  # a module loaded under its own name
    assert _handlers.pinned(copy_elsewhere).__module__ == "m"
    with pytest.raises(AttributeError, match="no internal RPC object has that wire name"):
        _handlers.__getattr__("no_such_handler")


@pytest.mark.parametrize("package", [thenable.rpc, thenable.autograd])
def test_public_classes_travel_by_their_public_path(package: object) -> None:
    name = package.__name__  # type: ignore[attr-defined]
    classes = [getattr(package, n) for n in package.__all__]  # type: ignore[attr-defined]
    classes = [c for c in classes if isinstance(c, type) and c.__module__.startswith("thenable")]
    assert classes
    for cls in classes:
        assert cls.__module__ == name or not cls.__module__.startswith(f"{name}._"), cls
    error = thenable.rpc.RpcTimeoutError("late")
    assert b"thenable.rpc\x94\x8c\x0fRpcTimeoutError" in pickle.dumps(error)
    assert repr(thenable.autograd.BackwardError) == "<class 'thenable.autograd.BackwardError'>"


GROUP_SIZE = 2


def test_messages_of_every_kind_name_no_private_module(group: Group) -> None:
    group.call_all(fns.note_globals)
    group.call(0, fns.exercise, "worker1")
    seen = {name for rank in (0, 1) for name in group.call(rank, fns.globals_seen)}
    assert "thenable.rpc._handlers:rref_remote_create" in seen  # (the noting works)
    private = [n for n in seen if re.match(r"thenable(\.\w+)*\._", n.split(":")[0])]
    assert [n for n in private if not n.startswith("thenable.rpc._handlers:")] == []
