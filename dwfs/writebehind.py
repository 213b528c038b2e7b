"""Write-behind over a volume: writes return once queued; a worker thread applies them.

Like the kernel's own writeback, a write is acknowledged before it reaches the volume, and an
error that happens later is reported by the next write, read, fsync or flush. The queue is
bounded in bytes, so a fast writer waits for the volume instead of filling memory.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from raid.volume import Volume

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 64 * 1024 * 1024


class WriteBehind:
    """An ordered queue of writes applied to a volume by one worker thread.

    It offers the volume's own read/write/flush/capacity, so the filesystem can use it in the
    volume's place: encoding parity and writing members then overlaps with the next request.
    """

    def __init__(self, volume: Volume, limit_bytes: int = DEFAULT_LIMIT) -> None:
        self.volume = volume
        self.limit = limit_bytes
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, bytes]] = deque()
        self._queued = 0
        self._submitted = 0  # writes queued so far
        self._applied = 0  # writes applied (or failed) so far, in queue order
        self._current: tuple[int, int] | None = None  # (offset, length) being applied
        self._error: OSError | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="write-behind", daemon=True)
        self._thread.start()

    def try_submit(self, offset: int, data: bytes) -> bool:
        """Queue a write if there is room; False if the caller must wait (use `submit`)."""
        with self._cond:
            self._raise_error()
            if self._queued and self._queued + len(data) > self.limit:
                return False
            self._append(offset, data)
            return True

    def submit(self, offset: int, data: bytes) -> None:
        """Queue a write, waiting for room."""
        with self._cond:
            self._raise_error()
            while self._queued and self._queued + len(data) > self.limit:
                self._cond.wait()
                self._raise_error()
            self._append(offset, data)

    @property
    def capacity(self) -> int:
        """The volume's usable bytes."""
        return self.volume.capacity

    @property
    def stripe_bytes(self) -> int:
        """The volume's bytes per stripe."""
        return self.volume.stripe_bytes

    def parity_only_chunks(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """The volume's chunks in those stripes that parity alone holds (see Volume)."""
        return self.volume.parity_only_chunks(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Queue a write (the data must not change afterwards), waiting for room."""
        self.submit(offset, data)

    def read(self, offset: int, length: int, caller_checks: bool = False) -> bytearray:
        """Read from the volume, after any queued write that overlaps the range (see
        `Volume.read` for `caller_checks`)."""
        with self._cond:
            cur = self._current
            if (cur is not None and cur[0] < offset + length and offset < cur[0] + cur[1]) or any(
                    o < offset + length and offset < o + len(d) for o, d in self._queue):
                while self._queue or self._current is not None:
                    self._cond.wait()
            self._raise_error()
        return self.volume.read(offset, length, caller_checks)

    def flush(self) -> None:
        """Apply every write queued so far and make the volume durable (writes queued
        meanwhile by other threads wait for a later flush)."""
        self.drain()
        self.volume.flush()

    def drain(self) -> None:
        """Wait until every write queued so far reached the volume; raise a deferred error if
        any."""
        with self._cond:
            target = self._submitted
            while self._applied < target:
                self._cond.wait()
            self._raise_error()

    def close(self) -> None:
        """Drain and stop the worker."""
        try:
            self.drain()
        finally:
            with self._cond:
                self._stop = True
                self._cond.notify_all()
            self._thread.join()

    def _append(self, offset: int, data: bytes) -> None:
        self._queue.append((offset, data))
        self._queued += len(data)
        self._submitted += 1
        self._cond.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue:
                    return
                offset, data = self._queue.popleft()
                self._current = (offset, len(data))
            try:
                self.volume.write(offset, data)
            except OSError as exc:
                log.error("deferred write of %d bytes at %d failed: %s", len(data), offset, exc)
                with self._cond:
                    if self._error is None:
                        self._error = exc
            finally:
                with self._cond:
                    self._current = None
                    self._queued -= len(data)
                    self._applied += 1
                    self._cond.notify_all()
