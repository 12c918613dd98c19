"""The in-process backend: worker threads in this process, over a store.

:class:`~dashboard.local.queue.WorkQueue` runs the threads and implements the
:class:`~dashboard.backend.Backend` seam; the store it sits on keeps every
piece of state: :class:`MemoryStore` in this process, :class:`SqliteStore` in
one file that every process on the machine shares. How threads claim, renew
and finish work (:class:`Store`) stays in here.
"""

from .memory import MemoryStore
from .queue import TaskContext, WorkQueue
from .sqlite import SqliteStore
from .store import Store

__all__ = ["MemoryStore", "SqliteStore", "Store", "TaskContext", "WorkQueue"]
