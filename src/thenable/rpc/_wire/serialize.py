"""Pickle protocol 5 with out-of-band buffers for ``thenable.rpc`` messages.

``dumps(obj)`` returns a small pickle *header* plus a list of raw *buffers* (memoryviews of
the objects' own memory, not copies) that the wire protocol sends as separate parts, and
``loads(header, buffers)`` rebuilds the object on top of the received buffers without
copying them again.

- numpy arrays and CPU torch tensors travel as one raw buffer per underlying memory block
  (blocks up to 4 KiB are copied into the header instead: cheaper than a buffer of their
  own), so views and tensors that share memory in the sender share memory in the receiver.
  A block covers only the bytes its arrays reach when that saves much (a small slice of
  a big array sends the slice, not the whole array).  Received arrays and tensors are
  writable; tensors keep dtype, size, stride, storage offset and ``requires_grad`` but
  arrive as leaves (autograd history does not travel).
- Functions, classes and builtins are pickled by reference, as standard pickle does: they
  must be importable module-level names on the receiving side.  Lambdas and local functions
  cannot be sent (there is no cloudpickle here).
- Exceptions travel with their formatted traceback (``dumps_exception``) and come back as
  the original exception object whose ``__cause__`` shows the remote traceback.

Nothing here imports numpy or torch: an object can only be an array or a tensor if its
module is already imported, so the reducer looks them up in ``sys.modules``.

Unpickling runs code chosen by the sender: only load data from authenticated peers.
"""

from __future__ import annotations

import copyreg
import ctypes
import io
import mmap
import pickle
import sys
import threading
import traceback
import types
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeAlias

from thenable.rpc._errors import RemoteError, SerializationError
from thenable.rpc._handlers import pinned
from thenable.rpc._worker import context as _context

__all__ = [
    "ATOMS",
    "RemoteTraceback",
    "dumps",
    "dumps_exception",
    "loads",
    "loads_exception",
    "pack_exception",
    "unpack_exception",
]

_PICKLE_PROTOCOL: Final = 5

_Buffer: TypeAlias = bytes | bytearray | memoryview
_IN_BAND_BYTES: Final = 4096  # memory blocks up to this size travel inside the header


class _UnsendableError(TypeError):
    """Raised by a reducer for a value that has a specific fix (e.g. a CUDA tensor)."""


class RemoteTraceback(Exception):
    """Stands in as ``__cause__`` of a re-raised remote exception; its str is the traceback."""

    def __init__(self, traceback_text: str) -> None:
        super().__init__(traceback_text)
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        return self.traceback_text


# ---------------------------------------------------------------------------------------
# Shared memory blocks
# ---------------------------------------------------------------------------------------


def _writable(buffer: Any) -> memoryview:
    """A flat writable byte view of a received buffer; read-only ones are copied once."""
    view = memoryview(buffer)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if view.readonly:
        view = memoryview(bytearray(view))
    return view


def _carrier(source: Any) -> bytearray | pickle.PickleBuffer:
    """How a block's bytes travel: small ones inside the header, others out of band.

    Each out-of-band buffer costs the protocol a part of its own on both ends, which for a
    few KiB is more than copying them.  A bytearray arrives as a writable bytearray.
    """
    view = memoryview(source)
    if view.nbytes <= _IN_BAND_BYTES:
        return bytearray(view)
    return pickle.PickleBuffer(source)


@pinned
def _rebuild_block(buffer: Any) -> memoryview:
    """Receiver side of :class:`_Block`: the shared memory block as a writable view."""
    return _writable(buffer)


class _Block:
    """One memory block sent once per ``dumps`` call; pickle's memo shares it between views.

    ``source`` is a contiguous object exporting exactly the block's bytes.  The same
    ``_Block`` instance is referenced by every array/tensor that lives in the block, so
    pickle writes it once and the receiver rebuilds it once.
    """

    __slots__ = ("keepalive", "source")

    def __init__(self, source: Any, keepalive: object = None) -> None:
        self.source = source
        self.keepalive = keepalive

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_block, (_carrier(self.source),))


@pinned
def _rebuild_storage(buffer: Any) -> Any:
    """Receiver side of a torch storage block: an UntypedStorage over the received bytes."""
    import torch  # the receiver may not have imported it yet

    if type(buffer) is bytearray and buffer:  # a small block that travelled in-band
        return torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage()
    view = _writable(buffer)
    if not view.nbytes:
        return torch.empty(0, dtype=torch.uint8).untyped_storage()
    # Export the memory's owner (a bytearray, an mmap, or a shared memory loan: a ctypes array)
    # rather than the memoryview: a tensor holding an export of a memoryview that ends up in a
    # garbage cycle makes the collector clear a memoryview with live exports, and CPython then
    # crashes at exit.  Those owners have no such check (a loan in a cycle is tested).
    owner = view.obj
    if isinstance(owner, (bytearray, mmap.mmap, ctypes.Array)):
        offset = _address_of(view) - _address_of(memoryview(owner))
        return torch.frombuffer(
            owner, dtype=torch.uint8, count=view.nbytes, offset=offset
        ).untyped_storage()
    return torch.frombuffer(view, dtype=torch.uint8).untyped_storage()


def _address_of(view: memoryview) -> int:
    """The address of a writable buffer's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class _StorageBlock(_Block):
    """A torch storage's bytes; rebuilt as an UntypedStorage shared by its tensors."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_storage, (_carrier(self.source),))


# ---------------------------------------------------------------------------------------
# Regions: memory that arrays/tensors live in
# ---------------------------------------------------------------------------------------
#
# Every array or tensor lives in a *region*: the memory of the ndarray (or bytes-like
# object) at the end of its ``.base`` chain, or a tensor's storage.  A region is sent as
# one block per dumps() call, shared by everything in it.  By default the block is the
# whole region; if that would send much more than the arrays actually reach (a small slice
# of a big array), dumps() pickles a second time with each block trimmed to the byte range
# the arrays use, found by the first pass.

_RegionKey = tuple[str, int, int]  # (kind, address, nbytes)
_TRIM_MIN_WASTE: Final = 1 << 18  # re-pickle to trim blocks only if this many bytes are saved
_TRIM_ALIGN: Final = 64  # trimmed blocks start on a multiple of this many bytes of the region


@pinned
def _rebuild_ndarray(
    block: memoryview, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], dtype: Any
) -> Any:
    """Receiver side of an ndarray: a view into the shared block."""
    import numpy as np

    return np.ndarray(shape, dtype=dtype, buffer=block, offset=offset, strides=strides)


def _extent(
    address: int, shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int
) -> tuple[int, int]:
    """The [low, high) byte addresses an array with this layout touches (size > 0)."""
    low = high = address
    for n, stride in zip(shape, strides, strict=True):
        if stride < 0:
            low += (n - 1) * stride
        else:
            high += (n - 1) * stride
    return low, high + itemsize


def _flat_bytes(memory: Any) -> Any:
    """A flat uint8 view of a C- or F-contiguous array, in memory order."""
    import numpy as np

    order = "C" if memory.flags.c_contiguous else "F"
    return memory.reshape(-1, order=order).view(np.uint8)


def _ndarray_address(array: Any) -> int:
    address: int = array.__array_interface__["data"][0]
    return address


@pinned
def _rebuild_tensor(
    storage: Any,
    dtype_name: str,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    storage_offset: int,
    requires_grad: bool,
) -> Any:
    """Receiver side of a CPU tensor: a view into the shared storage."""
    import torch

    tensor = torch.empty(0, dtype=_torch_dtype(dtype_name))
    tensor.set_(storage, storage_offset, size, stride)
    if requires_grad:
        tensor.requires_grad_(True)
        _context.note_received_grad(tensor)
    return tensor


@pinned
def _rebuild_requiring_grad(tensor: Any) -> Any:
    """Receiver side of a sparse (or other non-strided) tensor that requires grad."""
    tensor.requires_grad_(True)
    _context.note_received_grad(tensor)
    return tensor


@pinned
def _rebuild_small_tensor(
    data: bytearray,
    dtype_name: str,
    size: tuple[int, ...],
    stride: tuple[int, ...] | None,
    storage_offset: int,
    requires_grad: bool,
) -> Any:
    """Receiver side of a tensor whose storage travelled in the header, as ``data`` (every
    tensor of that storage in the message gets the same bytearray, so they share memory).

    ``stride`` None: the tensor is its whole storage, contiguous, which takes the fewest torch
    calls (each is costly when the dispatcher's code has left the cache).
    """
    import torch

    if stride is None:
        tensor = torch.frombuffer(data, dtype=_torch_dtype(dtype_name))
        if len(size) != 1:
            tensor = tensor.view(size)
        if requires_grad:
            tensor.requires_grad_(True)
            _context.note_received_grad(tensor)
        return tensor
    return _rebuild_tensor(
        _rebuild_storage(data), dtype_name, size, stride, storage_offset, requires_grad
    )


def _torch_dtype(name: str) -> Any:
    """``torch.<name>``, which must be a dtype (the name comes from the peer)."""
    import torch

    dtype = getattr(torch, name)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"torch.{name} is not a dtype")
    return dtype


_DTYPE_NAMES: dict[Any, str] = {}


def _dtype_name(dtype: Any) -> str:
    """``float32`` for torch.float32: a name pickles faster than the dtype object."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def _itemsize(dtype: Any) -> int:
    """Bytes per element of a torch dtype (``dtype.itemsize`` from torch 2.1)."""
    itemsize = getattr(dtype, "itemsize", None)
    if itemsize is None:
        import torch

        itemsize = torch.empty(0, dtype=dtype).element_size()
    return int(itemsize)


def _contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether a tensor of this size and stride is C-contiguous (as ``is_contiguous()``,
    without a trip into torch: dimensions of one element may have any stride)."""
    expected = 1
    for n, step in zip(reversed(size), reversed(stride), strict=True):
        if n != 1 and step != expected:
            return False
        expected *= n
    return True


def _storage_bytes(storage: Any) -> memoryview:
    """A writable byte view of a CPU storage's memory that keeps the storage alive."""
    nbytes = storage.nbytes()
    if not nbytes:
        return memoryview(bytearray())
    array = (ctypes.c_ubyte * nbytes).from_address(storage.data_ptr())
    array._thenable_keepalive = storage  # ctypes instances take attributes
    return memoryview(array).cast("B")


# ---------------------------------------------------------------------------------------
# Pickler
# ---------------------------------------------------------------------------------------


def _collector(buffers: list[memoryview]) -> Callable[[pickle.PickleBuffer], None]:
    """A buffer_callback that keeps each raw view; returning None makes it out-of-band."""

    def collect(buffer: pickle.PickleBuffer) -> None:
        buffers.append(buffer.raw())

    return collect


class _Pickler(pickle.Pickler):
    """Protocol-5 pickler that sends arrays and tensors as shared out-of-band blocks.

    ``trim`` (second pass only) maps a region to the byte range its block should cover.
    """

    def __init__(self) -> None:
        self._file = io.BytesIO()
        self._buffers: list[memoryview] = []
        # The callback must not be a bound method of the pickler: that cycle would keep the
        # exported buffers alive until a collection, and a collected memoryview that still
        # has exports makes CPython crash at exit.
        super().__init__(
            self._file, protocol=_PICKLE_PROTOCOL, buffer_callback=_collector(self._buffers)
        )
        self.busy = False
        self._trim: dict[_RegionKey, tuple[int, int]] | None = None
        # The byte range of each region that the arrays/tensors reach.
        self.extents: dict[_RegionKey, tuple[int, int]] = {}
        # Blocks by (region, start, end).  They keep their memory alive, so no address is
        # reused (and no region key is confused) while this pickler runs.
        self._blocks: dict[tuple[_RegionKey, int, int], _Block] = {}
        self._ndarray: type | None = None
        self._tensor: type | None = None
        self._strided: object = None
        # Arrays and tensors (exact types; subclasses such as nn.Parameter pickle their own
        # way) go to our reducers through the dispatch table, which the C pickler consults
        # only for objects it has no built-in way for: tuples, dicts, strings... never call
        # into Python.  (A reducer_override would be called for each of them.)  The table
        # also holds copyreg's registrations (torch registers some), as of ``_registered``.
        self.dispatch_table: dict[type, Callable[[Any], Any]] = {}
        self._registered: dict[Any, Any] | None = None

    def run(
        self, obj: object, trim: dict[_RegionKey, tuple[int, int]] | None
    ) -> tuple[bytes, list[memoryview], dict[_RegionKey, tuple[int, int]]]:
        """One pickling pass: header, buffers and the byte range used in each region.

        Afterwards the pickler holds nothing of ``obj`` (it is reused for the next call).
        """
        self.busy = True
        self._trim = trim
        self.extents = {}
        # getattr: another thread may be importing numpy or torch right now, and a module
        # that is still initializing has no attributes yet (then none of its objects exist).
        ndarray = getattr(sys.modules.get("numpy"), "ndarray", None)
        torch = sys.modules.get("torch")
        tensor = getattr(torch, "Tensor", None)
        self._strided = getattr(torch, "strided", None)
        if (
            ndarray is not self._ndarray
            or tensor is not self._tensor
            or self._registered != copyreg.dispatch_table
        ):
            self._ndarray, self._tensor = ndarray, tensor
            self._registered = dict(copyreg.dispatch_table)
            table: dict[type, Callable[[Any], Any]] = dict(self._registered)
            table.setdefault(types.BuiltinFunctionType, _reduce_builtin)
            if ndarray is not None:
                table[ndarray] = self._reduce_ndarray
            if tensor is not None:
                table[tensor] = self._reduce_tensor
            self.dispatch_table = table
        try:
            self.dump(obj)
            return self._file.getvalue(), self._buffers.copy(), self.extents
        finally:
            self.clear_memo()
            self._blocks.clear()
            self._buffers.clear()
            self._file.seek(0)
            self._file.truncate()
            self._trim = None
            self.busy = False

    def _block(
        self,
        key: _RegionKey,
        low: int,
        high: int,
        make: Callable[[int, int], _Block],
    ) -> tuple[_Block, int]:
        """The block holding region bytes [low, high), and where the block starts."""
        extent = self.extents.get(key)
        self.extents[key] = (
            (low, high) if extent is None else (min(extent[0], low), max(extent[1], high))
        )
        start, end = 0, key[2]
        if self._trim is not None:
            start, end = self._trim.get(key, (start, end))
            if not (start <= low and high <= end):  # the object changed since the first pass
                start, end = low - low % _TRIM_ALIGN, high
        block_key = (key, start, end)
        block = self._blocks.get(block_key)
        if block is None:
            block = self._blocks[block_key] = make(start, end)
        return block, start

    def _whole_in_header(self, key: _RegionKey, keepalive: object) -> bytearray:
        """A small region's bytes (at most ``_IN_BAND_BYTES``), copied once per message into
        a bytearray that travels inside the header and that every array or tensor in the
        region shares (pickle's memo); ``keepalive`` holds the region's memory meanwhile."""
        block = self._blocks.get((key, 0, key[2]))
        if block is None:
            data = bytearray(ctypes.string_at(key[1], key[2]))
            block = self._blocks[(key, 0, key[2])] = _Block(data, keepalive)
        source: bytearray = block.source
        return source

    def _numpy_region(self, array: Any, address: int) -> tuple[_RegionKey, Any] | None:
        """The region an ndarray (whose data starts at ``address``) lives in, as (key, an
        array that is exactly its memory, C- or F-contiguous), or None."""
        import numpy as np

        root, root_address = array, address
        if type(root.base) is self._ndarray:
            while type(root.base) is self._ndarray:
                root = root.base
            root_address = _ndarray_address(root)
        owner = root.base
        if owner is not None:  # bytes, bytearray, mmap, memoryview, ...: use all of it
            try:
                whole = np.frombuffer(owner, dtype=np.uint8)
            except Exception:  # not a flat buffer (e.g. a capsule): use the root array
                pass
            else:
                start = _ndarray_address(whole)
                root_low, root_high = _extent(root_address, root.shape, root.strides, root.itemsize)
                if start <= root_low and root_high <= start + whole.nbytes:
                    return ("numpy", start, whole.nbytes), whole
        flags = root.flags
        if not (flags.c_contiguous or flags.f_contiguous):
            return None
        return ("numpy", root_address, root.nbytes), root

    def _reduce_ndarray(self, array: Any) -> Any:
        """(rebuild, (block, offset, shape, strides, dtype)) for an array in a shared block.

        Arrays that cannot be placed in a region (object dtype, empty, unusual layouts)
        fall back to numpy's own pickling.
        """
        if array.dtype.hasobject or array.size == 0:
            return _own_reduction(array)
        address = _ndarray_address(array)  # (each look builds a dict: once per array)
        region = self._numpy_region(array, address)
        if region is None:
            return _own_reduction(array)
        key, memory = region
        low, high = _extent(address, array.shape, array.strides, array.itemsize)
        low -= key[1]
        high -= key[1]
        if low < 0 or high > key[2]:
            return _own_reduction(array)  # e.g. as_strided tricks reaching outside the region
        dtype = array.dtype
        if dtype.fields is None and dtype.subdtype is None:
            dtype = dtype.str  # ("<f4": far cheaper to pickle and rebuild than the object)
        if key[2] <= _IN_BAND_BYTES:
            data = self._whole_in_header(key, memory)
            offset = address - key[1]
            return (_rebuild_ndarray, (data, offset, array.shape, array.strides, dtype))
        flat = _flat_bytes(memory)
        block, start = self._block(key, low, high, lambda a, b: _Block(flat[a:b]))
        offset = address - key[1] - start
        return (_rebuild_ndarray, (block, offset, array.shape, array.strides, dtype))

    def _reduce_tensor(self, tensor: Any) -> Any:
        """(rebuild, (storage block, dtype, size, stride, offset, requires_grad)).

        For strided CPU tensors; sparse, quantized, nested and other layouts use torch's
        own pickling.  CUDA (any non-CPU) tensors are refused.
        """
        # Few torch calls: each is cheap warm, but on a busy machine every one is a trip
        # through cold dispatcher code.
        if not tensor.is_cpu:
            raise _UnsendableError(
                f"cannot send a tensor on device {tensor.device}: move it to the CPU first "
                "(tensor.cpu()); device maps are not supported"
            )
        if tensor.layout is not self._strided or tensor.is_quantized or tensor.is_nested:
            if tensor.requires_grad:  # torch's own pickling drops it
                _context.note_sent_grad(tensor)
                return (_rebuild_requiring_grad, (tensor.detach(),))
            return _own_reduction(tensor)
        requires_grad = bool(tensor.requires_grad)
        if requires_grad:
            _context.note_sent_grad(tensor)  # distributed autograd links it to the receiver
            tensor = tensor.detach()
        dtype = tensor.dtype
        if dtype.is_complex and (tensor.is_conj() or tensor.is_neg()):
            tensor = tensor.resolve_conj().resolve_neg()  # lazy views; send materialized
        size = tuple(tensor.shape)
        stride = tensor.stride()
        itemsize = _itemsize(dtype)
        numel = tensor.numel()
        if numel == 0:
            empty = _StorageBlock(memoryview(bytearray()))
            return (_rebuild_tensor, (empty, _dtype_name(dtype), size, stride, 0, requires_grad))
        storage = tensor.untyped_storage()
        key = ("torch", storage.data_ptr(), storage.nbytes())
        offset = tensor.storage_offset()
        if key[2] <= _IN_BAND_BYTES:
            data = self._whole_in_header(key, storage)
            whole = not offset and key[2] == numel * itemsize and _contiguous(size, stride)
            layout = None if whole else stride
            rebuild = (data, _dtype_name(dtype), size, layout, offset, requires_grad)
            return (_rebuild_small_tensor, rebuild)
        byte_strides = tuple(n * itemsize for n in stride)
        low, high = _extent(offset * itemsize, size, byte_strides, itemsize)

        def make(start: int, end: int) -> _Block:
            return _StorageBlock(_storage_bytes(storage)[start:end], storage)

        block, start = self._block(key, low, high, make)
        offset -= start // itemsize
        return (_rebuild_tensor, (block, _dtype_name(dtype), size, stride, offset, requires_grad))


def _reduce_builtin(fn: Any) -> Any:
    """A built-in function that its module has under its own name (``torch.add``) is sent as
    that name: torch's have a longer qualified name (``_VariableFunctionsClass.add``) that
    pickle would otherwise write, check and look up part by part on both ends."""
    name = fn.__name__
    if getattr(sys.modules.get(fn.__module__ or ""), name, None) is fn:
        return name  # pickle: the global ``fn.__module__ + "." + name``
    return _own_reduction(fn)


def _own_reduction(obj: Any) -> Any:
    """What pickle does with ``obj`` when no dispatch table names its type."""
    return obj.__reduce_ex__(_PICKLE_PROTOCOL)


def _type_name(obj: object) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _hint(obj: object, error: BaseException) -> str:
    """What the user can do about a pickling failure."""
    text = str(error)
    if isinstance(obj, types.FunctionType) or "<lambda>" in text or "<locals>" in text:
        return (
            "functions must be importable module-level functions; lambdas and local "
            "(nested) functions cannot be sent"
        )
    return (
        "every argument and return value must be picklable: module-level classes and "
        "functions, no open files, sockets, locks or generators"
    )


ATOMS: Final = frozenset({type(None), bool, int, float, complex, str, bytes})
"""Types whose values hold nothing else (no array, tensor or RRef): pickled as they are."""


def dumps(obj: object) -> tuple[bytes, list[memoryview]]:
    """Pickle ``obj`` into a header and zero-copy out-of-band buffers.

    The buffers are views of the objects' memory: keep the objects unchanged until the
    buffers have been sent.  Raises :class:`SerializationError` if something cannot be
    pickled.
    """
    if type(obj) in ATOMS:  # (replies mostly) nothing inside to share or send out of band
        return pickle.dumps(obj, _PICKLE_PROTOCOL), []
    header, buffers, extents = _dump(obj, None)
    if not extents:  # no array or tensor: nothing to trim
        return header, buffers
    waste = sum(key[2] - (high - low) for key, (low, high) in extents.items())
    if waste >= max(_TRIM_MIN_WASTE, 8 * len(header)):
        trim = {key: (low - low % _TRIM_ALIGN, high) for key, (low, high) in extents.items()}
        header, buffers, _ = _dump(obj, trim)
    return header, buffers


_PICKLERS = threading.local()  # .pickler: the thread's reusable _Pickler


def _dump(
    obj: object, trim: dict[_RegionKey, tuple[int, int]] | None
) -> tuple[bytes, list[memoryview], dict[_RegionKey, tuple[int, int]]]:
    """One pickling pass with this thread's pickler (a new one if it is busy: reentrant)."""
    pickler: _Pickler | None = getattr(_PICKLERS, "pickler", None)
    if pickler is None or pickler.busy:
        pickler = _PICKLERS.pickler = _Pickler()
    try:
        return pickler.run(obj, trim)
    except BaseException as exc:
        _PICKLERS.pickler = None  # start the next call with a clean one
        if isinstance(exc, _UnsendableError):
            raise SerializationError(f"cannot serialize {_type_name(obj)} for RPC: {exc}") from exc
        if isinstance(exc, Exception) and not isinstance(exc, MemoryError):
            raise SerializationError(
                f"cannot serialize {_type_name(obj)} for RPC: {exc}; {_hint(obj, exc)}"
            ) from exc
        raise


def loads(header: _Buffer, buffers: Iterable[_Buffer] = ()) -> Any:
    """Rebuild an object from ``dumps`` output.

    Arrays and tensors are built on top of ``buffers`` without copying (writable buffers,
    such as the protocol's received memoryviews, give writable arrays; read-only ones are
    copied once so results are always writable).  Unpickling imports and runs code named
    by the sender; only load data from authenticated peers.
    """
    return pickle.loads(header, buffers=buffers)


# ---------------------------------------------------------------------------------------
# Exceptions
# ---------------------------------------------------------------------------------------


@pinned
def _rebuild_packed_exception(
    type_name: str, message: str, traceback_text: str, payload: bytes | None, reason: str
) -> _PackedException:
    return _PackedException(type_name, message, traceback_text, payload, reason)


class _PackedException:
    """A remote exception in transit: its description, traceback and (if possible) pickle.

    The exception is pickled separately (``payload``) so that a failure to *unpickle* it on
    the receiving side (missing module, ``__init__`` with other arguments) still yields a
    :class:`RemoteError` with the description and traceback.
    """

    __slots__ = ("message", "payload", "reason", "traceback_text", "type_name")

    def __init__(
        self, type_name: str, message: str, traceback_text: str, payload: bytes | None, reason: str
    ) -> None:
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text
        self.payload = payload
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_packed_exception,
            (self.type_name, self.message, self.traceback_text, self.payload, self.reason),
        )


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as err:  # a broken __str__ must not hide the original error
        return f"<str() failed: {type(err).__name__}>"


def pack_exception(exc: BaseException, *, origin: str | None = None) -> object:
    """A picklable stand-in for ``exc`` and its formatted traceback (``origin`` heads it)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if origin:
        text = f"Traceback from {origin}:\n{text}"
    payload: bytes | None = None
    reason = ""
    try:
        payload = pickle.dumps(exc, protocol=_PICKLE_PROTOCOL)  # in-band: exceptions are small
    except Exception as err:
        reason = f"pickling failed: {type(err).__name__}: {err}"
    return _PackedException(_type_name(exc), _safe_str(exc), text, payload, reason)


def unpack_exception(packed: object) -> BaseException:
    """The original exception from ``pack_exception``, its ``__cause__`` the remote traceback.

    Falls back to :class:`RemoteError` when the exception could not be pickled or unpickled.
    """
    if not isinstance(packed, _PackedException):
        raise TypeError(f"expected the result of pack_exception(), got {type(packed).__name__}")
    exc: BaseException | None = None
    reason = packed.reason
    if packed.payload is not None:
        try:
            loaded = pickle.loads(packed.payload)
        except Exception as err:
            reason = f"unpickling failed: {type(err).__name__}: {err}"
        else:
            if isinstance(loaded, BaseException):
                exc = loaded
            else:
                reason = f"unpickled to a {_type_name(loaded)}, not an exception"
    if exc is None:
        exc = RemoteError(packed.type_name, packed.message, packed.traceback_text, reason)
    exc.__cause__ = RemoteTraceback(packed.traceback_text)
    return exc


def dumps_exception(
    exc: BaseException, *, origin: str | None = None
) -> tuple[bytes, list[memoryview]]:
    """``dumps(pack_exception(exc))``: an exception with its traceback, ready to send."""
    return dumps(pack_exception(exc, origin=origin))


def loads_exception(header: _Buffer, buffers: Iterable[_Buffer] = ()) -> BaseException:
    """The inverse of :func:`dumps_exception` (see :func:`unpack_exception`)."""
    return unpack_exception(loads(header, buffers))
