"""The lock that lets one process at a time assemble a warehouse's array (light to import: the
command line checks it before deciding whether to ask the mount's daemon)."""

from __future__ import annotations

import fcntl
import os

LOCK_NAME = ".dwfs.lock"


class WarehouseLock:
    """An exclusive lock on a warehouse: one process at a time assembles its array."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(os.path.abspath(directory), LOCK_NAME)
        self._fd = -1

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False if another process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        """The pid written by the process holding the lock, if any."""
        try:
            with open(self.path, encoding="ascii") as f:
                return f.read().strip()
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
