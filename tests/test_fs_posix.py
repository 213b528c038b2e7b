"""POSIX semantics through a real FUSE mount of the filesystem (one mount for the module)."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import stat
import struct
import subprocess
import tempfile

import pytest
from mountutil import drop_caches, scratch_mount
from posixutil import (
    FALLOC_COLLAPSE_RANGE,
    FALLOC_KEEP_SIZE,
    FALLOC_PUNCH_HOLE,
    FALLOC_ZERO_RANGE,
    NOBODY,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    as_user,
    c_getxattr,
    c_listxattr,
    errno_of,
    fallocate,
    link_fd,
    renameat2,
    resident_pages,
)

GiB = 1 << 30



@pytest.fixture(scope="module")
def mnt():
    """One mounted filesystem for the module, in a directory every user can reach."""
    with scratch_mount("dwfs-posix-", public=True) as (m, _base):
        yield m


@pytest.fixture
def d(mnt, request):
    """A fresh directory in the mount for one test (world-writable for the non-root tests)."""
    path = mnt.path(request.node.name.replace("[", "_").replace("]", ""))
    os.mkdir(path)
    os.chmod(path, 0o777)
    return path


def mount_options(path: str) -> list[str]:
    """The options of the mount holding `path` (the longest /proc/mounts match)."""
    best, opts = "", []
    with open("/proc/mounts", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if path.startswith(fields[1]) and len(fields[1]) > len(best):
                best, opts = fields[1], fields[3].split(",")
    return opts


def wait_for(cond, timeout: float = 10.0) -> bool:
    """Poll `cond` until it is true or `timeout` seconds have passed; returns its last value."""
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --- types and names -----------------------------------------------------------------------------


def test_file_types(d):
    os.mkdir(f"{d}/dir", 0o750)
    write_file(f"{d}/reg", b"abc")
    os.mkfifo(f"{d}/fifo", 0o640)
    os.mknod(f"{d}/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(f"{d}/blk", stat.S_IFBLK | 0o600, os.makedev(7, 1))
    os.symlink("reg", f"{d}/sym")
    os.link(f"{d}/reg", f"{d}/hard")
    st = {n: os.lstat(f"{d}/{n}") for n in os.listdir(d)}
    assert sorted(st) == ["blk", "dir", "fifo", "hard", "null", "reg", "sym"]
    assert stat.S_ISDIR(st["dir"].st_mode) and stat.S_IMODE(st["dir"].st_mode) == 0o750
    assert st["dir"].st_nlink == 2 and os.stat(d).st_nlink == 3
    assert stat.S_ISFIFO(st["fifo"].st_mode) and stat.S_IMODE(st["fifo"].st_mode) == 0o640
    assert stat.S_ISCHR(st["null"].st_mode) and st["null"].st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(st["blk"].st_mode) and st["blk"].st_rdev == os.makedev(7, 1)
    assert stat.S_ISLNK(st["sym"].st_mode) and os.readlink(f"{d}/sym") == "reg"
    assert st["sym"].st_size == 3
    assert read_file(f"{d}/sym") == b"abc"
    assert st["reg"].st_ino == st["hard"].st_ino and os.stat(f"{d}/reg").st_nlink == 2
    # the device node works as /dev/null, unless the mount says nodev (FUSE's default)
    if "nodev" in mount_options(d):
        assert errno_of(open, f"{d}/null", "wb") == errno.EACCES
    else:
        with open(f"{d}/null", "wb") as f:
            f.write(b"gone")
        assert read_file(f"{d}/null") == b""
    # a FIFO passes data between a writer and a reader
    pid = os.fork()
    if pid == 0:
        try:
            with open(f"{d}/fifo", "wb") as f:
                f.write(b"through the fifo")
        finally:
            os._exit(0)
    assert read_file(f"{d}/fifo") == b"through the fifo"
    os.waitpid(pid, 0)
    assert errno_of(os.mkdir, f"{d}/reg") == errno.EEXIST
    assert errno_of(os.readlink, f"{d}/reg") == errno.EINVAL
    assert errno_of(os.link, f"{d}/dir", f"{d}/dirlink") == errno.EPERM
    assert errno_of(os.stat, f"{d}/missing") == errno.ENOENT
    assert errno_of(os.stat, f"{d}/reg/x") == errno.ENOTDIR


def test_unix_socket(d):
    import socket

    path = f"{d}/sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)  # mknod of S_IFSOCK
        server.listen(1)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            conn, _ = server.accept()
            with conn:
                client.sendall(b"over a socket in the mount")
                assert conn.recv(100) == b"over a socket in the mount"
    os.unlink(path)


def test_name_max(d):
    ok, long = "n" * 255, "n" * 256
    write_file(f"{d}/{ok}", b"x")
    assert os.listdir(d) == [ok]
    assert read_file(f"{d}/{ok}") == b"x"
    for fn in (lambda: write_file(f"{d}/{long}", b""), lambda: os.mkdir(f"{d}/{long}"),
               lambda: os.stat(f"{d}/{long}"), lambda: os.symlink("x", f"{d}/{long}"),
               lambda: os.rename(f"{d}/{ok}", f"{d}/{long}"),
               lambda: os.link(f"{d}/{ok}", f"{d}/{long}"), lambda: os.mkfifo(f"{d}/{long}")):
        assert errno_of(fn) == errno.ENAMETOOLONG
    os.rename(f"{d}/{ok}", f"{d}/{'é' * 127}x")  # 255 bytes of UTF-8
    assert errno_of(os.mkdir, f"{d}/{'é' * 128}") == errno.ENAMETOOLONG


# --- open flags and I/O --------------------------------------------------------------------------


def test_open_flags(d):
    p = f"{d}/f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"hello world")
    os.close(fd)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert errno_of(os.open, p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600) == errno.EEXIST
    assert errno_of(os.open, f"{d}/nope", os.O_RDONLY) == errno.ENOENT
    assert errno_of(os.open, d, os.O_WRONLY) == errno.EISDIR
    assert errno_of(os.open, p, os.O_RDONLY | os.O_DIRECTORY) == errno.ENOTDIR
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)  # exists: opened, mode unchanged
    assert os.read(fd, 5) == b"hello"
    os.close(fd)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"!")
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"?")  # O_APPEND: always at the end
    os.pwrite(fd, b"#", 0)  # Linux: pwrite on O_APPEND appends too
    os.close(fd)
    assert read_file(p) == b"hello world!?#"
    fd = os.open(p, os.O_RDWR | os.O_TRUNC)
    assert os.fstat(fd).st_size == 0
    os.write(fd, b"new")
    os.close(fd)
    assert read_file(p) == b"new"
    os.close(os.open(p, os.O_RDONLY | os.O_TRUNC))  # unspecified by POSIX; Linux truncates
    assert os.stat(p).st_size == 0


def test_pread_pwrite_any_offset(d):
    p = f"{d}/f"
    model = bytearray()
    import random

    rng = random.Random(7)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for _ in range(80):
            off = rng.choice([0, rng.randrange(300_000), 65535, 65536, 131071, len(model),
                              len(model) + rng.randrange(100_000)])
            n = rng.choice([1, 13, 4096, 65536, 65537, 200_000])
            data = rng.randbytes(n)
            assert os.pwrite(fd, data, off) == n
            if off > len(model):
                model += bytes(off - len(model))
            model[off : off + n] = data
            if rng.random() < 0.1:
                size = rng.randrange(len(model) + 70_000)
                os.ftruncate(fd, size)
                model = model[:size] + bytes(max(0, size - len(model)))
            ro, rn = rng.randrange(len(model) + 10), rng.randrange(1, 300_000)
            assert os.pread(fd, rn, ro) == bytes(model[ro : ro + rn])
        assert os.fstat(fd).st_size == len(model)
    finally:
        os.close(fd)
    assert read_file(p) == bytes(model)


def test_sparse_file_over_4gib(d):
    p = f"{d}/big"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"head", 0)
        os.pwrite(fd, b"past4G", 4 * GiB + 10)
        os.pwrite(fd, b"end", 9 * GiB)
        st = os.fstat(fd)
        assert st.st_size == 9 * GiB + 3
        assert st.st_blocks * 512 < 1 << 20
        assert os.pread(fd, 20, 4 * GiB) == bytes(10) + b"past4G" + bytes(4)
        assert os.pread(fd, 10, 2 * GiB) == bytes(10)
        assert os.pread(fd, 10, 9 * GiB - 2) == b"\0\0end"
        os.ftruncate(fd, 4 * GiB + 12)
        assert os.pread(fd, 100, 4 * GiB + 8) == b"\0\0pa"
        os.ftruncate(fd, 5 * GiB)
        assert os.pread(fd, 8, 4 * GiB + 10) == b"pa" + bytes(6)
        assert os.fstat(fd).st_size == 5 * GiB
    finally:
        os.close(fd)
    os.truncate(p, 0)
    assert os.stat(p).st_blocks == 0


def test_largest_file_as_ext4(d):
    """Files end where ext4's do (16 TiB less 4 KiB): a write across that line writes what
    fits, one at it is EFBIG, and so are truncate and fallocate past it."""
    top = (1 << 44) - 4096
    fd = os.open(f"{d}/big", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.pwrite(fd, b"abcdef", top - 3) == 3
        assert os.fstat(fd).st_size == top and os.pread(fd, 10, top - 3) == b"abc"
        assert errno_of(os.pwrite, fd, b"x", top) == errno.EFBIG
        assert errno_of(os.ftruncate, fd, top + 1) == errno.EFBIG
        assert errno_of(fallocate, fd, 0, top - 10, 11) == errno.EFBIG
        assert os.fstat(fd).st_size == top
    finally:
        os.close(fd)


def test_truncate_both_ways(d):
    p = f"{d}/f"
    write_file(p, b"x" * 100_000)
    os.truncate(p, 70_000)
    assert os.stat(p).st_size == 70_000
    os.truncate(p, 200_000)
    data = read_file(p)
    assert data == b"x" * 70_000 + bytes(130_000)
    fd = os.open(p, os.O_RDWR)
    os.ftruncate(fd, 3)
    assert os.fstat(fd).st_size == 3
    os.ftruncate(fd, 5)
    os.close(fd)
    assert read_file(p) == b"xxx\0\0"
    assert errno_of(os.truncate, d, 0) == errno.EISDIR
    assert errno_of(os.truncate, p, -1) == errno.EINVAL


def test_holes_take_no_space(d):
    p = f"{d}/f"
    with open(p, "wb") as f:
        f.truncate(10 << 20)
    os.sync()
    assert os.stat(p).st_blocks == 0
    assert read_file(p) == bytes(10 << 20)
    fd = os.open(p, os.O_RDWR)
    os.pwrite(fd, b"y" * 65536, 5 << 20)
    os.fsync(fd)
    assert os.fstat(fd).st_blocks == 65536 // 512
    os.close(fd)


def test_fallocate(mnt, d):
    """fallocate(1) and fallocate(2): allocate (with and without keeping the size), punch a
    hole (its space comes back), zero a range; unsupported modes and a range the volume has
    no room for fail with their errno and change nothing."""
    p = f"{d}/f"
    data = bytearray(os.urandom(1 << 20))
    write_file(p, bytes(data))
    subprocess.run(["fallocate", "-l", "3MiB", p], check=True)
    data += bytes((3 << 20) - len(data))
    assert os.stat(p).st_size == 3 << 20
    subprocess.run(["fallocate", "-n", "-o", "4MiB", "-l", "1MiB", p], check=True)
    assert os.stat(p).st_size == 3 << 20
    os.sync()
    before = os.stat(p).st_blocks
    subprocess.run(["fallocate", "-p", "-o", "1000", "-l", "500000", p], check=True)
    data[1000:501_000] = bytes(500_000)
    fd = os.open(p, os.O_RDWR)
    try:
        os.fsync(fd)
        assert os.fstat(fd).st_blocks <= before - (500_000 // 4096 - 1) * 8
        fallocate(fd, FALLOC_ZERO_RANGE, 600_000, 4 << 20)  # past the end: the size grows
        data[600_000:] = bytes(len(data) - 600_000)
        data += bytes(600_000 + (4 << 20) - len(data))
        assert os.fstat(fd).st_size == len(data)
        free = os.statvfs(p).f_bavail * os.statvfs(p).f_frsize
        for mode, offset, length, code in [
            (FALLOC_COLLAPSE_RANGE, 0, 1 << 20, errno.EOPNOTSUPP),
            (FALLOC_PUNCH_HOLE, 0, 4096, errno.EOPNOTSUPP),
            (0, 0, free + (64 << 20), errno.ENOSPC),
        ]:
            assert errno_of(fallocate, fd, mode, offset, length) == code
            assert os.fstat(fd).st_size == len(data)
    finally:
        os.close(fd)
    assert read_file(p) == bytes(data)


def copy_all(src: int, dst: int, length: int, off_in: int | None = None,
             off_out: int | None = None) -> int:
    """copy_file_range until `length` bytes are copied or the source ends; the total."""
    done = 0
    while done < length:
        n = os.copy_file_range(src, dst, length - done,
                               None if off_in is None else off_in + done,
                               None if off_out is None else off_out + done)
        if n == 0:
            break
        done += n
    return done


def test_copy_file_range(mnt, d):
    """copy_file_range is answered inside the filesystem: whole files and ranges at any
    offsets, the source's holes kept (and zeroing data the destination had there), a copy
    past the source's end, the copy's times and the kernel's own refusals."""
    data = os.urandom(3 << 20) + bytes(5 << 20) + os.urandom(100_001)
    with open(f"{d}/src", "wb") as f:
        f.write(data[: 3 << 20])
        f.seek(8 << 20)
        f.write(data[8 << 20:])
    src = os.open(f"{d}/src", os.O_RDONLY)
    dst = os.open(f"{d}/dst", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert copy_all(src, dst, len(data) + 12345) == len(data)  # stops at the source's end
        os.fsync(dst)
        assert read_file(f"{d}/dst") == data
        assert os.fstat(dst).st_blocks <= os.fstat(src).st_blocks + 16  # the hole stays
        os.pwrite(dst, b"x" * (4 << 20), 2 << 20)  # data where the source has its hole
        before = os.fstat(dst).st_mtime_ns
        assert copy_all(src, dst, 6 << 20, 1 << 20, 1 << 20) == 6 << 20
        assert read_file(f"{d}/dst") == data
        assert os.fstat(dst).st_mtime_ns > before
        assert copy_all(src, dst, 1000, len(data) + 5, 0) == 0
        assert copy_all(src, dst, 777, 4095, len(data) + 3) == 777  # unaligned, past the end
        expect = data + bytes(3) + data[4095:4095 + 777]
        assert read_file(f"{d}/dst") == expect
        assert copy_all(dst, dst, 5000, 10, 20_000) == 5000  # within one file, apart
        expect = expect[:20_000] + expect[10:5010] + expect[25_000:]
        assert read_file(f"{d}/dst") == expect
        assert errno_of(os.copy_file_range, dst, dst, 5000, 0, 100) == errno.EINVAL
    finally:
        os.close(src)
        os.close(dst)
    app = os.open(f"{d}/app", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    src = os.open(f"{d}/src", os.O_RDONLY)
    try:
        assert errno_of(os.copy_file_range, src, app, 100) == errno.EBADF
    finally:
        os.close(src)
        os.close(app)
    subprocess.run(["cp", f"{d}/src", f"{d}/cp"], check=True)
    assert read_file(f"{d}/cp") == data


def test_copy_file_range_enospc(mnt, d):
    """A copy the volume has no room for fails with ENOSPC when nothing was copied, or
    copies less; what the destination held before stays readable."""
    free = os.statvfs(mnt.mountpoint).f_bavail * os.statvfs(mnt.mountpoint).f_frsize
    big = f"{d}/big"
    with open(big, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(free // 2 // len(chunk) + 4):
            f.write(chunk)
    size = os.stat(big).st_size
    old = os.urandom(10_000)
    write_file(f"{d}/dst", old)
    src = os.open(big, os.O_RDONLY)
    dst = os.open(f"{d}/dst", os.O_RDWR)
    try:
        copied = 0
        code = 0
        try:
            while copied < size:
                n = os.copy_file_range(src, dst, size - copied, copied, copied)
                assert n > 0
                copied += n
        except OSError as exc:
            code = exc.errno
        assert code == errno.ENOSPC and copied < size
        assert os.pread(dst, copied, 0) == read_file(big)[:copied]
        if copied < len(old):
            assert os.pread(dst, len(old) - copied, copied) == old[copied:]
    finally:
        os.close(src)
        os.close(dst)
    os.unlink(big)
    os.unlink(f"{d}/dst")


def test_seek_data_and_hole(mnt, d):
    """SEEK_DATA and SEEK_HOLE find the stored ranges of a sparse file, and `cp` keeps the
    copy sparse."""
    p = f"{d}/f"
    with open(p, "wb") as f:
        f.truncate(10 << 20)
    fd = os.open(p, os.O_RDWR)
    try:
        os.pwrite(fd, b"y" * 65536, 5 << 20)
        os.pwrite(fd, b"z" * 100, (10 << 20) - 100)
        os.fsync(fd)
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, 0, os.SEEK_DATA) == 5 << 20
        assert os.lseek(fd, (5 << 20) + 7, os.SEEK_DATA) == (5 << 20) + 7
        assert os.lseek(fd, 5 << 20, os.SEEK_HOLE) == (5 << 20) + 65536
        assert os.lseek(fd, (5 << 20) + 65536, os.SEEK_DATA) == (10 << 20) - 4096
        assert os.lseek(fd, (10 << 20) - 1, os.SEEK_HOLE) == 10 << 20
        assert errno_of(os.lseek, fd, 10 << 20, os.SEEK_DATA) == errno.ENXIO
        assert errno_of(os.lseek, fd, 11 << 20, os.SEEK_HOLE) == errno.ENXIO
    finally:
        os.close(fd)
    # ENXIO past the end is an answer, not a fault: the daemon must not log it as an error
    # (stress-ng's seek stressor asks this thousands of times).
    with open(os.path.join(mnt.warehouse, "dwfs.log"), errors="replace") as f:
        assert not [line for line in f if " ERROR " in line and "offset" in line], "ENXIO logged"
    subprocess.run(["cp", "--sparse=auto", p, f"{d}/copy"], check=True)
    os.sync()
    assert os.stat(f"{d}/copy").st_blocks <= (65536 + 4096) // 512
    assert read_file(f"{d}/copy") == read_file(p)


def test_unlink_open_file(mnt, d):
    p = f"{d}/f"
    data = os.urandom(300_000)
    write_file(p, data)
    free0 = os.statvfs(mnt.mountpoint).f_bfree
    fd = os.open(p, os.O_RDWR)
    os.unlink(p)
    assert not os.path.exists(p)
    assert os.fstat(fd).st_nlink == 0
    assert os.pread(fd, len(data), 0) == data
    os.pwrite(fd, b"more", len(data))
    assert os.pread(fd, 10, len(data) - 6) == data[-6:] + b"more"
    fd2 = os.dup(fd)
    os.close(fd)
    assert os.pread(fd2, 4, len(data)) == b"more"
    os.close(fd2)
    # the kernel sends RELEASE after close() returns: wait for the space to come back
    assert wait_for(lambda: os.statvfs(mnt.mountpoint).f_bfree >= free0 + 300_000 // 4096 - 1)


def test_o_tmpfile(mnt, d):
    """O_TMPFILE makes an open file with no name: it is listed nowhere, has no links, and
    linkat names it (not when opened O_EXCL); unnamed, its space comes back at close."""
    data = os.urandom(200_000)
    fd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o640)
    try:
        st = os.fstat(fd)
        assert (st.st_nlink, stat.S_IMODE(st.st_mode), st.st_size) == (0, 0o640, 0)
        assert stat.S_ISREG(st.st_mode)
        os.write(fd, data)
        assert os.listdir(d) == []
        link_fd(fd, f"{d}/named")
        assert os.fstat(fd).st_nlink == 1
        assert os.stat(f"{d}/named").st_ino == st.st_ino
    finally:
        os.close(fd)
    assert read_file(f"{d}/named") == data
    assert errno_of(os.open, f"{d}/named", os.O_TMPFILE | os.O_RDWR) == errno.ENOTDIR

    fd = os.open(d, os.O_TMPFILE | os.O_WRONLY | os.O_EXCL, 0o600)
    try:
        assert errno_of(link_fd, fd, f"{d}/never") == errno.ENOENT
    finally:
        os.close(fd)
    free0 = os.statvfs(mnt.mountpoint).f_bfree
    fd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o600)
    os.write(fd, os.urandom(1 << 20))
    os.fsync(fd)
    assert os.statvfs(mnt.mountpoint).f_bfree < free0 - 200
    os.close(fd)
    assert wait_for(lambda: os.statvfs(mnt.mountpoint).f_bfree >= free0 - 4)
    assert sorted(os.listdir(d)) == ["named"]


def test_o_tmpfile_group_and_permissions(d):
    """An O_TMPFILE file takes its directory's setgid group, as one made by name would; a
    caller who may not write in the directory gets EACCES."""
    g = f"{d}/shared"
    os.mkdir(g)
    os.chown(g, 0, 4321)
    os.chmod(g, 0o2777)

    def make() -> tuple[int, int]:
        fd = os.open(g, os.O_TMPFILE | os.O_RDWR, 0o600)
        try:
            st = os.fstat(fd)
            return st.st_uid, st.st_gid
        finally:
            os.close(fd)

    assert as_user(make) == (NOBODY, 4321)
    os.chmod(g, 0o2755)
    assert as_user(lambda: errno_of(os.open, g, os.O_TMPFILE | os.O_RDWR, 0o600)) == errno.EACCES


def test_removed_directory_while_open(d):
    os.mkdir(f"{d}/gone")
    fd = os.open(f"{d}/gone", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(f"{d}/gone")
        st = os.fstat(fd)
        assert stat.S_ISDIR(st.st_mode) and st.st_nlink == 0
        assert os.listdir(fd) == []
        assert errno_of(os.mkdir, f"/proc/self/fd/{fd}/x") == errno.ENOENT
    finally:
        os.close(fd)
    os.mkdir(f"{d}/src")
    os.mkdir(f"{d}/dst")
    fd = os.open(f"{d}/dst", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(f"{d}/src", f"{d}/dst")
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert os.listdir(d) == ["dst"]


def test_removed_working_directory(d):
    os.mkdir(f"{d}/cwd")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(f"{d}/cwd")
            os.rmdir(f"{d}/cwd")
            st = os.stat(".")
            code = 0 if st.st_nlink == 0 and os.listdir(".") == [] else 2
        except OSError:
            code = 3
        finally:
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_fsync_fdatasync(d):
    p = f"{d}/f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"durable")
    os.fsync(fd)
    os.write(fd, b" too")
    os.fdatasync(fd)
    os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    assert read_file(p) == b"durable too"


def test_mmap_read_write(d):
    p = f"{d}/f"
    write_file(p, b"\0" * 3 * 4096 + b"tail")
    fd = os.open(p, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as m:
            assert m[-4:] == b"tail"
            m[0:5] = b"mmap!"
            m[8190:8194] = b"span"
            m.flush()
        assert os.pread(fd, 5, 0) == b"mmap!"
    finally:
        os.close(fd)
    data = read_file(p)
    assert data[:5] == b"mmap!" and data[8190:8194] == b"span" and data.endswith(b"tail")
    # a shared mapping sees writes made through write()
    fd = os.open(p, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
            os.pwrite(fd, b"WRITE", 100)
            assert m[100:105] == b"WRITE"
    finally:
        os.close(fd)


def test_sqlite_database_on_the_mount(d):
    import sqlite3

    con = sqlite3.connect(f"{d}/db.sqlite")
    con.execute("PRAGMA journal_mode=WAL")  # WAL uses a shared-memory mmap
    con.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
    with con:
        con.executemany("INSERT INTO t VALUES (?, ?)", ((i, os.urandom(200)) for i in range(2000)))
    assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 2000
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


# --- rename --------------------------------------------------------------------------------------


def test_rename(d):
    os.makedirs(f"{d}/a/sub/deep")
    os.makedirs(f"{d}/b/full")
    os.mkdir(f"{d}/b/empty")
    write_file(f"{d}/a/f", b"F")
    write_file(f"{d}/a/g", b"G")
    write_file(f"{d}/b/full/x", b"X")
    os.rename(f"{d}/a/f", f"{d}/a/f2")
    os.rename(f"{d}/a/f2", f"{d}/b/f3")
    assert read_file(f"{d}/b/f3") == b"F"
    os.rename(f"{d}/b/f3", f"{d}/a/g")  # over an existing file
    assert read_file(f"{d}/a/g") == b"F" and sorted(os.listdir(f"{d}/a")) == ["g", "sub"]
    assert errno_of(os.rename, f"{d}/a/sub", f"{d}/b/full") == errno.ENOTEMPTY
    assert errno_of(os.rename, f"{d}/a/g", f"{d}/b/empty") == errno.EISDIR
    assert errno_of(os.rename, f"{d}/b/empty", f"{d}/a/g") == errno.ENOTDIR
    assert errno_of(os.rename, f"{d}/a", f"{d}/a/sub/deep/a") == errno.EINVAL
    assert errno_of(os.rename, f"{d}/a", f"{d}/a/x") == errno.EINVAL
    assert errno_of(os.rename, f"{d}/missing", f"{d}/x") == errno.ENOENT
    os.rename(f"{d}/a/sub", f"{d}/b/empty")  # over an empty directory
    assert os.listdir(f"{d}/b/empty") == ["deep"]
    assert os.stat(f"{d}/a").st_nlink == 2 and os.stat(f"{d}/b").st_nlink == 4
    assert os.path.samestat(os.stat(f"{d}/b/empty/deep/.."), os.stat(f"{d}/b/empty"))
    os.link(f"{d}/a/g", f"{d}/a/g2")
    os.rename(f"{d}/a/g", f"{d}/a/g2")  # two names of one file: nothing happens
    assert sorted(os.listdir(f"{d}/a")) == ["g", "g2"]


def test_renameat2_flags(d):
    write_file(f"{d}/a", b"A")
    write_file(f"{d}/b", b"B")
    os.makedirs(f"{d}/dir/sub")
    assert errno_of(renameat2, f"{d}/a", f"{d}/b", RENAME_NOREPLACE) == errno.EEXIST
    renameat2(f"{d}/a", f"{d}/c", RENAME_NOREPLACE)
    assert read_file(f"{d}/c") == b"A" and not os.path.exists(f"{d}/a")
    renameat2(f"{d}/c", f"{d}/b", RENAME_EXCHANGE)
    assert read_file(f"{d}/c") == b"B" and read_file(f"{d}/b") == b"A"
    assert errno_of(renameat2, f"{d}/c", f"{d}/none", RENAME_EXCHANGE) == errno.ENOENT
    renameat2(f"{d}/b", f"{d}/dir", RENAME_EXCHANGE)  # a file and a directory
    assert read_file(f"{d}/dir") == b"A" and os.listdir(f"{d}/b") == ["sub"]
    assert errno_of(renameat2, f"{d}/b", f"{d}/b/sub", RENAME_EXCHANGE) == errno.EINVAL
    assert errno_of(renameat2, f"{d}/b", f"{d}/c", RENAME_EXCHANGE | RENAME_NOREPLACE) \
        == errno.EINVAL


def test_rename_whiteout_leaves_a_whiteout_as_on_ext4(d):
    """RENAME_WHITEOUT (what overlayfs asks of its upper layer) moves the name and leaves a
    character device 0/0 with mode 0 at the old one, made by the caller (group from a set-
    group-ID directory), in one step, for any caller (Linux 5.8 and later); NOREPLACE still
    refuses and EXCHANGE is refused; the same outcomes, modes, owners and link counts as ext4
    beside it."""
    ref = tempfile.mkdtemp(prefix="dwfs-whiteout-", dir="/var/tmp")
    os.chmod(ref, 0o777)

    def look(p):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return None
        kind = stat.S_IFMT(st.st_mode)
        return (oct(st.st_mode), st.st_nlink, st.st_uid, st.st_gid,
                st.st_rdev if kind == stat.S_IFCHR else None,
                read_file(p) if kind == stat.S_IFREG else None)

    try:
        seen = {}
        for top in (ref, d):
            write_file(f"{top}/a", b"A")
            write_file(f"{top}/b", b"B")
            os.makedirs(f"{top}/dir/sub")
            os.mkdir(f"{top}/sg", 0o777)
            os.chown(f"{top}/sg", 0, NOBODY)
            os.chmod(f"{top}/sg", 0o2777)
            write_file(f"{top}/sg/f", b"F")
            got = [errno_of(renameat2, f"{top}/a", f"{top}/b",
                            RENAME_WHITEOUT | RENAME_NOREPLACE)]
            got += [look(f"{top}/a"), look(f"{top}/b")]  # unchanged
            renameat2(f"{top}/a", f"{top}/b", RENAME_WHITEOUT)  # over an existing file
            got += [look(f"{top}/a"), look(f"{top}/b")]
            renameat2(f"{top}/dir", f"{top}/dir2", RENAME_WHITEOUT)  # a directory
            got += [look(f"{top}/dir"), os.listdir(f"{top}/dir2"), os.lstat(top).st_nlink]
            renameat2(f"{top}/sg/f", f"{top}/g", RENAME_WHITEOUT)  # out of a setgid dir
            got += [look(f"{top}/sg/f"), look(f"{top}/g")]
            got.append(errno_of(renameat2, f"{top}/b", f"{top}/g",
                                RENAME_WHITEOUT | RENAME_EXCHANGE))
            as_user(lambda top=top: renameat2(f"{top}/g", f"{top}/h", RENAME_WHITEOUT))
            got += [look(f"{top}/g"), look(f"{top}/h")]
            os.unlink(f"{top}/a")  # a whiteout is an ordinary name to remove
            got.append(sorted(os.listdir(top)))
            seen[top] = got
        assert seen[d] == seen[ref]
        whiteout = (oct(stat.S_IFCHR), 1, 0, 0, 0, None)
        assert seen[d][3] == whiteout and seen[d][4][-1] == b"A"
        assert seen[d][5] == whiteout and seen[d][6] == ["sub"]
        assert seen[d][8] == (oct(stat.S_IFCHR), 1, 0, NOBODY, 0, None)
        assert seen[d][10] == errno.EINVAL
        assert seen[d][11] == (oct(stat.S_IFCHR), 1, NOBODY, NOBODY, 0, None)
    finally:
        shutil.rmtree(ref, ignore_errors=True)


# --- attributes, times, permissions --------------------------------------------------------------


def test_chmod_chown_utimensat(d):
    p = f"{d}/f"
    write_file(p, b"x")
    os.chmod(p, 0o4755)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4755
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert not st.st_mode & stat.S_ISUID  # chown clears set-user-ID
    os.utime(p, ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    st = os.stat(p)
    assert st.st_atime_ns == 1_500_000_000_123_456_789
    assert st.st_mtime_ns == 1_600_000_000_987_654_321
    ctime = st.st_ctime_ns
    os.utime(p)  # now
    st = os.stat(p)
    assert st.st_mtime_ns > 1_600_000_000_987_654_321 and st.st_ctime_ns >= ctime
    os.symlink("f", f"{d}/l")
    os.utime(f"{d}/l", ns=(5, 6), follow_symlinks=False)
    assert os.lstat(f"{d}/l").st_mtime_ns == 6
    assert os.stat(p).st_mtime_ns != 6


def test_times_before_1970_and_far_ahead(d):
    """Times before 1970 are kept to the nanosecond (touch -d 1960 used to fail with EIO);
    times past what is stored (2262) are clamped, as the kernel clamps to what ext4 keeps."""
    p = f"{d}/f"
    write_file(p, b"")
    subprocess.run(["touch", "-d", "1960-01-01 00:00:00.5 UTC", p], check=True)
    assert os.stat(p).st_mtime_ns == -315_619_199_500_000_000
    for ns in (-1, -(1 << 62) - 7, (1 << 62) + 9):
        os.utime(p, ns=(ns, ns))
        st = os.stat(p)
        assert (st.st_atime_ns, st.st_mtime_ns) == (ns, ns)
    os.utime(p, ns=(3 * 10**19, -(1 << 63) - 10**12))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == ((1 << 63) - 1, -(1 << 63))
    drop_caches()
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == ((1 << 63) - 1, -(1 << 63))


def test_time_rules(d):
    p = f"{d}/f"
    write_file(p, b"x")
    old = 1_000_000_000_000_000_000
    os.utime(p, ns=(old, old))
    os.utime(d, ns=(old, old))
    c0 = os.stat(p).st_ctime_ns
    with open(p, "ab") as f:
        f.write(b"y")
    st = os.stat(p)
    assert st.st_mtime_ns > old and st.st_ctime_ns >= c0
    assert os.stat(d).st_mtime_ns == old
    write_file(f"{d}/g", b"")
    assert os.stat(d).st_mtime_ns > old
    os.utime(d, ns=(old, old))
    os.rename(f"{d}/g", f"{d}/h")
    assert os.stat(d).st_mtime_ns > old
    os.utime(p, ns=(old, old))
    read_file(p)
    assert os.stat(p).st_atime_ns > old  # relatime: atime before mtime is refreshed
    os.utime(p, ns=(old, old))
    os.truncate(p, os.stat(p).st_size)  # to the same size: mtime still set (as ext4)
    assert os.stat(p).st_mtime_ns > old
    os.utime(d, ns=(old, old + 1))
    os.listdir(d)
    assert os.stat(d).st_atime_ns > old  # listing is reading (relatime)
    os.symlink("f", f"{d}/l")
    os.utime(f"{d}/l", ns=(old, old + 1), follow_symlinks=False)
    os.readlink(f"{d}/l")
    assert os.lstat(f"{d}/l").st_atime_ns > old
    os.utime(p, ns=(old, old))
    c1 = os.stat(p).st_ctime_ns
    os.setxattr(p, "user.t", b"1")
    st = os.stat(p)
    assert st.st_mtime_ns == old and st.st_ctime_ns > c1 - 1
    for mode in (0, FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, FALLOC_ZERO_RANGE):
        os.utime(p, ns=(old, old))
        fd = os.open(p, os.O_RDWR)
        try:
            fallocate(fd, mode, 0, 1)  # any fallocate sets mtime (as ext4)
        finally:
            os.close(fd)
        assert os.stat(p).st_mtime_ns > old, mode


def test_permissions_as_nobody(d):
    secret = f"{d}/secret"
    write_file(secret, b"root only", 0o600)
    os.chmod(secret, 0o600)
    public = f"{d}/public"
    write_file(public, b"all", 0o644)
    os.mkdir(f"{d}/closed", 0o755)
    assert errno_of(as_user, lambda: read_file(secret)) == errno.EACCES
    assert as_user(lambda: read_file(public)) == b"all"
    assert errno_of(as_user, lambda: write_file(public, b"no")) == errno.EACCES
    assert errno_of(as_user, lambda: write_file(f"{d}/closed/x", b"")) == errno.EACCES
    assert errno_of(as_user, lambda: os.chmod(public, 0o666)) == errno.EPERM
    assert errno_of(as_user, lambda: os.chown(public, NOBODY, NOBODY)) == errno.EPERM
    assert errno_of(as_user, lambda: os.utime(public, ns=(1, 1))) == errno.EPERM
    assert errno_of(as_user, lambda: os.setxattr(public, "user.x", b"1")) == errno.EACCES
    # what nobody creates is nobody's, with the umask applied
    as_user(lambda: write_file(f"{d}/mine", b"m", 0o666))
    st = os.stat(f"{d}/mine")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o644)
    as_user(lambda: os.chmod(f"{d}/mine", 0o600))
    as_user(lambda: os.utime(f"{d}/mine", ns=(3, 4)))
    assert os.stat(f"{d}/mine").st_mtime_ns == 4
    # search permission on a directory
    os.mkdir(f"{d}/nox", 0o700)
    write_file(f"{d}/nox/f", b"")
    assert errno_of(as_user, lambda: os.stat(f"{d}/nox/f")) == errno.EACCES
    assert errno_of(as_user, lambda: os.listdir(f"{d}/nox")) == errno.EACCES
    # a non-member cannot give a file to a group; root can read anything
    assert errno_of(as_user, lambda: os.chown(f"{d}/mine", -1, 0)) == errno.EPERM
    assert read_file(f"{d}/mine") == b"m"
    # setgid cleared when a non-member chmods
    os.chown(f"{d}/mine", NOBODY, 4321)
    as_user(lambda: os.chmod(f"{d}/mine", 0o2755))
    assert not os.stat(f"{d}/mine").st_mode & stat.S_ISGID


def test_sticky_directory(d):
    t = f"{d}/tmp"
    os.mkdir(t)
    os.chmod(t, 0o1777)
    write_file(f"{t}/roots", b"r", 0o666)
    os.chmod(f"{t}/roots", 0o666)
    as_user(lambda: write_file(f"{t}/nobodys", b"n"))
    assert errno_of(as_user, lambda: os.unlink(f"{t}/roots")) == errno.EPERM
    assert errno_of(as_user, lambda: os.rename(f"{t}/roots", f"{t}/x")) == errno.EPERM
    assert as_user(lambda: read_file(f"{t}/roots")) == b"r"  # writable, not removable
    as_user(lambda: os.rename(f"{t}/nobodys", f"{t}/renamed"))
    as_user(lambda: os.unlink(f"{t}/renamed"))
    assert os.listdir(t) == ["roots"]
    os.unlink(f"{t}/roots")  # root may


def test_setgid_directory(d):
    g = f"{d}/shared"
    os.mkdir(g)
    os.chown(g, 0, 4321)
    os.chmod(g, 0o2777)
    as_user(lambda: write_file(f"{g}/f", b""))
    as_user(lambda: os.mkdir(f"{g}/sub"))
    st = os.stat(f"{g}/f")
    assert (st.st_uid, st.st_gid) == (NOBODY, 4321) and not st.st_mode & stat.S_ISGID
    st = os.stat(f"{g}/sub")
    assert st.st_gid == 4321 and st.st_mode & stat.S_ISGID
    as_user(lambda: os.mkdir(f"{g}/sub/deeper"))
    assert os.stat(f"{g}/sub/deeper").st_gid == 4321
    # a group-executable setgid file made by a non-member loses the bit
    as_user(lambda: os.close(os.open(f"{g}/exe", os.O_CREAT | os.O_WRONLY, 0o2755)))
    assert not os.stat(f"{g}/exe").st_mode & stat.S_ISGID
    as_user(lambda: os.close(os.open(f"{g}/exe2", os.O_CREAT | os.O_WRONLY, 0o2755)),
            groups=(4321,))
    assert os.stat(f"{g}/exe2").st_mode & stat.S_ISGID


# --- extended attributes -------------------------------------------------------------------------


def test_security_capability(d):
    """The kernel asks for security.capability before every write (answered without the
    database while no file has one); once set it is stored, read back, and a write drops it,
    as on ext4."""
    p = f"{d}/capf"
    write_file(p, b"x")
    assert errno_of(os.getxattr, p, "security.capability") == errno.ENODATA
    cap = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)  # v2: cap_net_bind_service
    os.setxattr(p, "security.capability", cap)
    assert os.getxattr(p, "security.capability") == cap
    with open(p, "r+b") as f:
        f.write(b"y")
    assert errno_of(os.getxattr, p, "security.capability") == errno.ENODATA
    assert read_file(p) == b"y"


def test_xattrs(d):
    p = f"{d}/f"
    write_file(p, b"")
    assert os.listxattr(p) == []
    assert errno_of(os.getxattr, p, "user.a") == errno.ENODATA
    assert errno_of(os.removexattr, p, "user.a") == errno.ENODATA
    assert errno_of(os.setxattr, p, "user.a", b"1", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(p, "user.a", b"1", os.XATTR_CREATE)
    assert errno_of(os.setxattr, p, "user.a", b"2", os.XATTR_CREATE) == errno.EEXIST
    os.setxattr(p, "user.a", b"22", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.a") == b"22"
    os.setxattr(p, "trusted.t", b"T")
    os.setxattr(p, "security.s", b"S")
    os.setxattr(p, "user.empty", b"")
    assert os.getxattr(p, "user.empty") == b""
    assert sorted(os.listxattr(p)) == ["security.s", "trusted.t", "user.a", "user.empty"]
    assert c_getxattr(p, "user.a", 0) == 2
    assert errno_of(c_getxattr, p, "user.a", 1) == errno.ERANGE
    assert c_getxattr(p, "user.a", 2) == 2
    need = c_listxattr(p, 0)
    assert need == len(b"security.s\0trusted.t\0user.a\0user.empty\0")
    assert errno_of(c_listxattr, p, need - 1) == errno.ERANGE
    os.removexattr(p, "user.a")
    assert errno_of(os.getxattr, p, "user.a") == errno.ENODATA
    assert errno_of(os.setxattr, p, "user." + "n" * 251, b"") == errno.ERANGE
    assert errno_of(os.setxattr, p, "bogus.x", b"") == errno.EOPNOTSUPP
    os.setxattr(p, "user.big", b"v" * 65536)
    assert os.getxattr(p, "user.big") == b"v" * 65536
    assert errno_of(os.setxattr, p, "user.big", b"v" * 65537) == errno.E2BIG
    os.setxattr(d, "user.dir", b"on a directory")
    assert os.getxattr(d, "user.dir") == b"on a directory"
    os.symlink("f", f"{d}/l")
    # user.* attributes are refused on symlinks (by the kernel)
    assert errno_of(os.setxattr, f"{d}/l", "user.x", b"1", follow_symlinks=False) \
        == errno.EPERM
    os.setxattr(f"{d}/l", "trusted.x", b"1", follow_symlinks=False)
    assert os.getxattr(f"{d}/l", "trusted.x", follow_symlinks=False) == b"1"


def test_xattr_names_stay_listable(d):
    """Attributes are refused (ENOSPC, as ext4 does when its attribute space is full) before
    their names would make a list longer than listxattr can return; values up to 64 KiB."""
    p = f"{d}/f"
    write_file(p, b"")
    os.setxattr(p, "user.big", b"v" * 65536)
    assert len(os.getxattr(p, "user.big")) == 65536
    assert errno_of(os.setxattr, p, "user.bigger", b"v" * 65537) == errno.E2BIG
    names = ["user.big"]
    code = 0
    for i in range(1000):
        name = f"user.{i:0200d}"
        try:
            os.setxattr(p, name, b"1")
        except OSError as exc:
            code = exc.errno
            break
        names.append(name)
    assert code == errno.ENOSPC and 300 < len(names) < 1000
    assert sorted(os.listxattr(p)) == sorted(names)
    os.setxattr(p, names[-1], b"replaced")  # an existing name can still be set
    os.removexattr(p, names[-1])
    os.setxattr(p, "user.short", b"fits again")
    assert "user.short" in os.listxattr(p)
    out = subprocess.run(["getfattr", "-d", "--absolute-names", p], capture_output=True,
                         text=True, check=True).stdout
    assert "user.short" in out


# --- the whole filesystem ------------------------------------------------------------------------


def test_writes_truncations_and_chowns_clear_setid_bits_as_on_ext4(d):
    """The mount asks the kernel to leave clearing set-user-ID and set-group-ID to it
    (FUSE_HANDLE_KILLPRIV_V2, so that writes skip a security.capability lookup each): a
    write, truncate(2) or O_TRUNC open by a process without CAP_FSETID clears set-user-ID,
    and set-group-ID where group execute is set; root's keep them; chown clears them even
    for root; a write removes security.capability. Same results as ext4 beside it."""
    ref = tempfile.mkdtemp(prefix="dwfs-setid-", dir="/var/tmp")
    os.chmod(ref, 0o777)

    def write(p):
        fd = os.open(p, os.O_WRONLY)
        try:
            os.pwrite(fd, b"y", 5)
        finally:
            os.close(fd)

    def truncate(p):
        os.truncate(p, 100)

    def open_truncating(p):
        os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))

    def chown(p):
        os.chown(p, 1, 1)

    cases = [(0o6775, write, True), (0o6745, write, True), (0o6775, truncate, True),
             (0o6745, truncate, True), (0o6775, open_truncating, True),
             (0o6775, write, False), (0o6775, truncate, False),
             (0o6775, open_truncating, False), (0o6775, chown, False), (0o6745, chown, False)]
    # A capability set (revision 2: cap_net_bind_service permitted) that a write removes.
    caps = struct.pack("<5I", 0x02000000, 1 << 10, 0, 0, 0)
    try:
        seen = {}
        for top in (ref, d):
            got = []
            for i, (mode, change, unprivileged) in enumerate(cases):
                p = os.path.join(top, f"f{i}")
                write_file(p, b"x" * 10_000)
                os.chown(p, NOBODY, NOBODY)
                os.chmod(p, mode)
                if unprivileged:
                    as_user(lambda p=p, change=change: change(p))
                else:
                    change(p)
                got.append(oct(stat.S_IMODE(os.stat(p).st_mode)))
            p = os.path.join(top, "capable")
            write_file(p, b"x" * 100, 0o755)
            os.setxattr(p, "security.capability", caps)
            write(p)
            got.append(errno_of(os.getxattr, p, "security.capability"))
            seen[top] = got
        assert seen[d] == seen[ref]
        assert seen[d][0] == oct(0o775) and seen[d][1] == oct(0o2745)  # what ext4 does here
        assert seen[d][5] == oct(0o6775) and seen[d][-1] == errno.ENODATA
    finally:
        shutil.rmtree(ref, ignore_errors=True)


def test_statfs_and_df(mnt, d):
    s = os.statvfs(mnt.mountpoint)
    assert s.f_namemax == 255 and s.f_bsize > 0
    assert 0 < s.f_bavail <= s.f_bfree < s.f_blocks
    write_file(f"{d}/f", os.urandom(1 << 20))
    os.sync()
    s2 = os.statvfs(mnt.mountpoint)
    assert s.f_bfree - s2.f_bfree >= (1 << 20) // s.f_frsize
    out = subprocess.run(["df", "-P", mnt.mountpoint], capture_output=True, text=True,
                         check=True).stdout
    assert mnt.mountpoint in out
    os.unlink(f"{d}/f")
    assert os.statvfs(mnt.mountpoint).f_bfree >= s.f_bfree - 16


def test_enospc_then_space_back(mnt, d):
    keep = os.urandom(500_000)
    write_file(f"{d}/keep", keep)
    fd = os.open(f"{d}/fill", os.O_WRONLY | os.O_CREAT, 0o644)
    chunk = b"\x5a" * (1 << 20)
    written = 0
    try:
        with pytest.raises(OSError) as exc:
            while True:
                written += os.write(fd, chunk)
        assert exc.value.errno == errno.ENOSPC
        assert written > 100 << 20
        os.fsync(fd)  # whatever write() accepted can be stored
        with pytest.raises(OSError) as exc:
            write_file(f"{d}/more", b"m" * (4 << 20))
        assert exc.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.stat(f"{d}/fill").st_size == written
    assert read_file(f"{d}/keep") == keep
    with open(f"{d}/fill", "rb") as f:
        f.seek(written - 100)
        assert f.read() == b"\x5a" * 100
    # Full, and still truncate(2), which knows no ENOSPC, works: where the new last sector
    # holds data it is rewritten (copy-on-write), where it is a hole it stays one.
    os.truncate(f"{d}/fill", written - 3 * 4096 - 100)
    with open(f"{d}/fill", "rb") as f:
        f.seek(written - 3 * 4096 - 200)
        assert f.read() == b"\x5a" * 100
    write_file(f"{d}/sparse", b"")
    os.truncate(f"{d}/sparse", 10 << 20)
    os.truncate(f"{d}/sparse", 5_000_001)
    assert os.stat(f"{d}/sparse").st_size == 5_000_001
    assert read_file(f"{d}/sparse") == bytes(5_000_001)
    os.unlink(f"{d}/sparse")
    os.unlink(f"{d}/fill")
    if os.path.exists(f"{d}/more"):
        os.unlink(f"{d}/more")
    # The space is back at once (the files were closed long before): counted free though
    # the kernel's FORGET comes a moment later, and the writes below, which need it, wait
    # for that FORGET instead of failing with ENOSPC.
    assert os.statvfs(mnt.mountpoint).f_bfree > 60 << 8
    fd = os.open(f"{d}/again", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(50):
            os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(f"{d}/again")
    assert read_file(f"{d}/keep") == keep


def test_remount_keeps_everything(mnt, d):
    """Last: every test's files survive an unmount and a mount."""
    write_file(f"{d}/f", b"persist", 0o640)
    os.setxattr(f"{d}/f", "user.k", b"v")
    os.symlink("f", f"{d}/l")
    os.mkfifo(f"{d}/p")
    os.utime(f"{d}/f", ns=(11, 22))
    before = {}
    for root, dirs, files in os.walk(mnt.mountpoint):
        for n in dirs + files:
            p = os.path.join(root, n)
            st = os.lstat(p)
            before[p] = (st.st_mode, st.st_size, st.st_nlink, st.st_uid, st.st_gid,
                         st.st_mtime_ns, st.st_ino)
    mnt.umount()
    mnt.mount()
    after = {}
    for root, dirs, files in os.walk(mnt.mountpoint):
        for n in dirs + files:
            p = os.path.join(root, n)
            st = os.lstat(p)
            after[p] = (st.st_mode, st.st_size, st.st_nlink, st.st_uid, st.st_gid,
                        st.st_mtime_ns, st.st_ino)
    assert after == before
    assert read_file(f"{d}/f") == b"persist"
    assert os.getxattr(f"{d}/f", "user.k") == b"v"
    assert os.readlink(f"{d}/l") == "f"


def test_fsync_survives_kill9(mounted_fs):
    """Data fsync returned for survives kill -9 of the daemon and a remount."""
    from mountutil import daemon_pid, force_unmount

    m = mounted_fs
    synced = os.urandom(200_000)
    write_file(m.path("synced"), synced)
    fd = os.open(m.path("synced"), os.O_RDWR)
    os.pwrite(fd, b"tail-synced", len(synced))
    os.fdatasync(fd)
    os.close(fd)
    os.mkdir(m.path("dir"))
    fd = os.open(m.path("dir/f"), os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"in a new directory")
    os.fsync(fd)
    os.close(fd)
    pid = daemon_pid(m.warehouse)
    os.kill(pid, 9)
    force_unmount(m.mountpoint, m.warehouse)
    m.mount()
    assert read_file(m.path("synced")) == synced + b"tail-synced"
    assert read_file(m.path("dir/f")) == b"in a new directory"
    assert stat.S_IMODE(os.stat(m.path("dir/f")).st_mode) == 0o600


REPLACER = r"""
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    tmp = os.path.join(d, f"tmp{i % 2}")
    with open(tmp, "wb") as f:
        f.write(b"v%d" % i)
    os.rename(tmp, os.path.join(d, "target"))
"""


def test_a_name_replaced_by_rename_never_goes_missing(d):
    """While another process replaces a file by rename (how editors and package managers
    save), the name exists throughout: opening and stat'ing it never fail with ENOENT, and
    what is read is one whole version or another."""
    import sys
    target = os.path.join(d, "target")
    with open(target, "wb") as f:
        f.write(b"init")
    writer = subprocess.Popen([sys.executable, "-c", REPLACER, d, "3000"])
    missing, reads = 0, 0
    try:
        while writer.poll() is None:
            try:
                os.stat(target)
                with open(target, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                missing += 1
                continue
            reads += 1
            assert data == b"init" or (data[:1] == b"v" and data[1:].isdigit()), data
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0
    assert reads > 0
    assert missing == 0, f"{missing} of {missing + reads} reads found no {target}"


def test_cached_pages_survive_a_write_and_an_attribute_refresh(d):
    """A write to one page of a file leaves the kernel's cache of its other pages in place,
    even when its attributes are fetched again (its mtime changed): every change reaches the
    file through this mount, so the cache is never stale. (With FUSE's auto_inval_data the
    whole file's cache went at every stat after a write: 1 write + 10 cached 4 KiB reads of a
    32 MiB file took 1,135 µs instead of 59.)"""
    p = f"{d}/f"
    data = bytearray(os.urandom(1 << 20))
    write_file(p, bytes(data))
    fd = os.open(p, os.O_RDWR)
    try:
        assert os.pread(fd, len(data), 0) == data
        assert resident_pages(fd, len(data)) == 256
        os.pwrite(fd, b"z" * 4096, 0)
        data[:4096] = b"z" * 4096
        st = os.stat(p)  # new attributes from the daemon: a new mtime
        assert st.st_size == len(data)
        assert os.pread(fd, 4096, 8192) == data[8192:12288]
        assert resident_pages(fd, len(data)) == 256
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    drop_caches()
    assert read_file(p) == bytes(data)


def test_cached_pages_never_go_stale_after_changes_the_daemon_makes(d):
    """With every page of two files cached, the changes whose bytes the daemon makes itself
    (zero range, punch hole, copy_file_range, truncate and extend) read back as made: the
    kernel drops the ranges they touch, without FUSE's auto_inval_data."""
    data = os.urandom(1 << 20)
    p, q = f"{d}/f", f"{d}/g"
    write_file(p, data)
    write_file(q, data)
    fd, gd = os.open(p, os.O_RDWR), os.open(q, os.O_RDWR)
    try:
        assert os.pread(fd, len(data), 0) == data and os.pread(gd, len(data), 0) == data
        assert resident_pages(fd, len(data)) == resident_pages(gd, len(data)) == 256
        fallocate(fd, FALLOC_ZERO_RANGE, 4096, 8192)
        assert os.pread(fd, 8192, 4096) == bytes(8192)
        fallocate(fd, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, 65536, 65536)
        assert os.pread(fd, 65536, 65536) == bytes(65536)
        new = os.urandom(200_000)
        os.pwrite(fd, new, 300_000)
        assert os.copy_file_range(fd, gd, len(new), 300_000, 500_000) == len(new)
        assert os.pread(gd, len(new), 500_000) == new
        os.ftruncate(gd, 100_000)
        os.ftruncate(gd, len(data))
        assert os.pread(gd, 4096, 200_000) == bytes(4096)
        assert os.pread(gd, 10, 99_990) == data[99_990:100_000]
    finally:
        os.close(fd)
        os.close(gd)
