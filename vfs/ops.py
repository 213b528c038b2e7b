"""How Filesystem methods run: under its lock, and all-or-nothing when they change things."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from vfs.fs import Filesystem

T = TypeVar("T")


def now_ns() -> int:
    """The time now, in nanoseconds."""
    return time.time_ns()


def operation(func: Callable[..., T]) -> Callable[..., T]:
    """Run a method under the lock, all-or-nothing: a failure undoes its partial changes."""

    @functools.wraps(func)
    def wrapper(self: Filesystem, *args: Any, **kwargs: Any) -> T:
        with self.lock:
            self._check_open()
            if self._depth:
                return func(self, *args, **kwargs)
            return self._attempt(func, args, kwargs)

    return wrapper


def query(func: Callable[..., T]) -> Callable[..., T]:
    """Run a read-only method under the lock. No savepoint: it changes nothing, or only what
    one statement or one in-memory count does (atime on reading, open counts), which cannot be
    left half done."""

    @functools.wraps(func)
    def wrapper(self: Filesystem, *args: Any, **kwargs: Any) -> T:
        with self.lock:
            self._check_open()
            return func(self, *args, **kwargs)

    return wrapper
