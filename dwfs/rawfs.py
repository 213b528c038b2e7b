"""The raw mount: a FUSE filesystem holding one file, `volume`, that is the redundant volume."""

from __future__ import annotations

import errno
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyfuse3
import trio

from dwfs.writebehind import WriteBehind
from raid.volume import Volume

log = logging.getLogger(__name__)

VOLUME_NAME = b"volume"
VOLUME_INODE = pyfuse3.ROOT_INODE + 1
BLOCK = 4096


def fuse_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn OSErrors raised by lower layers into FUSE errors with the same errno."""

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await func(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            log.error("%s failed: %s", func.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc

    wrapper.__name__ = func.__name__
    return wrapper


class VolumeWorker:
    """One thread that runs volume calls for the event loop, one at a time, in arrival order.

    Unlike trio.to_thread with a CapacityLimiter(1), the thread starts the next queued call as
    soon as one returns, without waiting for the event loop to take the result and hand the
    next call over: sequential reads keep the volume busy while the loop replies to FUSE.
    """

    def __init__(self, name: str = "volume-worker") -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the worker thread: its result, or its exception raised here."""
        job = _Job(fn, args, trio.lowlevel.current_trio_token())
        self._jobs.put(job)
        # The volume call cannot be abandoned half way: a cancelled caller waits for it too.
        with trio.CancelScope(shield=True):
            await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        """Stop the thread once the calls queued so far are done."""
        self._jobs.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job.result = job.fn(*job.args)
            except Exception as exc:  # noqa: BLE001 - handed to the caller, who raises it
                job.error = exc
            try:
                job.token.run_sync_soon(job.done.set)
            except trio.RunFinishedError:
                log.warning("%s finished after the event loop stopped; its result is dropped",
                            getattr(job.fn, "__name__", job.fn))


class _Job:
    """A call queued for the VolumeWorker and, once done, its outcome."""

    __slots__ = ("fn", "args", "token", "done", "result", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple, token: trio.lowlevel.TrioToken) -> None:
        self.fn = fn
        self.args = args
        self.token = token
        self.done = trio.Event()
        self.result: Any = None
        self.error: Exception | None = None


class RawOperations(pyfuse3.Operations):
    """FUSE operations exposing a Volume as the single file `volume` in the mount's root."""

    enable_writeback_cache = False  # the kernel must not grow the file past the capacity

    def __init__(self, volume: Volume) -> None:
        super().__init__()
        self.volume = volume
        self.writes = WriteBehind(volume)
        # One request at a time reaches the volume (its lock would serialise them anyway), in
        # arrival order: two threads taking sequential reads out of order measured ~20% slower.
        self.worker = VolumeWorker()
        now = time.time_ns()
        self._mode = {pyfuse3.ROOT_INODE: stat.S_IFDIR | 0o755, VOLUME_INODE: stat.S_IFREG | 0o600}
        self._owner = {ino: (os.getuid(), os.getgid()) for ino in self._mode}
        self._times = {ino: [now, now, now] for ino in self._mode}  # atime, mtime, ctime

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.worker.run(fn, *args)

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode not in self._mode:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = self._mode[inode]
        a.st_nlink = 2 if inode == pyfuse3.ROOT_INODE else 1
        a.st_uid, a.st_gid = self._owner[inode]
        a.st_size = self.volume.capacity if inode == VOLUME_INODE else 0
        a.st_blksize = BLOCK
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = self._times[inode]
        a.entry_timeout = 300
        a.attr_timeout = 300
        return a

    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE and name == VOLUME_NAME:
            return self._attrs(VOLUME_INODE)
        if parent_inode == pyfuse3.ROOT_INODE and name in (b".", b".."):
            return self._attrs(pyfuse3.ROOT_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size and attr.st_size != self.volume.capacity:
            # The volume's size is its capacity; truncating it would lose nothing on the
            # members, but the kernel would then believe the file is shorter. Refuse it.
            log.warning("refusing to change the raw volume's size to %d bytes", attr.st_size)
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode:
            self._mode[inode] = (self._mode[inode] & ~0o7777) | (attr.st_mode & 0o7777)
        if fields.update_uid or fields.update_gid:
            uid, gid = self._owner[inode]
            self._owner[inode] = (
                attr.st_uid if fields.update_uid else uid,
                attr.st_gid if fields.update_gid else gid,
            )
        times = self._times[inode]
        if fields.update_atime:
            times[0] = attr.st_atime_ns
        if fields.update_mtime:
            times[1] = attr.st_mtime_ns
        times[2] = time.time_ns()
        return self._attrs(inode)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, VOLUME_NAME, self._attrs(VOLUME_INODE), 1)

    async def releasedir(self, fh):
        return None

    async def open(self, inode, flags, ctx):
        if inode != VOLUME_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC:
            log.warning("refusing O_TRUNC on the raw volume (its size is its capacity)")
            raise pyfuse3.FUSEError(errno.EPERM)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    def _read(self, off: int, size: int) -> np.ndarray:
        self.writes.drain()
        return self.volume.read_array(off, size)

    def sync(self) -> None:
        """Apply every queued write and make the volume durable."""
        self.writes.drain()
        self.volume.flush()

    @fuse_errors
    async def read(self, fh, off, size):
        return await self._run(self._read, off, size)

    @fuse_errors
    async def write(self, fh, off, buf):
        if off >= self.volume.capacity:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        n = min(len(buf), self.volume.capacity - off)
        data = buf if n == len(buf) else buf[:n]
        if not self.writes.try_submit(off, data):
            await self._run(self.writes.submit, off, data)
        self._times[VOLUME_INODE][1] = self._times[VOLUME_INODE][2] = time.time_ns()
        return n

    @fuse_errors
    async def fsync(self, fh, datasync):
        await self._run(self.sync)

    @fuse_errors
    async def release(self, fh):
        await self._run(self.sync)

    async def flush(self, fh):
        return None

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLOCK
        s.f_frsize = BLOCK
        s.f_blocks = self.volume.capacity // BLOCK
        s.f_bfree = 0
        s.f_bavail = 0
        s.f_files = 2
        s.f_ffree = 0
        s.f_favail = 0
        s.f_namemax = 255
        return s

    async def create(self, parent_inode, name, mode, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)
