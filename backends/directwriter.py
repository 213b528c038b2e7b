"""Whole, aligned writes to a member file done in the background with O_DIRECT.

Copying a write into the page cache cost the mount daemon more CPU than computing its parity
(in this kind of virtual machine every new page-cache page is expensive), and the page cache
gains nothing from member data that the FUSE mount caches again above. A member hands each
aligned write to its `DirectWriter`: the bytes are copied into one of the writer's own
aligned buffers (cheap: they are reused and warm) and a thread of the writer's own writes them
in order, joining writes that follow one another on the file into one call. The member waits
for the queue to empty (`drain`) before anything that must see or order after those writes:
reads, other writes, flushes and closing.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import weakref
from collections import deque

import numpy as np

from backends.vectored import aligned_empty, pwritev_all

log = logging.getLogger(__name__)

QUEUE_BYTES = 8 * 1024 * 1024  # bytes queued at most per member; a writer beyond waits
JOIN_BYTES = 1024 * 1024  # bytes joined into one write at most
_IOV_MAX = 1024

_writers: weakref.WeakSet[DirectWriter] = weakref.WeakSet()


def open_direct(path: str) -> int | None:
    """A descriptor of `path` for direct reads and writes, or None where the file system has
    none."""
    try:
        return os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        log.info("member %s: no direct I/O (%s); writing through the page cache", path,
                 exc.strerror)
        return None


class DirectWriter:
    """The queue of direct writes of one member file, and the thread that does them."""

    def __init__(self, path: str, fd: int, buffered_fd: int) -> None:
        self.path = path
        self.fd = fd
        self.buffered_fd = buffered_fd  # where writes go if the file refuses direct ones
        self.usable = True  # False once the file refused a direct write as such (EINVAL)
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, np.ndarray]] = deque()
        self._queued = 0  # bytes queued or being written
        self._busy = False
        self._waiting = 0  # bytes queued and not yet taken by the thread
        self._draining = 0  # callers waiting for the queue to empty
        self._error: OSError | None = None
        self._free: dict[int, list[np.ndarray]] = {}  # reusable buffers by size
        self._thread: threading.Thread | None = None
        self._stop = False
        _writers.add(self)

    def submit(self, offset: int, view: memoryview) -> None:
        """Queue a write of `view` (a whole number of DIRECT_ALIGN blocks) at `offset`, an
        aligned offset; raises the error of an earlier queued write instead, if one failed."""
        n = len(view)
        with self._cond:
            self._raise_error()
            while self._queued and self._queued + n > QUEUE_BYTES:
                self._draining += 1  # wake the thread even if little is queued: make room
                self._cond.notify_all()
                try:
                    self._cond.wait()
                finally:
                    self._draining -= 1
                self._raise_error()
            free = self._free.get(n)
            buf = free.pop() if free else None
            self._queued += n
        if buf is None:
            buf = aligned_empty(n)
        buf[:] = np.frombuffer(view, dtype=np.uint8)
        with self._cond:
            self._queue.append((offset, buf))
            self._waiting += n
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="direct-writer",
                                                daemon=True)
                self._thread.start()
            # The thread sleeps until it can write much at once, or until someone drains: a
            # drain waiting since before this write must not wait for more writes to come.
            if (self._waiting >= JOIN_BYTES or self._queued >= QUEUE_BYTES // 2
                    or self._draining):
                self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every queued write is done; raises the error of one that failed."""
        if not self._queued and self._error is None:
            return  # nothing queued by this caller or before it (reads need no lock here)
        with self._cond:
            self._wait_empty()
            self._raise_error()

    def close(self) -> None:
        """Finish the queued writes, stop the thread and close the descriptor (errors are the
        caller's to drain first)."""
        with self._cond:
            self._wait_empty()
            self._stop = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        os.close(self.fd)
        if self._error is not None:
            log.error("member %s: a direct write failed before closing: %s", self.path,
                      self._error)

    def _wait_empty(self) -> None:
        """Under the lock: have the thread write what is queued, and wait until it has."""
        self._draining += 1
        self._cond.notify_all()
        try:
            while self._queue or self._busy:
                self._cond.wait()
        finally:
            self._draining -= 1

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _take(self) -> list[tuple[int, np.ndarray]]:
        """The next writes, joined while each starts where the previous ends."""
        first = self._queue.popleft()
        run, end, size = [first], first[0] + len(first[1]), len(first[1])
        while (self._queue and self._queue[0][0] == end and size < JOIN_BYTES
               and len(run) < _IOV_MAX):
            item = self._queue.popleft()
            run.append(item)
            end += len(item[1])
            size += len(item[1])
        return run

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (
                        not self._queue or (self._waiting < JOIN_BYTES and not self._draining
                                            and self._queued < QUEUE_BYTES // 2)):
                    self._cond.wait()
                if not self._queue:
                    return
                run = self._take()
                self._waiting -= sum(len(buf) for _o, buf in run)
                self._busy = True
            error = self._write(run)
            with self._cond:
                self._busy = False
                for _offset, buf in run:
                    self._queued -= len(buf)
                    self._free.setdefault(len(buf), []).append(buf)
                if error is not None:
                    if self._error is None:
                        self._error = error
                    for _offset, buf in self._queue:  # not written: the member has failed
                        self._queued -= len(buf)
                    self._queue.clear()
                    self._waiting = 0
                self._cond.notify_all()

    def _write(self, run: list[tuple[int, np.ndarray]]) -> OSError | None:
        offset = run[0][0]
        views = [memoryview(buf) for _o, buf in run]
        total = sum(len(v) for v in views)
        try:
            try:
                pwritev_all(self.fd if self.usable else self.buffered_fd, views, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.usable:
                    raise
                # A file system that opens with O_DIRECT but refuses such writes (alignment
                # it wants larger, or none at all): write through the page cache from now on.
                log.warning("member %s: direct write refused (%s); writing through the page "
                            "cache", self.path, exc.strerror)
                self.usable = False
                pwritev_all(self.buffered_fd, views, offset)
        except OSError as exc:
            log.error("member %s: direct write of %d bytes at %d failed: %s", self.path,
                      total, offset, exc.strerror)
            return exc
        except Exception as exc:  # noqa: BLE001 - a bug here must fail the member, not hang it
            log.exception("member %s: direct write of %d bytes at %d failed", self.path,
                          total, offset)
            return OSError(errno.EIO, f"direct write failed: {exc!r}")
        return None

    def _forget_thread(self) -> None:
        self._thread = None
        self._cond = threading.Condition()
        self._queue.clear()
        self._queued = 0
        self._waiting = 0
        self._draining = 0
        self._busy = False


def _after_fork_in_child() -> None:
    # A forked child has none of the parent's threads (nor its queued writes).
    for w in list(_writers):
        w._forget_thread()


os.register_at_fork(after_in_child=_after_fork_in_child)
