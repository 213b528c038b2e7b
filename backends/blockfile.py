"""A member stored in a regular file (or block device) on the host."""

from __future__ import annotations

import logging
import os

from backends.member import Member, MemberIOError

log = logging.getLogger(__name__)


class BlockFileMember(Member):
    """A member backed by a host file: pread/pwrite, fdatasync on flush."""

    def __init__(self, path: str, fd: int, capacity: int) -> None:
        self.path = path
        self._fd = fd
        self.capacity = capacity

    @classmethod
    def create(cls, path: str, capacity: int) -> BlockFileMember:
        """Create a new sparse file of `capacity` bytes; refuses to overwrite an existing one."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise MemberIOError(path, "create", exc.strerror or str(exc)) from exc
        try:
            os.ftruncate(fd, capacity)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            raise MemberIOError(path, "create", exc.strerror or str(exc)) from exc
        return cls(path, fd, capacity)

    @classmethod
    def open(cls, path: str) -> BlockFileMember:
        """Open an existing member file or block device."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise MemberIOError(path, "open", exc.strerror or str(exc)) from exc
        try:
            capacity = os.lseek(fd, 0, os.SEEK_END)
        except OSError as exc:
            os.close(fd)
            raise MemberIOError(path, "open", exc.strerror or str(exc)) from exc
        return cls(path, fd, capacity)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buffer: memoryview) -> None:
        self._check_range(offset, len(buffer), "read")
        done = 0
        total = len(buffer)
        try:
            while done < total:
                n = os.preadv(self._fd, [buffer[done:]], offset + done)
                if n == 0:
                    raise MemberIOError(self.path, "read", f"short read at {offset + done}")
                done += n
        except OSError as exc:
            if isinstance(exc, MemberIOError):
                raise
            raise MemberIOError(self.path, "read", exc.strerror or str(exc)) from exc

    def prefetch(self, offset: int, length: int) -> None:
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError as exc:  # only a hint: reading will report real failures
            log.debug("member %s: prefetch hint failed: %s", self.path, exc)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view), "write")
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
        except OSError as exc:
            raise MemberIOError(self.path, "write", exc.strerror or str(exc)) from exc

    def flush(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise MemberIOError(self.path, "flush", exc.strerror or str(exc)) from exc

    def check(self) -> None:
        try:
            st = os.fstat(self._fd)
        except OSError as exc:
            raise MemberIOError(self.path, "check", exc.strerror or str(exc)) from exc
        if st.st_nlink == 0:
            raise MemberIOError(self.path, "check", "the file was deleted")

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            finally:
                self._fd = -1
