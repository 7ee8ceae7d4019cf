"""thenable.optim: ``DistributedOptimizer``, the counterpart of ``torch.distributed.optim``'s.

    from thenable.optim import DistributedOptimizer   # was: from torch.distributed.optim ...

Needs torch (``pip install 'thenable[torch]'``).
"""

from thenable.optim._distributed import DistributedOptimizer as DistributedOptimizer

__all__ = ("DistributedOptimizer",)
