"""Tests of pickle-5 serialization with out-of-band buffers (thenable.rpc._wire.serialize)."""

from __future__ import annotations

import collections
import copyreg
import ctypes
import fractions
import subprocess
import sys
import threading
import types
from typing import Any

import pytest

from thenable.rpc._errors import RemoteError, SerializationError
from thenable.rpc._wire import protocol as _protocol
from thenable.rpc._wire import serialize as _serialize
from thenable.rpc._wire.serialize import (
    _IN_BAND_BYTES,
    RemoteTraceback,
    dumps,
    dumps_exception,
    loads,
    loads_exception,
    pack_exception,
    unpack_exception,
)


def _over_the_wire(obj: object) -> Any:
    """dumps, copy every part as a socket would, loads."""
    header, buffers = dumps(obj)
    return loads(bytes(header), [bytearray(b) for b in buffers])


def module_level_function(x: int) -> int:
    return x + 1


class CustomError(Exception):
    """An exception with extra attributes."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code
        self.details = {"retry": False}


class NeedsTwoArgsError(Exception):
    """Pickles, but cannot be unpickled: args do not match __init__."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


class UnpicklableError(Exception):
    """Carries a lock, so it cannot be pickled."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def _raised(exc: BaseException) -> BaseException:
    """``exc`` with a real traceback."""
    try:
        raise exc
    except BaseException as caught:
        return caught


# -- plain values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        0,
        -(2**100),
        3.5,
        "text ü",
        b"bytes",
        bytearray(b"mutable"),
        [1, [2, [3]]],
        (1, "two", None),
        {"a": 1, 2: [3]},
        {1, 2, 3},
        frozenset({"x"}),
        collections.OrderedDict(a=1),
        fractions.Fraction(1, 3),
        module_level_function,
        len,
        ValueError,
    ],
)
def test_plain_values_round_trip(value: object) -> None:
    assert _over_the_wire(value) == value


class _Registered:
    """Pickles through a copyreg registration (made by the test, after dumps was used)."""

    def __init__(self, value: int) -> None:
        self.value = value


def _rebuild_registered(value: int) -> _Registered:
    return _Registered(-value)  # the sign tells which reduction ran


def test_copyreg_registrations_made_later_are_used() -> None:
    assert loads(*dumps(_Registered(3))).value == 3  # this thread's pickler exists now
    copyreg.pickle(_Registered, lambda obj: (_rebuild_registered, (obj.value,)))
    try:
        assert loads(*dumps(_Registered(3))).value == -3
    finally:
        del copyreg.dispatch_table[_Registered]
    assert loads(*dumps(_Registered(3))).value == 3


def test_builtin_functions_travel_by_their_module_level_name() -> None:
    torch = pytest.importorskip("torch")
    header, _ = dumps(torch.add)
    assert b"_VariableFunctionsClass" not in header  # torch's qualified name is not written
    assert loads(header) is torch.add
    items: list[int] = []
    appended = loads(*dumps(items.append))  # a bound built-in: pickled as before
    appended(1)
    assert appended.__self__ == [1]


def test_plain_values_have_no_buffers() -> None:
    header, buffers = dumps({"a": [1, 2.0, "x"]})
    assert buffers == []
    assert loads(header, buffers) == {"a": [1, 2.0, "x"]}


def test_shared_references_stay_shared() -> None:
    inner = [1, 2]
    outer = _over_the_wire([inner, inner])
    assert outer[0] is outer[1]


@pytest.mark.parametrize("module", [_serialize, _protocol])
def test_modules_import_neither_numpy_nor_torch(module: types.ModuleType) -> None:
    # Load the file on its own, in a fresh interpreter, without the rest of the package.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {module.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['m'] = m\n"
        "spec.loader.exec_module(m)\n"
        "if hasattr(m, 'dumps'): m.loads(*m.dumps([1, b'x']))\n"
        "assert 'numpy' not in sys.modules and 'torch' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- errors --------------------------------------------------------------------------------


def test_lambda_raises_serialization_error_with_advice() -> None:
    with pytest.raises(SerializationError, match="lambdas and local") as info:
        dumps((lambda x: x, 1))
    assert isinstance(info.value, TypeError)
    assert info.value.__cause__ is not None
    assert "builtins.tuple" in str(info.value)


def test_local_function_raises_serialization_error() -> None:
    def local() -> None:
        pass

    with pytest.raises(SerializationError, match="module-level functions"):
        dumps({"f": local})


def test_unpicklable_object_raises_serialization_error() -> None:
    with pytest.raises(SerializationError, match=r"_thread\.lock.*must be picklable"):
        dumps([threading.Lock()])


# -- exceptions ----------------------------------------------------------------------------


def test_exception_comes_back_as_itself_with_remote_traceback() -> None:
    header, buffers = dumps_exception(_raised(CustomError("boom", 7)), origin="worker1")
    exc = loads_exception(bytes(header), [bytearray(b) for b in buffers])
    assert type(exc) is CustomError
    assert exc.args == ("boom", 7)
    assert exc.code == 7
    assert exc.details == {"retry": False}
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback)
    text = str(cause)
    assert text.startswith("Traceback from worker1:\n")
    assert "_raised" in text  # the remote frames
    assert "CustomError: ('boom', 7)" in text


def test_exception_chain_is_in_the_traceback_text() -> None:
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as outer:
        exc = unpack_exception(_over_the_wire(pack_exception(outer)))
    assert isinstance(exc, RuntimeError)
    assert "KeyError: 'inner'" in str(exc.__cause__)


def test_unpicklable_exception_becomes_remote_error() -> None:
    exc = unpack_exception(_over_the_wire(pack_exception(_raised(UnpicklableError("bad")))))
    assert isinstance(exc, RemoteError)
    assert exc.type_name == f"{__name__}.UnpicklableError"
    assert exc.message == "bad"
    assert "pickling failed" in exc.reason
    assert str(exc).startswith(f"{__name__}.UnpicklableError: bad")
    assert "UnpicklableError: bad" in exc.traceback_text
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert str(exc.__cause__) == exc.traceback_text


def test_exception_that_fails_to_unpickle_becomes_remote_error() -> None:
    exc = unpack_exception(_over_the_wire(pack_exception(_raised(NeedsTwoArgsError("a", "b")))))
    assert isinstance(exc, RemoteError)
    assert exc.type_name.endswith("NeedsTwoArgsError")
    assert exc.message == "a/b"
    assert "unpickling failed" in exc.reason
    assert "NeedsTwoArgsError: a/b" in str(exc.__cause__)


def test_remote_error_itself_round_trips() -> None:
    error = RemoteError("pkg.Error", "msg", "tb", "why")
    again = _over_the_wire(error)
    assert (again.type_name, again.message, again.traceback_text, again.reason) == (
        "pkg.Error",
        "msg",
        "tb",
        "why",
    )


def test_unpack_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match="pack_exception"):
        unpack_exception(ValueError("not packed"))


# -- numpy ---------------------------------------------------------------------------------


def test_numpy_contiguous_array_is_out_of_band() -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(10 * 2**20 // 8, dtype=np.float64)  # 10 MiB
    header, buffers = dumps(array)
    assert len(header) < 500
    assert len(buffers) == 1
    assert buffers[0].nbytes == array.nbytes
    assert np.shares_memory(np.frombuffer(buffers[0], dtype=np.float64), array)  # zero copy
    result = loads(header, [bytearray(buffers[0])])
    assert np.array_equal(result, array)
    assert result.flags.writeable


@pytest.mark.parametrize("nbytes", [8, _IN_BAND_BYTES, _IN_BAND_BYTES + 8])
def test_small_arrays_and_tensors_travel_in_the_header(nbytes: int) -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    array = np.arange(nbytes // 8, dtype=np.float64)
    tensor = torch.arange(nbytes // 8, dtype=torch.float64)
    header, buffers = dumps((array, tensor))
    assert len(buffers) == (0 if nbytes <= _IN_BAND_BYTES else 2)
    got_array, got_tensor = loads(header, [bytearray(b) for b in buffers])
    assert np.array_equal(got_array, array) and torch.equal(got_tensor, tensor)
    got_array[0] = got_tensor[0] = -1  # writable, and the sender's copies are untouched
    assert array[0] == tensor[0] == 0


@pytest.mark.parametrize("order", ["C", "F"])
def test_numpy_small_views_of_one_array_share_memory_after_load(order: str) -> None:
    np = pytest.importorskip("numpy")
    base = np.asarray(np.arange(20.0).reshape(4, 5), order=order)  # 160 B: in the header
    views = [base, base[::-1, ::2], base.T, base[1:, :]]
    header, buffers = dumps(views)
    assert not buffers
    got = loads(header)
    for view, back in zip(views, got, strict=True):
        assert np.array_equal(back, view) and back.strides == view.strides
    got[0][2, 0] = -1.0
    assert got[1][1, 0] == got[2][0, 2] == got[3][1, 0] == -1.0
    assert base[2, 0] == 10.0  # the sender's array is untouched


@pytest.mark.parametrize("dtype", ["float32", "int8", "complex128", "bool", ">i4", "U3"])
def test_numpy_dtypes(dtype: str) -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(12).astype(dtype).reshape(3, 4)
    result = _over_the_wire(array)
    assert result.dtype == array.dtype
    assert np.array_equal(result, array)


def test_numpy_structured_dtype() -> None:
    np = pytest.importorskip("numpy")
    array = np.zeros(3, dtype=[("x", "f4"), ("y", "i8", (2,))])
    array["y"][1] = [5, 6]
    result = _over_the_wire(array)
    assert result.dtype == array.dtype
    assert result["y"][1].tolist() == [5, 6]


def test_numpy_non_contiguous_views_keep_their_layout() -> None:
    np = pytest.importorskip("numpy")
    base = np.arange(60, dtype=np.int64).reshape(6, 10)
    views = [base[::2, 1::3], base.T, base[::-1, ::-2], base[3], np.asfortranarray(base)[1:]]
    for view, result in zip(views, _over_the_wire(views), strict=True):
        assert np.array_equal(result, view)
        assert result.strides == view.strides
        assert result.flags.writeable


@pytest.mark.parametrize("rows", [4, 400])  # in the header / out of band
def test_numpy_views_of_one_base_share_memory_after_load(rows: int) -> None:
    np = pytest.importorskip("numpy")
    base = np.arange(rows * 6, dtype=np.float64).reshape(rows, 6)
    header, buffers = dumps({"a": base[1:, ::2], "b": base.T, "c": base})
    assert len(buffers) == (base.nbytes > _IN_BAND_BYTES)  # the base is sent once
    assert len(header) < base.nbytes + 1024
    got = loads(header, [bytearray(b) for b in buffers])
    got["c"][1, 0] = -1.0
    assert got["a"][0, 0] == -1.0
    assert got["b"][0, 1] == -1.0


def test_numpy_arrays_over_one_bytes_object() -> None:
    np = pytest.importorskip("numpy")
    data = bytes(range(16))
    array = np.frombuffer(data, dtype=np.uint8)  # read-only at the sender
    result = _over_the_wire([array, array[4:]])
    assert np.array_equal(result[0], array)
    assert result[0].flags.writeable
    result[0][5] = 99
    assert result[1][1] == 99


def test_numpy_arrays_over_one_buffer_at_different_offsets_share_it() -> None:
    np = pytest.importorskip("numpy")
    data = bytearray(range(64))
    first = np.frombuffer(data, dtype=np.uint8, count=8)
    second = np.frombuffer(data, dtype=np.uint8, offset=4, count=8)
    header, buffers = dumps([first, second])
    assert not buffers  # one small block, in the header
    got_first, got_second = loads(header, [bytearray(b) for b in buffers])
    got_first[5] = 200
    assert got_second[1] == 200


def test_numpy_small_slice_of_a_big_array_sends_only_the_slice() -> None:
    np = pytest.importorskip("numpy")
    big = np.arange(1_000_000, dtype=np.float64)  # 8 MB
    header, buffers = dumps({"x": big[123_457:123_467]})
    assert sum(b.nbytes for b in buffers) < 1024
    got = loads(header, [bytearray(b) for b in buffers])["x"]
    assert got.tolist() == list(range(123_457, 123_467))


def test_numpy_slices_of_a_big_array_share_a_trimmed_block() -> None:
    np = pytest.importorskip("numpy")
    big = np.arange(1_000_000, dtype=np.float64)
    header, buffers = dumps((big[10_000:10_010], big[10_005:10_020:5]))
    assert not buffers  # trimmed to a small block, which travels in the header
    assert len(header) < 1024
    first, second = loads(header, [bytearray(b) for b in buffers])
    assert first.tolist() == list(range(10_000, 10_010))
    assert second.tolist() == [10_005, 10_010, 10_015]
    first[5] = -1
    assert second[0] == -1


def test_numpy_view_before_its_base_still_shares() -> None:
    np = pytest.importorskip("numpy")
    base = np.arange(100_000, dtype=np.float64)
    header, buffers = dumps((base[:10], base))
    assert len(buffers) == 1
    view, whole = loads(header, [bytearray(b) for b in buffers])
    whole[3] = -3
    assert view[3] == -3


def test_numpy_read_only_buffers_are_copied_to_writable() -> None:
    np = pytest.importorskip("numpy")
    header, buffers = dumps(np.arange(4.0))
    result = loads(header, [bytes(b) for b in buffers])  # bytes: read-only
    assert result.flags.writeable
    assert result.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_numpy_object_arrays_use_normal_pickling() -> None:
    np = pytest.importorskip("numpy")
    array = np.array([{"a": 1}, None, "x"], dtype=object)
    header, buffers = dumps(array)
    assert buffers == []
    assert loads(header, buffers).tolist() == [{"a": 1}, None, "x"]


def test_numpy_empty_and_zero_dim_arrays() -> None:
    np = pytest.importorskip("numpy")
    empty, scalar = _over_the_wire([np.zeros((0, 3)), np.array(4.5)])
    assert empty.shape == (0, 3)
    assert scalar.shape == ()
    assert scalar == 4.5


# -- torch ---------------------------------------------------------------------------------


def test_torch_tensor_round_trip_is_out_of_band() -> None:
    torch = pytest.importorskip("torch")
    tensor = torch.randn(1024, 1024)
    header, buffers = dumps(tensor)
    assert len(header) < 500
    assert len(buffers) == 1
    assert buffers[0].nbytes == tensor.nbytes
    result = loads(header, [bytearray(buffers[0])])
    assert torch.equal(result, tensor)
    result[0, 0] = 1.0  # writable


@pytest.mark.parametrize(
    "dtype", ["float32", "float64", "float16", "bfloat16", "int64", "uint8", "bool", "complex64"]
)
def test_torch_dtypes(dtype: str) -> None:
    torch = pytest.importorskip("torch")
    tensor = torch.arange(12).reshape(3, 4).to(getattr(torch, dtype))
    result = _over_the_wire(tensor)
    assert result.dtype == tensor.dtype
    assert torch.equal(result, tensor)


@pytest.mark.parametrize("rows", [4, 400])  # in the header / out of band
def test_torch_views_share_one_storage_after_load(rows: int) -> None:
    torch = pytest.importorskip("torch")
    base = torch.arange(rows * 5, dtype=torch.float32).reshape(rows, 5)
    view = base[1:, ::2]
    transposed = base.t()
    header, buffers = dumps([view, transposed, base])
    assert len(buffers) == (rows * 5 * 4 > _IN_BAND_BYTES)
    got_view, got_t, got_base = loads(header, [bytearray(b) for b in buffers])
    assert got_view.stride() == view.stride() == (5, 2)
    assert got_view.storage_offset() == view.storage_offset()
    assert not got_view.is_contiguous()
    assert torch.equal(got_view, view)
    assert torch.equal(got_t, transposed)
    got_base[1, 0] = -1.0
    assert got_view[0, 0] == -1.0
    assert got_t[0, 1] == -1.0


@pytest.mark.parametrize(
    "make",
    [
        lambda torch: torch.tensor(3.0),  # 0-d
        lambda torch: torch.tensor([1.0, 2.0], requires_grad=True),
        lambda torch: torch.ones(1, 1, 1, dtype=torch.int16),
        lambda torch: torch.arange(6.0).view(2, 3).t(),  # not contiguous
        lambda torch: torch.arange(6).view(2, 3)[1],  # not at the start of its storage
    ],
    ids=["0-d", "requires_grad", "3-d", "transposed", "offset"],
)
def test_torch_small_tensors_keep_shape_strides_and_grad(make: Any) -> None:
    torch = pytest.importorskip("torch")
    tensor = make(torch)
    got = _over_the_wire(tensor)
    assert torch.equal(got.detach(), tensor.detach())
    assert got.shape == tensor.shape and got.stride() == tensor.stride()
    assert got.storage_offset() == tensor.storage_offset()
    assert got.requires_grad == tensor.requires_grad


def test_torch_small_slice_of_a_big_tensor_sends_only_the_slice() -> None:
    torch = pytest.importorskip("torch")
    big = torch.arange(1_000_000, dtype=torch.float64)
    header, buffers = dumps(big[123_457:123_467])
    assert sum(b.nbytes for b in buffers) < 1024
    got = loads(header, [bytearray(b) for b in buffers])
    assert got.tolist() == list(range(123_457, 123_467))
    assert got.untyped_storage().nbytes() < 1024


def test_torch_views_with_different_dtypes_share_a_trimmed_storage() -> None:
    torch = pytest.importorskip("torch")
    big = torch.zeros(1_000_000, dtype=torch.float64)
    as_int = big.view(torch.int32)
    header, buffers = dumps((big[1001:1003], as_int[2003:2007]))
    assert not buffers  # trimmed to a small block, which travels in the header
    assert len(header) < 1024
    floats, ints = loads(header, [bytearray(b) for b in buffers])
    floats[0] = 1.0  # the same write in the original shows what the int view should see
    big[1001] = 1.0
    assert ints.tolist() == as_int[2003:2007].tolist() != [0, 0, 0, 0]


def test_torch_requires_grad_and_parameters() -> None:
    torch = pytest.importorskip("torch")
    leaf = torch.ones(3, requires_grad=True)
    non_leaf = leaf * 2
    parameter = torch.nn.Parameter(torch.zeros(2))
    got_leaf, got_non_leaf, got_parameter, plain = _over_the_wire(
        [leaf, non_leaf, parameter, torch.ones(1)]
    )
    assert got_leaf.requires_grad and got_leaf.is_leaf
    assert got_non_leaf.requires_grad and got_non_leaf.is_leaf  # sent as data
    assert torch.equal(got_non_leaf.detach(), non_leaf.detach())
    assert isinstance(got_parameter, torch.nn.Parameter)
    assert not plain.requires_grad


def test_torch_lazy_conjugate_and_empty_tensors() -> None:
    torch = pytest.importorskip("torch")
    complex_tensor = torch.tensor([1 + 2j, 3 - 4j])
    conj, empty = _over_the_wire([complex_tensor.conj(), torch.zeros(0, 3)])
    assert torch.equal(conj, complex_tensor.conj())
    assert not conj.is_conj()
    assert empty.shape == (0, 3)


def test_torch_sparse_tensor_uses_torch_pickling() -> None:
    torch = pytest.importorskip("torch")
    sparse = torch.eye(3).to_sparse()
    result = _over_the_wire(sparse)
    assert result.is_sparse
    assert torch.equal(result.to_dense(), torch.eye(3))


def test_torch_meta_tensor_is_refused_with_advice() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(SerializationError, match=r"move it to the CPU first \(tensor.cpu\(\)\)"):
        dumps({"x": torch.empty(2, device="meta")})


def test_torch_storage_outlives_the_sender_tensor() -> None:
    torch = pytest.importorskip("torch")
    header, buffers = dumps(torch.full((1000,), 7.0))  # the tensor is dropped at once
    result = loads(header, [bytearray(b) for b in buffers])
    assert bool((result == 7.0).all())


def test_numpy_and_torch_together() -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    array = np.arange(6.0)
    tensor = torch.arange(6.0)
    got_array, got_tensor = _over_the_wire((array, tensor))
    assert np.array_equal(got_array, array)
    assert torch.equal(got_tensor, tensor)


# -- with the wire protocol ----------------------------------------------------------------


def _through_protocol(obj: object) -> tuple[Any, list[memoryview]]:
    """Send obj over a pair of protocol connections; the loaded object and raw buffers."""
    a = _protocol.Connection(key=None, identity=b"a")
    b = _protocol.Connection(key=None, identity=b"b")
    b.receive_data(a.initiate())
    a.receive_data(b.initiate())
    assert isinstance(a.next_event(), _protocol.HandshakeComplete)
    assert isinstance(b.next_event(), _protocol.HandshakeComplete)
    header, buffers = dumps(obj)
    parts = a.send_message(_protocol.MessageKind.REQUEST, 1, header, buffers)
    b.receive_data(b"".join(bytes(p) for p in parts))
    message = b.next_event()
    assert isinstance(message, _protocol.Message)
    return loads(message.header, message.buffers), message.buffers


def test_arrays_are_built_on_the_received_payload_without_copying() -> None:
    np = pytest.importorskip("numpy")
    base = np.arange(300_000, dtype=np.float64).reshape(1000, 300)
    (view, whole), raw = _through_protocol((base[::3, 1:], base))
    assert len(raw) == 1
    assert np.shares_memory(whole, np.frombuffer(raw[0], dtype=np.uint8))
    assert np.array_equal(view, base[::3, 1:])
    assert whole.ctypes.data % 64 == 0
    whole[0, 1] = -5.0
    assert view[0, 0] == -5.0


def test_tensors_are_built_on_the_received_payload_without_copying() -> None:
    torch = pytest.importorskip("torch")
    base = torch.randn(500, 600)
    (view, whole), raw = _through_protocol((base[:, 100:], base))
    assert len(raw) == 1
    assert torch.equal(view, base[:, 100:])
    address = ctypes.addressof(ctypes.c_char.from_buffer(raw[0]))
    assert whole.data_ptr() == address
    assert address % 64 == 0
    whole[0, 100] = 42.0
    assert view[0, 0] == 42.0
