"""thenable.nn: ``RemoteModule``, the counterpart of ``torch.distributed.nn``'s.

    from thenable.nn import RemoteModule   # was: from torch.distributed.nn import RemoteModule

Needs torch (``pip install 'thenable[torch]'``).
"""

from thenable.nn._remote_module import RemoteModule as RemoteModule

__all__ = ("RemoteModule",)
