"""Thread pools shared by every volume in the process: made on first use, and anew in a forked
child (which has none of its parent's threads)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor


class SharedPool:
    """A thread pool of `threads` threads named `name`, started when first asked for."""

    def __init__(self, threads: int, name: str) -> None:
        self.threads = threads
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def get(self) -> ThreadPoolExecutor:
        """The pool, started if need be."""
        pool = self._pool
        if pool is None:
            with self._lock:
                pool = self._pool
                if pool is None:
                    pool = self._pool = ThreadPoolExecutor(self.threads,
                                                           thread_name_prefix=self.name)
        return pool

    def _forget(self) -> None:
        self._pool, self._lock = None, threading.Lock()
