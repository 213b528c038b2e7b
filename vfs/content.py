"""Filesystem methods for open files and their contents: open and release, read, write and
truncate, with space promised before a write is accepted; and the kernel's references to
directories, which keep a removed directory alive as an open keeps a file."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable

from vfs.alloc import SECTOR
from vfs.attrs import Attr, without_setid
from vfs.errors import FSError
from vfs.filedata import BLOCK, SECTORS_PER_BLOCK
from vfs.metacopy import copy_reserve
from vfs.ops import now_ns, operation, query

log = logging.getLogger(__name__)

MAX_FILE_SIZE = (1 << 44) - 4096  # 16 TiB less a block: ext4's largest file (4 KiB blocks)
FREE_BATCH = 256  # forgotten unlinked inodes without data freed together
FORGET_WAIT = 1.0  # seconds a write short of space waits for the FORGET of removed files
# fallocate(2) modes (linux/falloc.h)
KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE = 0x01, 0x02, 0x08, 0x10


class ContentOps:
    """Open files and their contents for Filesystem (a mixin: it uses the inode helpers, the
    lock and the FileData of Filesystem)."""

    @operation
    def open(self, ino: int, flags: int, kill_setid: bool = False) -> Attr:
        """Open an inode; O_TRUNC empties a regular file (even opened O_RDONLY, as Linux does:
        the kernel has checked write permission), and with `kill_setid` (an opener without
        CAP_FSETID) clears its setid bits as a write would."""
        r = self._row(ino)
        self.refuse_open(ino, flags)
        if flags & os.O_TRUNC and stat.S_ISREG(r[1]):
            if r[5]:
                self._truncate(r, 0)
            self._touch(ino)
            if kill_setid:
                self._kill_setid(r)
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
        """The kernel now holds one more reference to inode `ino` (an entry it was given). An
        inode whose last name goes lives on while the kernel holds it, as while it is open:
        the kernel may still send requests for it (a file opened by a path that a rename
        replaced a moment before, a directory that is a process's working directory)."""
        with self._refs_cond:  # not the filesystem lock: called from the FUSE session's threads
            self.kernel_refs[ino] = self.kernel_refs.get(ino, 0) + 1

    def forget(self, items: list[tuple[int, int]]) -> None:
        """The kernel dropped references: (inode, count) pairs; an unlinked inode it no longer
        holds is freed (`drop_refs`, then `free_forgotten`)."""
        released = self.drop_refs(items)
        if released:
            self.free_forgotten(released)

    def drop_refs(self, items: list[tuple[int, int]]) -> list[int]:
        """Count the references the kernel dropped, (inode, count) pairs, without the
        filesystem lock (the FUSE session does this as the request arrives). Returns the
        inodes without names that the kernel no longer holds: `free_forgotten` frees them."""
        released = []
        with self._refs_cond:
            for ino, count in items:
                held = self.kernel_refs.get(ino)
                if held is None:
                    continue
                if held > count:
                    self.kernel_refs[ino] = held - count
                    continue
                del self.kernel_refs[ino]
                if ino in self.unlinked_held:
                    released.append(ino)
            if released:
                self._refs_cond.notify_all()  # a write waiting for their space (_make_room)
        return released

    def free_forgotten(self, inos: list[int]) -> None:
        """Free unlinked inodes the kernel let go of, unless open: at once if they hold data
        (their space comes back), else with others (an `rm` of many empty files is not slowed
        by one more operation per file)."""
        now = []
        with self.lock:
            for ino in inos:
                sectors = self.unlinked_held.get(ino)
                if sectors is None or self.opens.get(ino):
                    continue
                if sectors or ino in self.data.dirty:
                    now.append(ino)
                else:
                    self.free_later.append(ino)
            if len(self.free_later) >= FREE_BATCH:
                now += self.free_later
                self.free_later = []
            if now:
                self._free_unlinked(now)

    def _take_back_forgotten(self) -> None:
        """Free the unlinked inodes that only the kernel holds, once it has forgotten them:
        waits up to FORGET_WAIT seconds for its FORGET (the filesystem lock stays held; the
        session counts a FORGET without it). Those without data wait for the commit that
        follows (free_later)."""
        waiting = [ino for ino, n in self._kernel_only_sectors().items() if n]
        if not waiting:
            return
        with self._refs_cond:
            if not self._refs_cond.wait_for(
                    lambda: not any(self.kernel_refs.get(ino) for ino in waiting), FORGET_WAIT):
                log.info("%d removed inodes still held by the kernel after %.1f s",
                         sum(1 for ino in waiting if self.kernel_refs.get(ino)), FORGET_WAIT)
            gone = [ino for ino in waiting if not self.kernel_refs.get(ino)]
        self.free_forgotten(gone)

    def _held_for_the_kernel(self) -> int:
        """Sectors of unlinked inodes that nothing but the kernel's entries holds: the kernel
        has let go of them when it sends its FORGET, a moment after the unlink answered."""
        return sum(self._kernel_only_sectors().values())

    def _kernel_only_sectors(self) -> dict[int, int]:
        """Unlinked inodes that are not open -> the sectors they hold, stored and dirty."""
        dirty = self.data.dirty
        return {ino: sectors + sum(len(secs) for secs in dirty.get(ino, {}).values())
                for ino, sectors in self.unlinked_held.items() if not self.opens.get(ino)}

    @operation
    def _free_unlinked(self, inos: list[int]) -> None:
        for ino in inos:
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
        """Shrink or grow inode row `r` to `size`; a shrink's caller has made room for the
        tail it rewrites (`_reserve_tail`, before the operation, where it may commit)."""
        self._check_truncatable(r, size)
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

    def _reserve_tail(self, r: tuple, size: int) -> None:
        """Make room for the sector that shrinking inode row `r` to `size` rewrites, if any."""
        if stat.S_ISREG(r[1]) and self.data.tail_rewritten(r[0], r[5], size):
            self._reserve(r[0], size // BLOCK, size // BLOCK, truncating=True)

    def _blocks_short(self, ino: int, first: int, last: int, truncating: bool = False) -> int:
        """How many blocks' worth of free space are missing to make blocks first..last of a
        file dirty.

        Space is promised before it is used: every dirty block (and every block a change is
        about to dirty) may need a block of new sectors when it is written out
        (copy-on-write), so a write accepted now can always be stored by the next commit.
        Any free sector counts (a block may be stored in fragments), except the room kept
        for the next metadata copy. A truncation may use that room too: truncate(2) knows no
        ENOSPC, and the sector it rewrites frees the one it replaces at the same commit,
        before any copy is written.
        """
        dirty = self.data.dirty.get(ino, {})
        if last - first < len(dirty):
            already = sum(1 for b in range(first, last + 1) if b in dirty)
        else:
            already = sum(1 for b in dirty if first <= b <= last)
        blocks = self.data.dirty_blocks + (last - first + 1) - already
        need = blocks * SECTORS_PER_BLOCK + (0 if truncating else self.copy_reserve)
        return max(0, -(-(need - self.alloc.free_count) // SECTORS_PER_BLOCK))

    def check_metadata_room(self) -> None:
        """ENOSPC for a change that grows the metadata now (`metadata_shortage`)."""
        short = self.metadata_shortage()
        if short is not None:
            raise FSError(errno.ENOSPC, short)

    def metadata_shortage(self) -> str | None:
        """Why changes that grow the metadata are refused now (the disk holding the database
        is short of room, or the volume could not hold its next copy), or None."""
        short = self.db.room_shortage()
        if short is not None:
            return short
        self.copy_reserve = copy_reserve(self.db)  # (the database grows between commits)
        if self.alloc.free_count + self.alloc.held_count < self.copy_reserve:
            return (f"the volume has no room left for the next copy of the metadata "
                    f"({self.copy_reserve} sectors are kept for it)")
        return None

    def _reserve(self, ino: int, first: int, last: int, truncating: bool = False) -> None:
        """Make sure blocks first..last of a file can become dirty, else raise ENOSPC."""
        self._make_room(lambda: self._blocks_short(ino, first, last, truncating), "blocks")

    def _make_room(self, short: Callable[[], int], unit: str) -> None:
        """Raise ENOSPC unless `short()` (how many `unit` of room are missing) is nothing.

        Sectors freed since the last commit (deleted files, overwritten blocks) become usable
        only after a commit, so one is made when the free ones do not suffice; files removed a
        moment before are freed first, once the kernel has let go of them.
        """
        if short() <= 0:
            return
        if self._depth == 0:
            self._take_back_forgotten()
            if self.alloc.held_count or self.needs_commit():
                self.commit()
        missing = short()
        if missing > 0:
            raise FSError(errno.ENOSPC, f"no space left on the volume ({missing} {unit} short)")

    def _check_write(self, ino: int, offset: int, n: int) -> tuple:
        r = self._row(ino)
        if not stat.S_ISREG(r[1]):
            raise FSError(errno.EISDIR if stat.S_ISDIR(r[1]) else errno.EINVAL,
                          f"inode {ino} is not a regular file")
        if offset < 0:
            raise FSError(errno.EINVAL, f"negative offset {offset}")
        if n and offset + n > MAX_FILE_SIZE:  # (`write` has cut what would pass it)
            raise FSError(errno.EFBIG, f"write past the largest file size ({MAX_FILE_SIZE})")
        return r

    def write(self, ino: int, offset: int, data: bytes | memoryview,
              keep_times: bool = False, kill_setid: bool = False) -> int:
        """Write bytes at `offset`; returns how many were written. `keep_times` stores
        content without changing mtime and ctime (a ghost's content arriving); `kill_setid`
        (a writer without CAP_FSETID) clears the file's setid bits.

        ENOSPC comes before anything changes: a failed write leaves the file as it was. A
        write that would pass the largest file size writes what fits (EFBIG if nothing
        does), as write(2) does at a file size limit.
        """
        if offset + len(data) > MAX_FILE_SIZE and 0 <= offset < MAX_FILE_SIZE:
            data = memoryview(data)[:MAX_FILE_SIZE - offset]
        with self.lock:
            self._check_open()
            n = len(data)
            self._check_write(ino, offset, n)
            if not keep_times:  # (a ghost's content arriving is not a change of it)
                self.refuse_write(ino)
            if n:
                self.db.check_room()
                self._reserve(ino, offset // BLOCK, (offset + n - 1) // BLOCK)
            return self._write(ino, offset, data, keep_times, kill_setid)

    @operation
    def _write(self, ino: int, offset: int, data: bytes | memoryview,
               keep_times: bool = False, kill_setid: bool = False) -> int:
        r = self._check_write(ino, offset, len(data))
        n = len(data)
        if n == 0:
            return 0
        if kill_setid:
            self._kill_setid(r)
        new_size = self.data.write(ino, r[5], offset, data)
        if keep_times:
            if new_size != r[5]:
                self.db.change("UPDATE inodes SET size=? WHERE id=?", (new_size, ino))
            return n
        now = now_ns()
        self.db.change("UPDATE inodes SET size=?, mtime_ns=?, ctime_ns=? WHERE id=?",
                       (new_size, now, now, ino))
        return n

    def _kill_setid(self, r: tuple) -> None:
        """Clear the setid bits of inode row `r` as a write by a process without CAP_FSETID
        does (the kernel leaves that to the filesystem: fuseabi.HANDLE_KILLPRIV_V2)."""
        mode = without_setid(r[1])
        if mode != r[1]:
            self.db.change("UPDATE inodes SET mode=?, ctime_ns=? WHERE id=?",
                           (mode, now_ns(), r[0]))

    def fallocate(self, ino: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2): mode 0 or KEEP_SIZE makes sure the volume has room for the range's
        holes (ENOSPC if not) and, without KEEP_SIZE, extends the file over it; PUNCH_HOLE
        (with KEEP_SIZE) and ZERO_RANGE make the range read as zeros, freeing the sectors it
        covers whole. Other modes (collapse, insert, unshare) are EOPNOTSUPP.

        Data is copy-on-write, so, as on ZFS, room found now is not set aside: a later write
        may still meet ENOSPC if other files have taken the space meanwhile.
        """
        with self.lock:
            self._check_open()
            r = self._check_fallocate(ino, mode, offset, length)
            if not mode & (PUNCH_HOLE | ZERO_RANGE):
                self.db.check_room()
            end = offset + length
            if mode & (PUNCH_HOLE | ZERO_RANGE):
                # Only sectors the range covers in part are rewritten (with zeros): a punch
                # of whole sectors needs no room, even on a full volume.
                stop = min(end, r[5])
                for edge in (offset, stop) if offset < stop else ():
                    if edge % SECTOR:
                        self._reserve(ino, edge // BLOCK, edge // BLOCK)
            else:
                self._check_room(ino, offset, end)
            self._fallocate(ino, mode, offset, end)

    def _check_fallocate(self, ino: int, mode: int, offset: int, length: int) -> tuple:
        if mode & ~(KEEP_SIZE | PUNCH_HOLE | ZERO_RANGE):
            raise FSError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} is not supported")
        if mode & PUNCH_HOLE and (mode & ZERO_RANGE or not mode & KEEP_SIZE):
            raise FSError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}: a hole keeps the size")
        if offset < 0 or length <= 0:
            raise FSError(errno.EINVAL, f"fallocate of {length} bytes at {offset}")
        r = self._row(ino)
        self.refuse_fallocate(ino, mode)
        if stat.S_ISDIR(r[1]):
            raise FSError(errno.EISDIR, f"inode {ino} is a directory")
        if not stat.S_ISREG(r[1]):
            raise FSError(errno.ENODEV, f"inode {ino} is not a regular file")
        if offset + length > MAX_FILE_SIZE:
            raise FSError(errno.EFBIG, f"fallocate past the largest file size ({MAX_FILE_SIZE})")
        return r

    def _check_room(self, ino: int, offset: int, end: int) -> None:
        """ENOSPC unless the volume has room for the holes among bytes [offset, end)."""
        lo, hi = offset // SECTOR, -(-end // SECTOR)

        def short() -> int:
            holes = hi - lo - self.data.map.stored_in(ino, lo, hi)
            promised = self.data.dirty_blocks * SECTORS_PER_BLOCK + self.copy_reserve
            return holes + promised - self.alloc.free_count

        self._make_room(short, "sectors")

    @operation
    def _fallocate(self, ino: int, mode: int, offset: int, end: int) -> None:
        r = self._row(ino)
        size = r[5]
        if mode & (PUNCH_HOLE | ZERO_RANGE):
            self.data.punch(ino, size, offset, end)
        if not mode & KEEP_SIZE:
            size = max(size, end)
        now = now_ns()  # every mode sets mtime and ctime, as on ext4
        self.db.change("UPDATE inodes SET size=?, mtime_ns=?, ctime_ns=? WHERE id=?",
                       (size, now, now, ino))

    @query
    def seek(self, ino: int, offset: int, whence: int, all_data: bool = False) -> int:
        """lseek(2)'s SEEK_DATA and SEEK_HOLE: the next offset at or after `offset` in data
        or in a hole (the end of file counts as a hole); ENXIO at or past the end.
        `all_data`: the file is data throughout (its holes are not known)."""
        r = self._row(ino)
        size = r[5]
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise FSError(errno.EINVAL, f"whence {whence}")
        if offset < 0 or offset >= size:
            raise FSError(errno.ENXIO, f"offset {offset} of a file of {size} bytes")
        if all_data:
            return offset if whence == os.SEEK_DATA else size
        sector = offset // SECTOR
        if whence == os.SEEK_HOLE:
            return min(size, max(offset, self.data.next_hole(ino, sector) * SECTOR))
        found = self.data.next_data(ino, sector)
        if found is None or found * SECTOR >= size:
            raise FSError(errno.ENXIO, f"no data after offset {offset} of inode {ino}")
        return max(offset, found * SECTOR)

    @operation
    def drop_content(self, ino: int) -> None:
        """Free every stored block of a file, keeping its size (it reads as a hole until
        its content is stored again: only for ghosts, whose reads are guarded)."""
        self.data.drop(ino)
        self.db.change("UPDATE inodes SET sectors=0 WHERE id=?", (ino,))
