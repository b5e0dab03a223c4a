"""Context parallelism: Ulysses x Ring hybrid attention over a sequence sharded in a zigzag layout."""

from feixing.context_parallel.accounting import CommCounter
from feixing.context_parallel.api import ContextParallel

__all__ = ["CommCounter", "ContextParallel"]
