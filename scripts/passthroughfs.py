"""A minimal passthrough filesystem with pyfuse3: the "any FUSE fs in Python" reference.

Usage: python scripts/passthroughfs.py [--inline-io] SRC MNT
(stays in the foreground; unmount to stop)

Everything under MNT is SRC. The FUSE inode of an entry is its st_ino in SRC (SRC itself is
the root, inode 1); the daemon keeps inode -> paths (several for hard links) for the inodes
the kernel knows, and forgets them as the kernel does. File data (read, write, fsync) goes
through trio.to_thread so that a slow disk does not stop the other requests; the other calls
are single fast syscalls and run on the event loop. --inline-io runs read and write on the event
loop too: on a 2-vCPU VM a trio.to_thread round trip costs 140-200 us, which is most of the time
of a 4 KiB request and caps 128 KiB sequential reads at ~300 MB/s (inline: ~800-900 MB/s).
Mount options are those of a simple FUSE filesystem: default_permissions (the kernel checks
permissions), no writeback cache (writes reach the daemon as they are made), entry and
attribute timeouts of 1 s (libfuse's default, as bindfs has them).

Written for scripts/bench-fs; it is a benchmark reference, not a product.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

log = logging.getLogger("passthroughfs")

TIMEOUT = 1.0  # entry and attribute timeout, seconds (libfuse's default)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def fuse_errors(func: F) -> F:
    """Turn OSErrors of the underlying syscalls into FUSE errors with the same errno."""

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await func(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY):
                log.info("%s: %s", func.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper  # type: ignore[return-value]


class Passthrough(pyfuse3.Operations):
    """FUSE operations that forward every call to the same path under the source directory."""

    enable_writeback_cache = False

    def __init__(self, source: str, inline_io: bool = False) -> None:
        super().__init__()
        self.inline_io = inline_io
        self.source = os.path.realpath(source)
        st = os.lstat(self.source)
        self.root_key = (st.st_dev, st.st_ino)
        self.paths: dict[int, set[str]] = {pyfuse3.ROOT_INODE: {self.source}}
        self.lookups: dict[int, int] = {pyfuse3.ROOT_INODE: 1}
        self.open_fds: dict[int, set[int]] = {}  # inode -> open descriptors (fh)
        self.fd_inode: dict[int, int] = {}
        self.dirs: dict[int, tuple[str, list[str]]] = {}  # dir handle -> (path, names)
        self.next_dir_fh = 1
        self.uid, self.gid = os.geteuid(), os.getegid()

    # --- inode <-> path ---------------------------------------------------------------------

    def _ino(self, st: os.stat_result) -> int:
        if (st.st_dev, st.st_ino) == self.root_key:
            return pyfuse3.ROOT_INODE
        if st.st_ino == pyfuse3.ROOT_INODE:  # only a file system's root has inode 1
            raise pyfuse3.FUSEError(errno.EXDEV)
        return st.st_ino

    def _path(self, inode: int) -> str:
        paths = self.paths.get(inode)
        if not paths:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return next(iter(paths))

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _remember(self, path: str, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Count one lookup of the entry at `path` and return its attributes."""
        ino = self._ino(st)
        self.paths.setdefault(ino, set()).add(path)
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        return self._attrs(st, ino)

    def _forget_path(self, path: str, ino: int) -> None:
        paths = self.paths.get(ino)
        if paths is not None:
            paths.discard(path)

    def _rename_paths(self, old: str, new: str, ino: int) -> None:
        self._forget_path(old, ino)
        self.paths.setdefault(ino, set()).add(new)
        prefix = old + "/"
        if any(p.startswith(prefix) for ps in self.paths.values() for p in ps):
            for ps in self.paths.values():
                for p in [p for p in ps if p.startswith(prefix)]:
                    ps.discard(p)
                    ps.add(new + p[len(old):])

    def _attrs(self, st: os.stat_result, ino: int | None = None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._ino(st) if ino is None else ino
        a.generation = 0
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _stat(self, inode: int) -> os.stat_result:
        paths = self.paths.get(inode)
        if paths:
            return os.lstat(next(iter(paths)))
        fds = self.open_fds.get(inode)
        if fds:  # unlinked but still open
            return os.fstat(next(iter(fds)))
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _own(self, path: str, ctx: pyfuse3.RequestContext) -> None:
        if (ctx.uid, ctx.gid) != (self.uid, self.gid):
            os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)

    # --- entries ------------------------------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        """Attributes of `name` in the directory `parent_inode`."""
        if name == b".":
            path = self._path(parent_inode)
        elif name == b"..":
            path = os.path.dirname(self._path(parent_inode))
        else:
            path = self._child(parent_inode, name)
        return self._remember(path, os.lstat(path))

    async def forget(self, inode_list):
        """The kernel dropped `nlookup` references to each inode."""
        for inode, nlookup in inode_list:
            if inode == pyfuse3.ROOT_INODE:
                continue
            left = self.lookups.get(inode, 0) - nlookup
            if left > 0:
                self.lookups[inode] = left
            else:
                self.lookups.pop(inode, None)
                self.paths.pop(inode, None)

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        """Attributes of a known inode."""
        return self._attrs(self._stat(inode), inode)

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        """Change size, mode, owner or times, then return the new attributes."""
        if fh is not None and fields.update_size:
            os.ftruncate(fh, attr.st_size)
        elif fields.update_size:
            os.truncate(self._path(inode), attr.st_size)
        paths = self.paths.get(inode)
        target: str | int | None = next(iter(paths)) if paths else fh
        if target is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        follow = not isinstance(target, str)  # os.chown/utime refuse fd + follow_symlinks=False
        if fields.update_mode:
            st = os.lstat(target) if isinstance(target, str) else os.fstat(target)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(target, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            os.chown(target, uid, gid, follow_symlinks=follow)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(target) if isinstance(target, str) else os.fstat(target)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(target, ns=(atime, mtime), follow_symlinks=follow)
        return self._attrs(self._stat(inode), inode)

    @fuse_errors
    async def readlink(self, inode, ctx):
        """Target of a symbolic link."""
        return os.fsencode(os.readlink(self._path(inode)))

    @fuse_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        """A device, FIFO, socket or regular file."""
        path = self._child(parent_inode, name)
        os.mknod(path, mode, rdev)
        self._own(path, ctx)
        return self._remember(path, os.lstat(path))

    @fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        """A directory."""
        path = self._child(parent_inode, name)
        os.mkdir(path, stat.S_IMODE(mode))
        self._own(path, ctx)
        return self._remember(path, os.lstat(path))

    @fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        """A symbolic link to `target`."""
        path = self._child(parent_inode, name)
        os.symlink(os.fsdecode(target), path)
        self._own(path, ctx)
        return self._remember(path, os.lstat(path))

    @fuse_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        """A hard link to `inode`."""
        path = self._child(new_parent_inode, new_name)
        os.link(self._path(inode), path, follow_symlinks=False)
        return self._remember(path, os.lstat(path))

    @fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        """Remove a non-directory."""
        path = self._child(parent_inode, name)
        st = os.lstat(path)
        os.unlink(path)
        self._forget_path(path, self._ino(st))

    @fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        """Remove an empty directory."""
        path = self._child(parent_inode, name)
        st = os.lstat(path)
        os.rmdir(path)
        self._forget_path(path, self._ino(st))

    @fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        """Rename; RENAME_NOREPLACE is honoured, RENAME_EXCHANGE is not supported."""
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        st_old = os.lstat(old)
        try:
            st_new: os.stat_result | None = os.lstat(new)
        except FileNotFoundError:
            st_new = None
        if st_new is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EEXIST)
        os.rename(old, new)
        if st_new is not None and (st_new.st_dev, st_new.st_ino) != (st_old.st_dev,
                                                                     st_old.st_ino):
            self._forget_path(new, self._ino(st_new))
        self._rename_paths(old, new, self._ino(st_old))

    # --- files --------------------------------------------------------------------------------

    def _opened(self, fd: int, inode: int) -> pyfuse3.FileInfo:
        self.open_fds.setdefault(inode, set()).add(fd)
        self.fd_inode[fd] = inode
        return pyfuse3.FileInfo(fh=fd)

    @fuse_errors
    async def open(self, inode, flags, ctx):
        """Open the file; the descriptor is the FUSE file handle."""
        # The kernel positions appends itself; O_APPEND would make pwrite ignore the offset.
        fd = os.open(self._path(inode), flags & ~(os.O_APPEND | os.O_CREAT | os.O_EXCL))
        return self._opened(fd, inode)

    @fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        """Create and open a regular file."""
        path = self._child(parent_inode, name)
        fd = os.open(path, (flags | os.O_CREAT) & ~os.O_APPEND, stat.S_IMODE(mode))
        try:
            if (ctx.uid, ctx.gid) != (self.uid, self.gid):
                os.fchown(fd, ctx.uid, ctx.gid)
            attrs = self._remember(path, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return self._opened(fd, attrs.st_ino), attrs

    @fuse_errors
    async def read(self, fh, off, size):
        """Read from an open file."""
        if self.inline_io:
            return os.pread(fh, size, off)
        return await trio.to_thread.run_sync(os.pread, fh, size, off)

    @fuse_errors
    async def write(self, fh, off, buf):
        """Write to an open file."""
        if self.inline_io:
            return os.pwrite(fh, buf, off)
        return await trio.to_thread.run_sync(os.pwrite, fh, buf, off)

    async def flush(self, fh):
        """close(2) of one of the kernel's descriptors: nothing to do, release closes."""

    @fuse_errors
    async def fsync(self, fh, datasync):
        """Write the file's data (and metadata unless `datasync`) to the disk."""
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fh)

    @fuse_errors
    async def release(self, fh):
        """The last reference to an open file went away."""
        inode = self.fd_inode.pop(fh, None)
        fds = self.open_fds.get(inode) if inode is not None else None
        if fds is not None:
            fds.discard(fh)
            if not fds:
                del self.open_fds[inode]
        os.close(fh)

    # --- directories --------------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode, ctx):
        """Snapshot the directory's names; readdir walks the snapshot."""
        path = self._path(inode)
        names = sorted(os.listdir(path))
        fh = self.next_dir_fh
        self.next_dir_fh += 1
        self.dirs[fh] = (path, names)
        return fh

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        """Entries from position `start_id` of the snapshot (each reply counts as a lookup)."""
        path, names = self.dirs[fh]
        for i in range(start_id, len(names)):
            child = os.path.join(path, names[i])
            try:
                st = os.lstat(child)
            except FileNotFoundError:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), self._attrs(st), i + 1):
                break
            self._remember(child, st)

    async def releasedir(self, fh):
        """Drop the snapshot."""
        self.dirs.pop(fh, None)

    @fuse_errors
    async def fsyncdir(self, fh, datasync):
        """Write the directory to the disk."""
        path = self.dirs[fh][0]
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            await trio.to_thread.run_sync(os.fsync, fd)
        finally:
            os.close(fd)

    @fuse_errors
    async def statfs(self, ctx):
        """Space and inodes of the source's file system."""
        sv = os.statvfs(self.source)
        s = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(s, attr, getattr(sv, attr))
        return s


def main(argv: list[str] | None = None) -> int:
    """Mount SRC at MNT and serve until unmounted."""
    args = list(sys.argv[1:] if argv is None else argv)
    inline_io = "--inline-io" in args
    args = [a for a in args if a != "--inline-io"]
    if len(args) != 2:
        sys.stderr.write("usage: passthroughfs.py [--inline-io] SRC MNT\n")
        return 2
    source, mountpoint = args
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="passthroughfs: %(levelname)s %(message)s")
    os.umask(0)  # the kernel has applied the caller's umask to every mode it sends
    mount_and_serve(Passthrough(source, inline_io), mountpoint, "passthroughfs")
    return 0


def mount_and_serve(ops: pyfuse3.Operations, mountpoint: str, name: str,
                    serve: Callable[..., Awaitable[None]] = pyfuse3.main, *args: Any) -> None:
    """Mount `ops` at `mountpoint` (fsname and subtype `name`, default_permissions) and run
    `serve(*args)` on trio until it returns; then close the session."""
    options = set(pyfuse3.default_options)
    options |= {f"fsname={name}", f"subtype={name}", "default_permissions"}
    pyfuse3.init(ops, mountpoint, options)
    try:
        trio.run(serve, *args)
    except BaseException:
        pyfuse3.close(unmount=False)
        raise
    pyfuse3.close()


if __name__ == "__main__":
    sys.exit(main())
