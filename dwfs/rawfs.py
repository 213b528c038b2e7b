"""The raw mount: a FUSE filesystem holding one file, `volume`, that is the redundant volume."""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass

import numpy as np

from dwfs import fuseabi as abi
from dwfs.fusehandlers import Handlers
from dwfs.fusesession import Request
from dwfs.writebehind import WriteBehind
from raid.volume import Volume
from vfs.attrs import Attr, SetAttr, without_setid

log = logging.getLogger(__name__)

VOLUME_NAME = b"volume"
VOLUME_INODE = abi.ROOT_ID + 1
BLOCK = 4096
CACHE_SECONDS = 300.0


@dataclass
class _Node:
    """What the raw mount keeps of its two inodes (nothing of it is stored)."""

    ino: int
    mode: int
    uid: int
    gid: int
    times: list[int]  # atime, mtime, ctime


class RawOperations(Handlers):
    """FUSE requests answered with a Volume shown as the single file `volume` in the mount's
    root. One request at a time reaches the volume (its lock would serialise them anyway), in
    arrival order on the worker: two threads taking sequential reads out of order measured ~20%
    slower."""

    def __init__(self, volume: Volume) -> None:
        super().__init__(threading.Lock(), "volume-worker")
        self.volume = volume
        self.writes = WriteBehind(volume)
        now = time.time_ns()
        self._nodes = {
            ino: _Node(ino, mode, os.getuid(), os.getgid(), [now, now, now])
            for ino, mode in ((abi.ROOT_ID, stat.S_IFDIR | 0o755),
                              (VOLUME_INODE, stat.S_IFREG | 0o600))
        }

    def _attr(self, inode: int) -> Attr:
        n = self._nodes.get(inode)
        if n is None:
            raise OSError(errno.ENOENT, f"no inode {inode} in a raw mount")
        size = self.volume.capacity if inode == VOLUME_INODE else 0
        return Attr(ino=inode, mode=n.mode, nlink=2 if inode == abi.ROOT_ID else 1, uid=n.uid,
                    gid=n.gid, size=size, rdev=0, atime_ns=n.times[0], mtime_ns=n.times[1],
                    ctime_ns=n.times[2], blocks=(size + 511) // 512, blksize=BLOCK)

    def _entry(self, inode: int) -> bytes:
        return abi.pack_entry(self._attr(inode), CACHE_SECONDS, CACHE_SECONDS)

    def getattr(self, r: Request, node: int) -> None:
        self.meta(r, None, lambda: abi.pack_attr_out(self._attr(node), CACHE_SECONDS))

    def lookup(self, r: Request, parent: int, name: bytes) -> None:
        if parent == abi.ROOT_ID and name == VOLUME_NAME:
            self.meta(r, None, self._entry, VOLUME_INODE)
        elif parent == abi.ROOT_ID and name in (b".", b".."):
            self.meta(r, None, self._entry, abi.ROOT_ID)
        else:
            r.fail(errno.ENOENT)

    def setattr(self, r: Request, node: int, ch: SetAttr) -> None:
        self.meta(r, None, self._setattr, node, ch)

    def _setattr(self, inode: int, ch: SetAttr) -> bytes:
        if ch.size is not None and ch.size != self.volume.capacity:
            # The volume's size is its capacity; truncating it would lose nothing on the
            # members, but the kernel would then believe the file is shorter. Refuse it.
            raise OSError(errno.EPERM, f"refusing to change the raw volume's size to {ch.size} "
                                       "bytes")
        n = self._nodes[inode]
        if ch.mode is not None:
            n.mode = (n.mode & ~0o7777) | (ch.mode & 0o7777)
        if ch.kill_setid:
            n.mode = without_setid(n.mode)
        n.uid = n.uid if ch.uid is None else ch.uid
        n.gid = n.gid if ch.gid is None else ch.gid
        if ch.atime_ns is not None:
            n.times[0] = ch.atime_ns
        if ch.mtime_ns is not None:
            n.times[1] = ch.mtime_ns
        n.times[2] = time.time_ns()
        return abi.pack_attr_out(self._attr(inode), CACHE_SECONDS)

    def opendir(self, r: Request, node: int) -> None:
        if node != abi.ROOT_ID:
            r.fail(errno.ENOTDIR)
        else:
            r.reply(abi.OPEN_OUT.pack(node, 0, 0))

    def readdir(self, r: Request, fh: int, offset: int, size: int, plus: bool) -> None:
        if offset != 0:
            r.reply()
            return
        a = self._attr(VOLUME_INODE)
        item = abi.pack_dirent(VOLUME_INODE, 1, VOLUME_NAME, a.mode)
        r.reply(self._entry(VOLUME_INODE) + item if plus else item)

    def releasedir(self, r: Request, fh: int) -> None:
        r.reply()

    def open(self, r: Request, node: int, flags: int, kill_setid: bool = False) -> None:
        # (an O_TRUNC that would clear setid bits, kill_setid, is refused like any other)
        if node != VOLUME_INODE:
            r.fail(errno.EISDIR)
        elif flags & os.O_TRUNC:
            log.warning("refusing O_TRUNC on the raw volume (its size is its capacity)")
            r.fail(errno.EPERM)
        else:
            r.reply(abi.OPEN_OUT.pack(node, abi.FOPEN_KEEP_CACHE, 0))

    def _read(self, off: int, size: int) -> np.ndarray:
        self.writes.drain()
        return self.volume.read_array(off, size)

    def sync(self) -> None:
        """Apply every queued write and make the volume durable."""
        self.writes.drain()
        self.volume.flush()

    def read(self, r: Request, fh: int, offset: int, size: int) -> None:
        self.data(r, None, self._read, offset, size)

    def write(self, r: Request, fh: int, offset: int, data: bytes,
              kill_setid: bool = False) -> None:
        if offset >= self.volume.capacity:
            r.fail(errno.ENOSPC)
            return
        n = min(len(data), self.volume.capacity - offset)
        part = data if n == len(data) else data[:n]
        node = self._nodes[VOLUME_INODE]
        if kill_setid:
            node.mode = without_setid(node.mode)
        times = node.times
        times[1] = times[2] = time.time_ns()
        if self.writes.try_submit(offset, part):
            r.reply(abi.WRITE_OUT.pack(n, 0))
        else:
            self.data(r, lambda _: abi.WRITE_OUT.pack(n, 0), self.writes.submit, offset, part)

    def fsync(self, r: Request, fh: int, datasync: bool) -> None:
        self.data(r, None, self.sync)

    def release(self, r: Request, fh: int) -> None:
        self.data(r, None, self.sync)

    def flush(self, r: Request, node: int) -> None:
        r.reply()

    def statfs(self, r: Request, node: int) -> None:
        blocks = self.volume.capacity // BLOCK
        r.reply(abi.KSTATFS.pack(blocks, 0, 0, 2, 0, BLOCK, 255, BLOCK, 0))

    def create(self, r: Request, parent: int, name: bytes, mode: int, flags: int) -> None:
        r.fail(errno.EPERM)

    def mkdir(self, r: Request, parent: int, name: bytes, mode: int) -> None:
        r.fail(errno.EPERM)

    def mknod(self, r: Request, parent: int, name: bytes, mode: int, rdev: int) -> None:
        r.fail(errno.EPERM)

    def unlink(self, r: Request, parent: int, name: bytes) -> None:
        r.fail(errno.EPERM)
