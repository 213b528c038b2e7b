"""dwfs's own FUSE transport: the kernel's struct layouts, requests it does not implement,
requests answered concurrently on several threads, and the end of a session."""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import hashlib
import os
import random
import re
import select
import signal
import stat
import subprocess
import threading
import time

import pytest
from mountutil import daemon_pid, dwfs, is_mounted, wait_for_log

from dwfs import fuseabi as abi
from dwfs.mounts import pid_alive
from vfs.attrs import Attr

pytestmark = pytest.mark.timeout(300)

UNKNOWN_IOCTL = 0x80047863  # _IOR('x', 99, int): no filesystem's


def _attr(**kw) -> Attr:
    base = dict(ino=7, mode=stat.S_IFREG | 0o644, nlink=1, uid=1000, gid=100, size=5000,
                rdev=0, atime_ns=1_700_000_000_123_456_789, mtime_ns=2, ctime_ns=3,
                blocks=16, blksize=65536)
    base.update(kw)
    return Attr(**base)


def test_replies_have_the_kernels_sizes_and_fields():
    """Sizes as in linux/fuse.h 7.31; a wrong size makes the kernel refuse the reply (EINVAL)."""
    assert abi.IN_HEADER.size == 40
    assert abi.OUT_HEADER.size == 16
    assert abi.INIT_OUT.size == 64
    assert abi.SETATTR_IN.size == 88
    assert abi.READ_IN.size == abi.WRITE_IN.size == 40
    assert abi.KSTATFS.size == 80
    assert abi.COPY_FILE_RANGE_IN.size == 56 and abi.COPY_FILE_RANGE_OUT.size == 8
    a = _attr()
    entry = abi.pack_entry(a, 300.0, 1.5)
    assert len(entry) == 128
    nodeid, gen, ev, av, evn, avn = abi.ENTRY_OUT.unpack_from(entry)
    assert (nodeid, gen, ev, av, evn, avn) == (7, 0, 300, 1, 0, 500_000_000)
    fields = abi.ATTR.unpack_from(entry, abi.ENTRY_OUT.size)
    assert fields[0:4] == (7, 5000, 16, 1_700_000_000)  # ino size blocks atime
    assert fields[6] == 123_456_789  # atimensec
    assert fields[9:15] == (a.mode, 1, 1000, 100, 0, 65536)
    assert len(abi.pack_attr_out(a, 1.0)) == 104
    negative = abi.pack_negative_entry(300.0)
    assert abi.ENTRY_OUT.unpack_from(negative)[0] == 0 and len(negative) == 128


@pytest.mark.parametrize("name", [b"a", b"1234567", b"12345678", b"x" * 255])
def test_directory_entries_are_padded_to_eight_bytes(name):
    raw = abi.pack_dirent(9, 3, name, stat.S_IFDIR | 0o755)
    assert len(raw) % 8 == 0
    assert len(raw) - abi.DIRENT.size - len(name) < 8
    ino, off, namelen, typ = abi.DIRENT.unpack_from(raw)
    assert (ino, off, namelen, typ) == (9, 3, len(name), 4)  # DT_DIR
    assert raw[abi.DIRENT.size:abi.DIRENT.size + namelen] == name


def test_unimplemented_requests_get_a_clean_errno(mounted_fs):
    """A request dwfs does not answer (POLL, sent by poll(2) on a file) gets ENOSYS, and the
    kernel answers the poll itself from then on (readable and writable, as for any file that
    does not poll); an ioctl dwfs does not know gets ENOTTY. The mount goes on serving (a
    copy_file_range after them)."""
    path = mounted_fs.path("f")
    data = os.urandom(300_000)
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(2):  # the second time the kernel knows without asking
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLOUT)
            assert poller.poll(1000) == [(fd, select.POLLIN | select.POLLOUT)]
            with pytest.raises(OSError) as exc:
                fcntl.ioctl(fd, UNKNOWN_IOCTL, array.array("i", [0]))
            assert exc.value.errno == errno.ENOTTY
        out = os.open(mounted_fs.path("g"), os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            copied = 0
            while copied < len(data):
                n = os.copy_file_range(fd, out, len(data) - copied, copied, copied)
                assert n > 0
                copied += n
        finally:
            os.close(out)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == data
    with open(mounted_fs.path("g"), "rb") as f:
        assert f.read() == data


def test_concurrent_requests_all_get_their_own_answers(mounted_fs):
    """Eight threads create, write (small and large writes: inline and worker lanes), read
    back, rename, list and remove at once; every answer must belong to its own request."""
    errors: list[str] = []

    def worker(n: int) -> None:
        rng = random.Random(n)
        d = mounted_fs.path(f"d{n}")
        os.mkdir(d)
        kept = {}
        for i in range(40):
            name = os.path.join(d, f"f{i}")
            data = rng.randbytes(rng.choice([100, 5000, 70_000, 1_200_000]))
            with open(name, "wb") as f:
                f.write(data)
            if i % 3 == 0:
                os.rename(name, name + ".r")
                name += ".r"
            if i % 5 == 0:
                os.unlink(name)
                continue
            kept[os.path.basename(name)] = hashlib.sha256(data).hexdigest()
            os.setxattr(name, "user.n", str(i).encode())
        if sorted(os.listdir(d)) != sorted(kept):
            errors.append(f"thread {n}: listing {sorted(os.listdir(d))} != {sorted(kept)}")
        for name, digest in kept.items():
            with open(os.path.join(d, name), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != digest:
                    errors.append(f"thread {n}: {name} read back wrong")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_quiet_mount_stops_polling_for_requests(mounted_fs):
    """Requests in quick succession are polled for; once they stop, the reading thread sleeps
    (a poll that never ended would burn a whole CPU)."""
    pid = daemon_pid(mounted_fs.warehouse)
    assert pid is not None
    d = mounted_fs.path("quick")
    os.mkdir(d)
    for i in range(2000):  # a loop of small requests: the reader polls between them
        os.close(os.open(os.path.join(d, f"f{i}"), os.O_CREAT | os.O_WRONLY, 0o644))
        os.stat(os.path.join(d, f"f{i}"))
    time.sleep(0.5)
    before = _cpu_seconds(pid)
    time.sleep(3)
    assert _cpu_seconds(pid) - before < 0.5  # polling all along would be about 3 s
    assert len(os.listdir(d)) == 2000


def test_the_daemon_leaves_its_start_up_objects_out_of_garbage_collection(mounted_fs):
    """Once the parity kernels are loaded, the objects made while starting (libraries,
    kernels: over 100,000) are frozen, so a full collection does not walk them (it took
    30-58 ms before, a pause for every request)."""
    text = "start-up objects left out of garbage collection"
    log = wait_for_log(mounted_fs.warehouse, text)
    found = re.search(r"(\d+) " + text, log)
    assert found, log[-2000:]
    assert int(found.group(1)) > 20_000
    os.mkdir(mounted_fs.path("after"))  # the mount still answers
    assert os.listdir(mounted_fs.path("after")) == []


def test_sigterm_with_a_file_open_loses_nothing(tmp_path, fs_mount):
    """SIGTERM detaches the mount; a process still holding a file goes on writing to it, and
    the daemon exits once that file is closed, with everything stored (with fusectl mounted,
    as on any systemd machine, through which the daemon could end the connection at once)."""
    from mountutil import make_warehouse

    with _fusectl():
        m = fs_mount(make_warehouse(tmp_path / "wh"))
        pid, held = _sigterm_while_held(m)
        try:
            held.write(b"after\n")
            held.flush()
            os.fsync(held.fileno())
        finally:
            held.close()
        deadline = time.monotonic() + 30
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(pid)
        m.mount()
        with open(m.path("held"), "rb") as f:
            assert f.read() == b"before\nafter\n"
        m.umount()
        dwfs("fsck", m.warehouse)  # exits non-zero on any finding


def test_second_sigterm_ends_the_mount_with_a_file_still_open(tmp_path, fs_mount):
    """A second SIGTERM does not wait for open files: the holder sees ENOTCONN, the daemon
    exits, and what was written before the first signal is stored (it commits on detach)."""
    from mountutil import make_warehouse

    with _fusectl():
        m = fs_mount(make_warehouse(tmp_path / "wh"))
        pid, held = _sigterm_while_held(m)
        try:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not pid_alive(pid)
            with pytest.raises(OSError) as exc:
                held.write(b"after\n")
                held.flush()
            assert exc.value.errno == errno.ENOTCONN
        finally:
            with contextlib.suppress(OSError):
                held.close()
        m.mount()
        with open(m.path("held"), "rb") as f:
            assert f.read() == b"before\n"
        m.umount()
        dwfs("fsck", m.warehouse)


@contextlib.contextmanager
def _fusectl():
    """fusectl mounted (as systemd mounts it at boot) for the duration, if it was not."""
    where = "/sys/fs/fuse/connections"
    if os.path.ismount(where):
        yield
        return
    done = subprocess.run(["mount", "-t", "fusectl", "none", where], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"fusectl is not mounted and cannot be ({done.stderr.strip()})")
    try:
        yield
    finally:
        subprocess.run(["umount", where], capture_output=True, check=False)


def _sigterm_while_held(m):
    """Mount, open `held` and write a line to it, SIGTERM the daemon: (pid, the open file)
    once the mount is detached, with the daemon still serving that file."""
    m.mount()
    pid = daemon_pid(m.warehouse)
    assert pid is not None
    held = open(m.path("held"), "wb")  # noqa: SIM115 - the caller closes it
    held.write(b"before\n")
    held.flush()
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while is_mounted(m.mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(m.mountpoint)
    assert pid_alive(pid)  # the open file keeps it serving
    return pid, held


@pytest.mark.parametrize("minor", [30, 31, 32, 33, 44])
def test_init_takes_kernels_from_7_31_and_killpriv_v2_only_where_offered(minor):
    """dwfs speaks FUSE 7.33 and works with kernels from 7.31 (Linux 5.4): it asks for
    HANDLE_KILLPRIV_V2 (and so clears setid bits itself) only when the kernel offers it, as
    kernels from 7.33 do; an older protocol is refused with EPROTO."""
    from dwfs.fusehandlers import Handlers
    from dwfs.fusesession import WANTED, Request, Session

    offered = WANTED if minor >= 33 else WANTED & ~abi.HANDLE_KILLPRIV_V2
    session = Session.__new__(Session)  # its request parsers, without a mount
    session.handlers = Handlers.__new__(Handlers)  # ENOSYS for all: only INIT is sent
    session.mountpoint, session.device = "/nowhere", None  # no mount's readahead to raise
    read_end, write_end = os.pipe()
    try:
        init = session._parsers()[abi.INIT]
        init(Request(write_end, 9, 0, 0, 0), 0,
             memoryview(abi.INIT_IN.pack(abi.KERNEL_MAJOR, minor, 1 << 20, offered)))
        reply = os.read(read_end, 4096)
    finally:
        os.close(read_end)
        os.close(write_end)
    length, error, unique = abi.OUT_HEADER.unpack_from(reply)
    assert unique == 9 and length == len(reply)
    if minor < 31:
        assert error == -errno.EPROTO
        return
    assert error == 0
    major, our_minor, _, flags, *_ = abi.INIT_OUT.unpack_from(reply, abi.OUT_HEADER.size)
    assert (major, our_minor) == (abi.KERNEL_MAJOR, abi.KERNEL_MINOR)
    assert bool(flags & abi.HANDLE_KILLPRIV_V2) == (minor >= 33)
