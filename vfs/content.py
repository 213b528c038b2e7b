"""Filesystem methods for open files and their contents: open and release, read, write and
truncate, with space promised before a write is accepted; and the kernel's references to
directories, which keep a removed directory alive as an open keeps a file."""

from __future__ import annotations

import errno
import os
import stat

from vfs.attrs import Attr
from vfs.errors import FSError
from vfs.filedata import BLOCK, SECTORS_PER_BLOCK
from vfs.ops import now_ns, operation, query

MAX_FILE_SIZE = 1 << 44  # 16 TiB, as ext4 with 4 KiB blocks


class ContentOps:
    """Open files and their contents for Filesystem (a mixin: it uses the inode helpers, the
    lock and the FileData of Filesystem)."""

    @operation
    def open(self, ino: int, flags: int) -> Attr:
        """Open an inode; O_TRUNC empties a regular file (even opened O_RDONLY, as Linux does:
        the kernel has checked write permission)."""
        r = self._row(ino)
        if flags & os.O_TRUNC and stat.S_ISREG(r[1]):
            if r[5]:
                self._truncate(r, 0)
            self._touch(ino)
        self.opens[ino] = self.opens.get(ino, 0) + 1
        return self._attr(self._row(ino))

    @operation
    def release(self, ino: int) -> None:
        """Close one open of an inode; an unlinked inode goes with its last close."""
        n = self.opens.get(ino, 0) - 1
        if n > 0:
            self.opens[ino] = n
            return
        self.opens.pop(ino, None)
        self._maybe_free(ino)

    def remember(self, ino: int) -> None:
        """The kernel now holds one more reference to directory `ino` (an entry it was
        given): a removed directory lives on while the kernel holds it, for a process whose
        working directory it is."""
        with self._refs_lock:  # not the filesystem lock: called from the FUSE session's threads
            self.dir_refs[ino] = self.dir_refs.get(ino, 0) + 1

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped `count` references to inode `ino` (only a directory's count
        matters: a file lives while it has names or is open)."""
        with self._refs_lock:
            held = self.dir_refs.get(ino)
            if held is None:
                return
            if held > count:
                self.dir_refs[ino] = held - count
                return
            del self.dir_refs[ino]
        self._free_if_unlinked(ino)

    @operation
    def _free_if_unlinked(self, ino: int) -> None:
        self._maybe_free(ino)

    def _check_truncatable(self, r: tuple, size: int) -> None:
        if stat.S_ISDIR(r[1]):
            raise FSError(errno.EISDIR, f"inode {r[0]} is a directory")
        if not stat.S_ISREG(r[1]):
            raise FSError(errno.EINVAL, f"inode {r[0]} is not a regular file")
        if size < 0:
            raise FSError(errno.EINVAL, f"negative size {size}")
        if size > MAX_FILE_SIZE:
            raise FSError(errno.EFBIG, f"size {size} is past the largest file ({MAX_FILE_SIZE})")

    def _truncate(self, r: tuple, size: int) -> None:
        self._check_truncatable(r, size)
        if size < r[5] and size % BLOCK:
            self._reserve(r[0], size // BLOCK, size // BLOCK)
        self.data.truncate(r[0], r[5], size)
        self.db.change("UPDATE inodes SET size=? WHERE id=?", (size, r[0]))

    @query
    def read(self, ino: int, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Up to `length` bytes at `offset`; updates atime as relatime does."""
        r = self._row(ino)
        if stat.S_ISDIR(r[1]):
            raise FSError(errno.EISDIR, f"inode {ino} is a directory")
        if offset < 0:
            raise FSError(errno.EINVAL, f"negative offset {offset}")
        data = self.data.read(ino, r[5], offset, length)
        self._accessed(r)
        return data

    def _blocks_short(self, ino: int, first: int, last: int) -> int:
        """How many blocks' worth of free space are missing to make blocks first..last of a
        file dirty.

        Space is promised before it is used: every dirty block (and every block a change is
        about to dirty) may need a block of new sectors when it is written out
        (copy-on-write), so a write accepted now can always be stored by the next commit.
        Any free sector counts (a block may be stored in fragments), except the room kept
        for the next metadata copy.
        """
        dirty = self.data.dirty.get(ino, {})
        if last - first < len(dirty):
            already = sum(1 for b in range(first, last + 1) if b in dirty)
        else:
            already = sum(1 for b in dirty if first <= b <= last)
        blocks = self.data.dirty_blocks + (last - first + 1) - already
        need = blocks * SECTORS_PER_BLOCK + self.copy_reserve
        return max(0, -(-(need - self.alloc.free_count) // SECTORS_PER_BLOCK))

    def _reserve(self, ino: int, first: int, last: int) -> None:
        """Make sure blocks first..last of a file can become dirty, else raise ENOSPC.

        Sectors freed since the last commit (deleted files, overwritten blocks) become usable
        only after a commit, so one is made when the free ones do not suffice.
        """
        if not self._blocks_short(ino, first, last):
            return
        if self._depth == 0 and (self.alloc.held_count or self.needs_commit()):
            self.commit()
        short = self._blocks_short(ino, first, last)
        if short:
            raise FSError(errno.ENOSPC, f"no space left on the volume ({short} blocks short)")

    def _check_write(self, ino: int, offset: int, n: int) -> tuple:
        r = self._row(ino)
        if not stat.S_ISREG(r[1]):
            raise FSError(errno.EISDIR if stat.S_ISDIR(r[1]) else errno.EINVAL,
                          f"inode {ino} is not a regular file")
        if offset < 0:
            raise FSError(errno.EINVAL, f"negative offset {offset}")
        if offset + n > MAX_FILE_SIZE:
            raise FSError(errno.EFBIG, f"write past the largest file size ({MAX_FILE_SIZE})")
        return r

    def write(self, ino: int, offset: int, data: bytes | memoryview,
              keep_times: bool = False) -> int:
        """Write bytes at `offset`; returns how many were written. `keep_times` stores
        content without changing mtime and ctime (a ghost's content arriving).

        ENOSPC comes before anything changes: a failed write leaves the file as it was.
        """
        with self.lock:
            self._check_open()
            n = len(data)
            self._check_write(ino, offset, n)
            if n:
                self._reserve(ino, offset // BLOCK, (offset + n - 1) // BLOCK)
            return self._write(ino, offset, data, keep_times)

    @operation
    def _write(self, ino: int, offset: int, data: bytes | memoryview,
               keep_times: bool = False) -> int:
        r = self._check_write(ino, offset, len(data))
        n = len(data)
        if n == 0:
            return 0
        new_size = self.data.write(ino, r[5], offset, data)
        if keep_times:
            if new_size != r[5]:
                self.db.change("UPDATE inodes SET size=? WHERE id=?", (new_size, ino))
            return n
        now = now_ns()
        self.db.change("UPDATE inodes SET size=?, mtime_ns=?, ctime_ns=? WHERE id=?",
                       (new_size, now, now, ino))
        return n

    @operation
    def drop_content(self, ino: int) -> None:
        """Free every stored block of a file, keeping its size (it reads as a hole until
        its content is stored again: only for ghosts, whose reads are guarded)."""
        self.data.drop(ino)
        self.db.change("UPDATE inodes SET sectors=0 WHERE id=?", (ino,))
