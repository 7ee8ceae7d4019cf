"""Validation of the CUDA ``devices`` a Future may carry, as in ``torch.futures.Future``.

Design note (CUDA stream semantics, a later issue): torch records an event on each current stream
of these devices in ``set_result`` and makes consumers (``wait``, ``then`` callbacks) wait on those
events on their own current streams, so a value can be handed over before its kernels finish.
thenable keeps the device list and its inheritance by ``then`` children so that code written for
torch runs unchanged; the event/stream handshake is not done yet, so a producer must synchronize
its stream before ``set_result`` when passing CUDA tensors between streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# What users may pass: device indices, strings like "cuda:0", or torch.device objects.
DeviceSpec = Sequence[Any] | None


def normalize(devices: DeviceSpec) -> tuple[Any, ...]:
    """Return ``devices`` as a tuple of distinct ``torch.device`` CUDA devices.

    Raises:
        TypeError: ``devices`` is not a list of ints, strings or torch.device objects.
        RuntimeError: torch with CUDA is not available in this process.
        ValueError: an entry is not a CUDA device, or names a device index that does not exist.
    """
    if devices is None:
        return ()
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
        raise TypeError(
            f"devices must be a list of CUDA devices (ints, 'cuda:N' strings or torch.device), "
            f"got {type(devices).__qualname__}"
        )
    if not devices:
        return ()
    torch = _torch_with_cuda(devices)
    result: list[Any] = []
    for entry in devices:
        if isinstance(entry, bool) or not isinstance(entry, (int, str, torch.device)):
            raise TypeError(
                f"devices entries must be ints, strings or torch.device, got {entry!r} "
                f"of type {type(entry).__qualname__}"
            )
        device = torch.device("cuda", entry) if isinstance(entry, int) else torch.device(entry)
        if device.type != "cuda":
            raise ValueError(
                f"devices lists CUDA devices only; {entry!r} is a {device.type} device "
                "(CPU values need no entry: leave devices empty)"
            )
        index = torch.cuda.current_device() if device.index is None else device.index
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(
                f"device {entry!r} does not exist: this process sees "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
        device = torch.device("cuda", index)
        if device not in result:
            result.append(device)
    return tuple(result)


def _torch_with_cuda(devices: Sequence[Any]) -> Any:
    """Import torch and check CUDA is usable, or explain why devices cannot be given."""
    try:
        import torch
    except ImportError:
        raise RuntimeError(
            f"Future(devices={list(devices)!r}) needs torch with CUDA, but torch is not "
            "installed; leave devices empty for CPU values"
        ) from None
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"Future(devices={list(devices)!r}) needs CUDA, but torch.cuda.is_available() is "
            "False in this process; leave devices empty for CPU values"
        )
    return torch
