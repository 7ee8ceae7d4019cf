"""torch, for the training layers (``thenable.autograd``, ``optim``, ``nn``): imported here so a
missing install gives one clear error instead of a bare ``No module named 'torch'``."""

from __future__ import annotations

try:
    import torch
except ImportError as exc:  # pragma: no cover - the test extra installs torch
    raise ImportError(
        "thenable.autograd, thenable.optim and thenable.nn train torch models and need torch: "
        "pip install 'thenable[torch]'"
    ) from exc

__all__ = ("torch",)
