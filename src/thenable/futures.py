"""The ``torch.futures`` mirror: the same objects under torch's names.

Code written against ``torch.futures`` runs after changing only its import:

    from thenable.futures import Future, collect_all, wait_all
"""

from thenable._combinators import collect_all as collect_all
from thenable._combinators import wait_all as wait_all
from thenable._future import Future as Future

__all__ = ("Future", "collect_all", "wait_all")
