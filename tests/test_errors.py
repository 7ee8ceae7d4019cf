"""as_runtime_error: an exception keeps its type and is also a RuntimeError, as torch's are."""

from __future__ import annotations

import pickle
import traceback

import pytest

from thenable._errors import as_runtime_error, type_name


class TwoArgs(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Slotted(ValueError):
    __slots__ = ("extra",)
    extra: int


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("boom"),
        KeyError("k"),
        FileNotFoundError(2, "no such file"),
        TimeoutError("late"),
        ModuleNotFoundError("No module named 'x'", name="x", path="/p"),
        AttributeError("attr", name="n", obj=3),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte"),
        TwoArgs("coded", 7),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_the_copy_is_both_types_with_everything_kept(exc: Exception) -> None:
    original = _raised(exc)
    original.__cause__ = LookupError("cause")
    copy = as_runtime_error(original)
    assert isinstance(copy, RuntimeError) and isinstance(copy, type(original))
    assert type(copy).__name__ == type(original).__name__
    assert type(copy).__module__ == type(original).__module__
    assert copy.args == original.args
    assert str(copy) == str(original)
    assert copy.__traceback__ is original.__traceback__
    assert copy.__cause__ is original.__cause__
    for name in ("errno", "filename", "name", "path", "obj", "reason", "start", "code"):
        assert getattr(copy, name, None) == getattr(original, name, None), name
    shown = "".join(traceback.format_exception(copy))
    assert f"{type(original).__qualname__}: {original}" in shown


def test_slots_and_notes_are_copied() -> None:
    original = Slotted("v")
    original.extra = 4
    setattr(original, "__notes__", ["a note"])  # noqa: B010  (add_note() is 3.11+)
    copy = as_runtime_error(original)
    assert copy.extra == 4
    assert getattr(copy, "__notes__", None) == ["a note"]


def test_runtime_errors_and_base_exceptions_are_returned_as_they_are() -> None:
    runtime = RuntimeError("already")
    assert as_runtime_error(runtime) is runtime
    interrupt = KeyboardInterrupt()
    assert as_runtime_error(interrupt) is interrupt


def test_the_class_is_made_once_per_original_class() -> None:
    assert type(as_runtime_error(ValueError("a"))) is type(as_runtime_error(ValueError("b")))
    classes = {type(as_runtime_error(error)) for error in (KeyError("a"), ValueError("b"))}
    assert len(classes) == 2


def test_the_copy_pickles_as_both_types() -> None:
    copy = pickle.loads(pickle.dumps(as_runtime_error(FileNotFoundError(2, "gone"))))
    assert isinstance(copy, FileNotFoundError) and isinstance(copy, RuntimeError)
    assert copy.errno == 2 and copy.strerror == "gone"
    # A class that pickle cannot rebuild from its args fails as it would without the mix.
    with pytest.raises(TypeError, match="code"):
        pickle.loads(pickle.dumps(as_runtime_error(TwoArgs("m", 1))))


def test_a_class_that_cannot_be_combined_gives_a_runtime_error_naming_it() -> None:
    class Picky(Exception):
        def __new__(cls, *args: object) -> Picky:
            if cls is not Picky:
                raise TypeError("no subclasses")
            return super().__new__(cls, *args)

    original = Picky("odd")
    copy = as_runtime_error(original)
    assert type(copy).__mro__ == RuntimeError.__mro__
    assert str(copy) == f"{Picky.__qualname__}: odd"
    assert copy.__cause__ is original


def test_type_name_names_the_module_and_the_qualified_name() -> None:
    """What the "not a Future" messages name: ``Future`` alone says neither whose nor which."""
    assert type_name(3) == "builtins.int"
    assert type_name(None) == "None"
    assert type_name(TwoArgs("m", 1)) == f"{__name__}.TwoArgs"
    assert type_name(as_runtime_error(KeyError("k"))) == "builtins.KeyError"
