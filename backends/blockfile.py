"""A member stored in a regular file (or block device) on the host."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import queue
import threading

from backends.devices import is_block_device
from backends.directwriter import DirectWriter, open_direct
from backends.member import Member, MemberIOError
from backends.vectored import DIRECT_ALIGN, preadv_all, pwritev_all

log = logging.getLogger(__name__)

WRITEBACK_KICK_BYTES = 8 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages now, without waiting for them."""
    if _sync_file_range is not None and _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE):
        err = ctypes.get_errno()
        log.debug("sync_file_range on fd %d failed: %s", fd, os.strerror(err))


class _Prefetcher:
    """One background thread that hands read-ahead hints to the kernel, so that the page-cache
    work a hint starts (allocating pages, submitting the reads) runs beside the reader."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[BlockFileMember, int, int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        os.register_at_fork(after_in_child=self._forget_thread)

    def submit(self, member: BlockFileMember, offset: int, length: int) -> None:
        """Queue a hint that `member`'s bytes [offset, offset + length) will be read soon."""
        if self._thread is None:
            with self._start:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="prefetch",
                                                    daemon=True)
                    self._thread.start()
        self._queue.put((member, offset, length))

    def _forget_thread(self) -> None:
        # A forked child has none of the parent's threads: start a new one when needed.
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._start = threading.Lock()

    def _run(self) -> None:
        while True:
            member, offset, length = self._queue.get()
            member.advise_willneed(offset, length)


_prefetcher = _Prefetcher()


class _Refused(OSError):
    """The file system refused a kind of read (O_DIRECT) rather than failing it."""


class BlockFileMember(Member):
    """A member backed by a host file: pread/pwrite, fdatasync on flush."""

    def __init__(self, path: str, fd: int, capacity: int) -> None:
        self.path = path
        self._fd = fd
        self.capacity = capacity
        self._unkicked = 0  # bytes written since writeback was last started
        self._fd_lock = threading.Lock()  # closing waits for a hint in flight on the fd
        # Whole aligned writes (chunks, rows of them) bypass the page cache in the background;
        # everything else on this member first waits for them (`_drain`).
        dfd = open_direct(path)
        self._direct = DirectWriter(path, dfd, fd) if dfd is not None else None
        # Reads bypass the page cache through the writer's descriptor too (readinto_uncached),
        # until the file refuses one.
        self._direct_reads = self._direct is not None

    def _drain(self) -> None:
        """Wait for the queued direct writes; a failed one fails this call."""
        if self._direct is not None:
            try:
                self._direct.drain()
            except OSError as exc:
                raise MemberIOError(self.path, "write", exc.strerror or str(exc)) from exc

    @classmethod
    def create(cls, path: str, capacity: int) -> BlockFileMember:
        """Create a new file of `capacity` bytes, its space reserved on the host.

        Refuses to overwrite an existing file. Reserving the space (fallocate) means the host
        file system cannot run out of room under the array later.
        """
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise MemberIOError(path, "create", exc.strerror or str(exc)) from exc
        try:
            try:
                os.posix_fallocate(fd, 0, capacity)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                log.info("member %s: cannot reserve space (%s); creating it sparse", path,
                         exc.strerror)
                os.ftruncate(fd, capacity)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            raise MemberIOError(path, "create", exc.strerror or str(exc)) from exc
        return cls(path, fd, capacity)

    @classmethod
    def open(cls, path: str) -> BlockFileMember:
        """Open an existing member file or block device; a device is claimed exclusively while
        open, as md claims its disks: it cannot be mounted or formatted meanwhile."""
        flags = os.O_RDWR | os.O_CLOEXEC
        if is_block_device(path):
            flags |= os.O_EXCL
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.EBUSY and flags & os.O_EXCL:
                raise MemberIOError(path, "open", "the device is in use (mounted, a member of "
                                    "another array, or opened exclusively by a program)"
                                    ) from exc
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
        self.readinto_many(offset, [buffer])

    def readinto_many(self, offset: int, buffers: list[memoryview]) -> None:
        # One preadv for the lot (sequential volume reads take several consecutive chunks of
        # each member).
        self._read(self._fd, offset, buffers)

    def readinto_uncached(self, offset: int, buffers: list[memoryview]) -> None:
        # O_DIRECT: the disk fills the buffers itself, and no page-cache pages are made for
        # data that the FUSE mount caches again above.
        direct = self._direct
        if (direct is None or not self._direct_reads or offset % DIRECT_ALIGN
                or any(len(b) % DIRECT_ALIGN for b in buffers)):
            self.readinto_many(offset, buffers)
            return
        try:
            self._read(direct.fd, offset, buffers, refused=errno.EINVAL)
        except _Refused as exc:
            log.warning("member %s: direct read refused (%s); reading through the page cache",
                        self.path, exc.strerror)
            self._direct_reads = False
            self.readinto_many(offset, buffers)

    def _read(self, fd: int, offset: int, buffers: list[memoryview], refused: int = 0) -> None:
        """Fill `buffers` from `fd` at `offset`; an error numbered `refused` raises _Refused."""
        total = sum(len(b) for b in buffers)
        self._check_range(offset, total, "read")
        self._drain()
        try:
            done = preadv_all(fd, buffers, offset)
        except OSError as exc:
            if refused and exc.errno == refused:
                raise _Refused(exc.errno, exc.strerror) from exc
            raise MemberIOError(self.path, "read", exc.strerror or str(exc)) from exc
        if done < total:
            raise MemberIOError(self.path, "read", f"short read at {offset + done}")

    def prefetch(self, offset: int, length: int) -> None:
        _prefetcher.submit(self, offset, length)

    def advise_willneed(self, offset: int, length: int) -> None:
        """Ask the kernel now to start reading [offset, offset + length) into its cache."""
        with self._fd_lock:
            if self._fd < 0:
                return
            try:
                os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
            except OSError as exc:  # only a hint: reading will report real failures
                log.debug("member %s: prefetch hint failed: %s", self.path, exc)

    def write_stream(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if (self._direct is None or not self._direct.usable or not view
                or (offset | len(view)) % DIRECT_ALIGN):
            self.write(offset, view)
            return
        self._check_range(offset, len(view), "write")
        try:
            self._direct.submit(offset, view)
        except OSError as exc:
            raise MemberIOError(self.path, "write", exc.strerror or str(exc)) from exc

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view), "write")
        self._drain()
        try:
            pwritev_all(self._fd, [view], offset)
        except OSError as exc:
            raise MemberIOError(self.path, "write", exc.strerror or str(exc)) from exc
        # Stream dirty pages to the disk as they accumulate, so that flush() has little left
        # to wait for and the disk works while the CPU computes parity.
        self._unkicked += len(view)
        if self._unkicked >= WRITEBACK_KICK_BYTES:
            self._unkicked = 0
            start_writeback(self._fd)

    def write_durable(self, offset: int, data: bytes | memoryview) -> None:
        # RWF_DSYNC makes just this write durable (its range and a cache flush), where
        # fdatasync would first write out every dirty page of the file.
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view), "write")
        self._drain()
        try:
            pwritev_all(self._fd, [view], offset, os.RWF_DSYNC)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise MemberIOError(self.path, "write", exc.strerror or str(exc)) from exc
            log.debug("member %s: RWF_DSYNC unsupported (%s); writing, then fdatasync",
                      self.path, exc)
            self.write(offset, view)
            self.flush()

    def flush(self) -> None:
        self._drain()
        self._unkicked = 0
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
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        with self._fd_lock:
            if self._fd >= 0:
                try:
                    os.close(self._fd)
                finally:
                    self._fd = -1
