"""How Filesystem methods run: under its lock, and all-or-nothing when they change things."""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from vfs.errors import FSError
from vfs.metadb import DISK_FULL

if TYPE_CHECKING:
    from vfs.fs import Filesystem

log = logging.getLogger(__name__)

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


class Runs:
    """The part of Filesystem that runs its methods: savepoints, and the stop that follows a
    transaction the database dropped (a mixin: it uses the database, allocator and lock)."""

    _closed = False
    _stopped: str | None = None  # why the filesystem stopped serving, if it did
    _depth = 0

    def _attempt(self, func: Callable[..., T], args: tuple, kwargs: dict) -> T:
        """One all-or-nothing run of an operation (inside a savepoint)."""
        name = getattr(func, "__name__", func)
        self._stop_if_lost(name)  # (dropped where no operation saw it)
        self._depth += 1
        mark = self.alloc.mark()
        self.db.execute("SAVEPOINT op")
        try:
            result = func(self, *args, **kwargs)
        except BaseException as exc:
            self._stop_if_lost(name, exc)
            self.db.execute("ROLLBACK TO op")
            self.db.execute("RELEASE op")
            self.alloc.undo(mark)
            _raise_if_disk_full(exc, name)
            raise
        else:
            self.db.execute("RELEASE op")
            return result
        finally:
            self._depth -= 1

    @property
    def stopped(self) -> str | None:
        """Why the filesystem stopped serving (a transaction the database dropped), or None."""
        return self._stopped

    def _check_open(self) -> None:
        if self._closed:
            raise FSError(errno.EIO, "the filesystem is closed")
        if self._stopped is not None:
            raise FSError(errno.EIO, f"the filesystem stopped ({self._stopped}); unmount "
                          "and mount it again")

    def _stop_if_lost(self, where: str, exc: BaseException | None = None) -> None:
        """Stop (EIO) if the database dropped the open transaction: what this process holds
        (allocations, file data, counts) no longer matches it, so every later call fails with
        EIO. The next mount starts from the last commit, as after a crash (fsync'd data is
        kept)."""
        if not self.db.transaction_lost():
            return
        why = where if exc is None else f"{where}: {exc!r}"
        self._stopped = f"the metadata database dropped its open transaction in {why}"
        log.critical("%s: %s; every change since the last commit is lost and the filesystem "
                     "serves nothing more: unmount it and mount it again", self.db.path,
                     self._stopped)
        raise FSError(errno.EIO, self._stopped)

    def _commit_db(self) -> None:
        try:
            self.db.commit()
        except Exception as exc:
            self._stop_if_lost("commit", exc)
            _raise_if_disk_full(exc, "commit")
            raise


def _raise_if_disk_full(exc: BaseException, where: str) -> None:
    """ENOSPC in place of SQLite's full-disk error that cost only the statement."""
    if isinstance(exc, DISK_FULL):
        raise FSError(errno.ENOSPC, f"{where}: the metadata database's disk is full: {exc}"
                      ) from exc
