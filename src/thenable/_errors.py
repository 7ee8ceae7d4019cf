"""Exceptions that keep their own type and are also catchable the way torch's are.

torch turns most failures into ``RuntimeError``: an exception raised in a ``then`` callback, a
callee that cannot load a call, ``torch.jit.wait(None)``...  User code written for torch
therefore says ``except RuntimeError``.  thenable keeps the precise exception (its type,
message, attributes and traceback) and makes it an instance of ``RuntimeError`` too:
``as_runtime_error(ValueError("boom"))`` is an exception whose class derives from both
``ValueError`` and ``RuntimeError``, shows as ``ValueError`` in tracebacks, and pickles (over
RPC, say) as the same pair of types.
"""

from __future__ import annotations

import contextlib
import threading
import types
from typing import Any, TypeVar

__all__ = ("as_runtime_error", "type_name")

E = TypeVar("E", bound=BaseException)

# Original class -> its subclass that also derives from RuntimeError (made once per class).
_BOTH: dict[type[BaseException], type[BaseException]] = {}
_BOTH_LOCK = threading.Lock()


def as_runtime_error(exc: E) -> E:
    """``exc`` if it is a ``RuntimeError`` already, else a copy that is also one.

    The copy has the class ``exc``'s class would have if it derived from ``RuntimeError`` as
    well (same name and module), the same ``args``, attributes, traceback, cause and context.
    Exceptions that are not ``Exception`` subclasses (``KeyboardInterrupt``...) are returned
    as they are.  A class that cannot be combined with ``RuntimeError`` gives a
    ``RuntimeError`` naming it, with ``exc`` as its cause (what torch does for every class).
    """
    if isinstance(exc, RuntimeError) or not isinstance(exc, Exception):
        return exc
    try:
        both = _both(type(exc))
        copy = both.__new__(both, *exc.args)
        # Fields that built-in exceptions set in __init__ (UnicodeError's, say); a class whose
        # __init__ takes other arguments than its args gets its attributes copied below.
        with contextlib.suppress(Exception):
            both.__init__(copy, *exc.args)
        copy.args = exc.args
        _copy_attributes(exc, copy)
    except Exception:
        fallback = RuntimeError(f"{type(exc).__qualname__}: {exc}")
        fallback.__cause__ = exc
        return fallback  # type: ignore[return-value]
    copy.__traceback__ = exc.__traceback__
    copy.__cause__ = exc.__cause__
    copy.__context__ = exc.__context__
    copy.__suppress_context__ = exc.__suppress_context__
    return copy  # type: ignore[return-value]


def type_name(value: object) -> str:
    """``value``'s class as error messages name it: ``module.qualname`` (``builtins.int``), or
    ``None`` for None."""
    if value is None:
        return "None"
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def _both(cls: type[BaseException]) -> type[BaseException]:
    """The subclass of ``cls`` and ``RuntimeError``, made on first use."""
    both = _BOTH.get(cls)
    if both is None:
        with _BOTH_LOCK:
            both = _BOTH.get(cls)
            if both is None:
                namespace = {
                    "__module__": cls.__module__,
                    "__qualname__": cls.__qualname__,
                    "__doc__": cls.__doc__,
                    "__reduce__": _reduce_both,
                    "_thenable_original": cls,
                }
                both = _BOTH[cls] = type(cls.__name__, (cls, RuntimeError), namespace)
    return both


def _copy_attributes(source: BaseException, target: BaseException) -> None:
    """Instance attributes: ``__dict__``, and the fields of the class and its bases (slots,
    and those of built-in exceptions such as ``ImportError.name`` or ``OSError.errno``)."""
    target.__dict__.update(getattr(source, "__dict__", {}))
    for klass in type(source).__mro__:
        for name, field in vars(klass).items():
            if name in _NOT_COPIED or not isinstance(field, _FIELDS):
                continue
            with contextlib.suppress(AttributeError, TypeError):  # unset, or read-only
                value = getattr(source, name)
                # (Only what differs: setting some of OSError's fields changes its str().)
                if getattr(target, name, _UNSET) is not value:
                    setattr(target, name, value)


_UNSET = object()

# Descriptors of per-instance fields; the ones below are set by as_runtime_error itself.
_FIELDS = (types.MemberDescriptorType, types.GetSetDescriptorType)
_NOT_COPIED = frozenset(
    {"__class__", "__dict__", "__weakref__", "args", "__traceback__", "__cause__"}
    | {"__context__", "__suppress_context__"}
)


def _reduce_both(self: BaseException) -> tuple[Any, ...]:
    """Pickle as the original class's reduction, re-combined with RuntimeError on loading."""
    both = type(self)
    original: type[BaseException] = both._thenable_original  # type: ignore[attr-defined]
    reduced = super(both, self).__reduce__()
    assert isinstance(reduced, tuple)
    factory, args, *rest = reduced
    if factory is both:
        factory = original
    return (_rebuild, (factory, args), *rest)


def _rebuild(factory: Any, args: tuple[Any, ...]) -> BaseException:
    exc: BaseException = factory(*args)
    return as_runtime_error(exc)
