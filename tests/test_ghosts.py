"""Ghost files through a real mount: importing a real tree (part of the Python standard library)
without fetching anything, reading it back exactly, partial reads of a large ghost, missing and
changed sources, dehydrate and pin rules, writing to a ghost, the cache limit, `--watch`, smart
folders over states, and persistence across a remount."""

from __future__ import annotations

import contextlib
import email
import errno
import hashlib
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time

import pytest
from mountutil import daemon_pid, dwfs, make_warehouse, mounted_warehouse
from posixutil import FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, fallocate

from dwfs import control

STATE = "user.dwfs.state"
MiB = 1 << 20
STDLIB = os.path.dirname(os.path.dirname(email.__file__))


@pytest.fixture(scope="module")
def fsm(tmp_path_factory):
    """One mounted filesystem (raidz2, five 128 MiB members) for the whole module."""
    with mounted_warehouse(tmp_path_factory.mktemp("ghosts"), size="128M") as m:
        yield m


def state(path: str) -> str | None:
    try:
        return os.getxattr(path, STATE).decode()
    except OSError as exc:
        assert exc.errno == errno.ENODATA
        return None


def stored(path: str) -> str | None:
    """The state of a ghost once the fetch its reads started has stored everything (a read
    returns as soon as its bytes arrive; storing them may take a moment longer)."""
    deadline = time.monotonic() + 20
    while state(path) == "ghost" and time.monotonic() < deadline:
        time.sleep(0.05)
    return state(path)


def fetched(warehouse: str) -> list[str]:
    """The fetch lines of the daemon's log."""
    with open(os.path.join(warehouse, "dwfs.log"), encoding="utf-8") as f:
        return [line for line in f if ": fetched " in line]


def tree_listing(top: str) -> dict[str, tuple]:
    out = {}
    for d, dirs, files in os.walk(top):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            size = st.st_size if not os.path.isdir(p) else 0
            out[os.path.relpath(p, top)] = (st.st_mode, size, st.st_mtime_ns)
    return out


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def import_into(fsm, source: str, name: str) -> str:
    dest = fsm.path(name)
    os.makedirs(dest, exist_ok=True)
    dwfs("ghost", "import", source, dest)
    return dest


@pytest.fixture(scope="module")
def stdlib_tree(tmp_path_factory):
    """A copy of a few standard-library packages (about 170 files) the tests may change."""
    top = tmp_path_factory.mktemp("stdlib") / "lib"
    for pkg in ("email", "json", "http", "logging", "xml", "urllib", "asyncio", "unittest",
                "importlib"):
        shutil.copytree(os.path.join(STDLIB, pkg), top / pkg,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return str(top)


def test_import_shows_everything_and_fetches_nothing_until_read(fsm, stdlib_tree):
    before = len(fetched(fsm.warehouse))
    dest = import_into(fsm, stdlib_tree, "lib")
    assert tree_listing(dest) == tree_listing(stdlib_tree)  # names, modes, sizes, mtimes
    found = subprocess.run(["find", dest, "-type", "f"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert len(found) > 150
    du = subprocess.run(["du", "-s", "-B1", dest], capture_output=True, text=True, check=True)
    assert int(du.stdout.split()[0]) <= 4096 * 100  # directories only: no file content stored
    for p in found:
        assert os.stat(p).st_blocks == 0
        # an empty file has nothing to fetch: it is hydrated from the start
        assert state(p) == ("ghost" if os.path.getsize(p) else "hydrated")
    assert len(fetched(fsm.warehouse)) == before  # stat, find and du fetched nothing
    # reading fetches: sha256sum and cp see exactly the source's bytes
    sums = subprocess.run(["sha256sum", *found], capture_output=True, text=True, check=True)
    for line in sums.stdout.splitlines():
        digest, path = line.split(maxsplit=1)
        assert digest == sha256_of(os.path.join(stdlib_tree, os.path.relpath(path, dest)))
    copy = os.path.join(os.path.dirname(fsm.mountpoint), "copied")
    subprocess.run(["cp", "-a", dest, copy], check=True)
    diff = subprocess.run(["diff", "-r", stdlib_tree, copy], capture_output=True, text=True,
                          check=False)
    assert diff.returncode == 0, diff.stdout
    assert {stored(p) for p in found} == {"hydrated"}
    assert all(os.stat(p).st_blocks > 0 for p in found if os.path.getsize(p))
    assert len(fetched(fsm.warehouse)) == before + len(
        [p for p in found if os.path.getsize(p)])


def test_import_reports_progress_in_order_before_its_result(fsm, tmp_path):
    """The daemon's progress updates for a long request reach the client whole and in order,
    ahead of the result (they are handed to the event loop without the worker waiting)."""
    src = tmp_path / "many"
    for d in range(41):
        (src / f"d{d:02d}").mkdir(parents=True)
        for f in range(100):
            (src / f"d{d:02d}" / f"f{f:03d}").write_bytes(b"x" * (f + 1))
    os.mkdir(fsm.path("progress"))
    seen: list[tuple[int, int]] = []
    op = {"op": "ghost-import", "source": str(src), "dest": "/progress", "uid": os.getuid(),
          "gid": os.getgid()}
    result = control.request(control.control_socket_path(fsm.warehouse), op,
                             lambda done, total: seen.append((done, total)))
    assert result["ghosts"] == 4100 and result["directories"] == 41
    done = [d for d, _t in seen]
    assert done == sorted(done) and len(done) >= 3, seen  # one per batch of 2,000 entries
    assert done[-1] == 4141, seen  # every file and directory accounted for
    assert len(os.listdir(fsm.path("progress", "d40"))) == 100


def test_partial_reads_of_a_large_ghost(fsm, tmp_path):
    src = tmp_path / "big"
    src.mkdir()
    data = os.urandom(48 * MiB)
    (src / "large.bin").write_bytes(data)
    dest = import_into(fsm, str(src), "big")
    path = os.path.join(dest, "large.bin")
    with open(path, "rb") as f:
        for offset, length in ((40 * MiB + 123, 5000), (0, 10), (48 * MiB - 7, 100),
                               (17 * MiB - 1, 2 * MiB)):
            f.seek(offset)
            assert f.read(length) == data[offset:offset + length]
    assert sha256_of(path) == hashlib.sha256(data).hexdigest()


def test_concurrent_readers_share_one_fetch(fsm, tmp_path):
    src = tmp_path / "shared"
    src.mkdir()
    data = os.urandom(32 * MiB)
    (src / "s.bin").write_bytes(data)
    dest = import_into(fsm, str(src), "shared")
    path = os.path.join(dest, "s.bin")
    readers = [subprocess.Popen(["sha256sum", path], stdout=subprocess.PIPE, text=True)
               for _ in range(4)]
    outs = [r.communicate(timeout=120)[0].split()[0] for r in readers]
    assert outs == [hashlib.sha256(data).hexdigest()] * 4
    mine = [line for line in fetched(fsm.warehouse) if str(src / "s.bin") in line]
    assert len(mine) == 1


def test_missing_or_changed_source_gives_eio_and_keeps_the_ghost(fsm, tmp_path):
    src = tmp_path / "fragile"
    src.mkdir()
    (src / "gone.txt").write_bytes(b"soon gone")
    (src / "edited.txt").write_bytes(b"original")
    dest = import_into(fsm, str(src), "fragile")
    os.unlink(src / "gone.txt")
    (src / "edited.txt").write_bytes(b"edited!!")  # same size, new mtime
    for name in ("gone.txt", "edited.txt"):
        with pytest.raises(OSError) as info, open(os.path.join(dest, name), "rb") as f:
            f.read()
        assert info.value.errno == errno.EIO
        assert state(os.path.join(dest, name)) == "ghost"
        assert os.stat(os.path.join(dest, name)).st_blocks == 0
    with open(os.path.join(fsm.warehouse, "dwfs.log"), encoding="utf-8") as f:
        log = f.read()
    assert str(src / "gone.txt") in log and "cannot be opened" in log
    assert str(src / "edited.txt") in log and "changed" in log


def test_a_refreshed_ghost_is_read_anew_even_by_a_reader_that_cached_it(fsm, tmp_path):
    """The kernel keeps a file's cached pages across attribute changes; when an import finds
    the source changed and refreshes the ghost, the daemon drops what the kernel cached, so
    an open descriptor and a new open both read the new content."""
    src = tmp_path / "refreshed"
    src.mkdir()
    (src / "f").write_bytes(b"A" * 100_000)
    dest = import_into(fsm, str(src), "refreshed")
    path = os.path.join(dest, "f")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 100_000, 0) == b"A" * 100_000  # now in the kernel's cache
        (src / "f").write_bytes(b"B" * 100_000)  # same size
        st = os.stat(src / "f")
        os.utime(src / "f", ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))  # a new mtime
        import_into(fsm, str(src), "refreshed")
        assert os.pread(fd, 100_000, 0) == b"B" * 100_000
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == b"B" * 100_000


def test_dehydrate_and_pin_rules(fsm, tmp_path):
    src = tmp_path / "states"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(3 * MiB))
    (src / "b.bin").write_bytes(os.urandom(2 * MiB))
    dest = import_into(fsm, str(src), "states")
    a, b = os.path.join(dest, "a.bin"), os.path.join(dest, "b.bin")
    dwfs("ghost", "hydrate", a)
    assert state(a) == "hydrated" and os.stat(a).st_blocks >= 3 * MiB // 512
    dwfs("ghost", "dehydrate", a)
    assert state(a) == "ghost" and os.stat(a).st_blocks == 0
    with open(a, "rb") as f:  # fetched again on the next read
        assert f.read() == (src / "a.bin").read_bytes()
    dwfs("ghost", "pin", b)
    assert state(b) == "pinned"
    with pytest.raises(OSError) as info:
        os.setxattr(b, STATE, b"ghost")
    assert info.value.errno == errno.EPERM
    r = dwfs("ghost", "dehydrate", b, check=False)
    assert r.returncode != 0 and "pinned" in r.stderr
    assert state(b) == "pinned" and os.stat(b).st_blocks > 0
    dwfs("ghost", "unpin", b)
    assert state(b) == "hydrated"
    (src / "b.bin").write_bytes(os.urandom(2 * MiB))  # the source no longer matches
    with pytest.raises(OSError) as info:
        os.setxattr(b, STATE, b"ghost")
    assert info.value.errno == errno.EIO
    assert state(b) == "hydrated" and os.stat(b).st_blocks > 0  # the local copy stays
    for bad in (b"cloud", b""):
        with pytest.raises(OSError) as info:
            os.setxattr(a, STATE, bad)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        os.removexattr(a, STATE)
    assert info.value.errno == errno.EPERM
    assert STATE in os.listxattr(a)


def test_writing_to_a_ghost_fetches_it_and_makes_it_ordinary(fsm, tmp_path):
    src = tmp_path / "edit"
    src.mkdir()
    data = os.urandom(MiB + 17)
    (src / "w.bin").write_bytes(data)
    (src / "t.bin").write_bytes(os.urandom(4096))
    dest = import_into(fsm, str(src), "edit")
    w = os.path.join(dest, "w.bin")
    with open(w, "r+b") as f:
        f.seek(1000)
        f.write(b"XYZ")
    with open(w, "rb") as f:
        assert f.read() == data[:1000] + b"XYZ" + data[1003:]
    assert state(w) is None and STATE not in os.listxattr(w)
    with pytest.raises(OSError) as info:  # an ordinary file has no ghost state to set
        os.setxattr(w, STATE, b"pinned")
    assert info.value.errno == errno.EOPNOTSUPP
    t = os.path.join(dest, "t.bin")
    with open(t, "wb") as f:  # O_TRUNC: empty and ordinary, nothing fetched
        f.write(b"new")
    assert state(t) is None
    with open(t, "rb") as f:
        assert f.read() == b"new"
    assert not [line for line in fetched(fsm.warehouse) if str(src / "t.bin") in line]


def test_seek_and_fallocate_on_ghosts(fsm, tmp_path):
    """SEEK_DATA/SEEK_HOLE on a ghost see data throughout without fetching it (so `cp`
    copies every byte); a hole punched into a ghost fetches it first and makes it an
    ordinary file with the hole in place."""
    src = tmp_path / "seek"
    src.mkdir()
    data = os.urandom(3 * 65536 + 5)
    (src / "s.bin").write_bytes(data)
    dest = import_into(fsm, str(src), "seek")
    p = os.path.join(dest, "s.bin")
    fd = os.open(p, os.O_RDWR)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 70_000, os.SEEK_DATA) == 70_000
        assert os.lseek(fd, 0, os.SEEK_HOLE) == len(data)
        assert state(p) == "ghost"
        assert not [line for line in fetched(fsm.warehouse) if str(src / "s.bin") in line]
        fallocate(fd, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, 65536, 65536)
    finally:
        os.close(fd)
    assert state(p) is None
    with open(p, "rb") as f:
        assert f.read() == data[:65536] + bytes(65536) + data[131072:]


def test_copy_file_range_with_ghosts(fsm, tmp_path):
    """copy_file_range from a ghost fetches what it copies; into a ghost, fetches it first
    and makes it an ordinary file with the copied range in place."""
    src = tmp_path / "copy"
    src.mkdir()
    a, b = os.urandom(300_000), os.urandom(200_000)
    (src / "a.bin").write_bytes(a)
    (src / "b.bin").write_bytes(b)
    dest = import_into(fsm, str(src), "copy")
    pa, pb, out = (os.path.join(dest, n) for n in ("a.bin", "b.bin", "out.bin"))
    fa = os.open(pa, os.O_RDONLY)
    fo = os.open(out, os.O_WRONLY | os.O_CREAT, 0o644)
    fb = os.open(pb, os.O_WRONLY)
    try:
        done = 0
        while done < len(a):
            n = os.copy_file_range(fa, fo, len(a) - done)
            assert n > 0
            done += n
        assert os.copy_file_range(fa, fb, 1000, 5, 100) == 1000
    finally:
        for fd in (fa, fo, fb):
            os.close(fd)
    with open(out, "rb") as f:
        assert f.read() == a
    assert state(pb) is None
    with open(pb, "rb") as f:
        assert f.read() == b[:100] + a[5:1005] + b[1100:]


def test_smart_folders_query_ghost_states(fsm, tmp_path):
    src = tmp_path / "q"
    src.mkdir()
    for n in ("one", "two", "three"):
        (src / f"{n}.dat").write_bytes(n.encode() * 100)
    dest = import_into(fsm, str(src), "q")
    folder = fsm.path("q-ghosts")
    os.mkdir(folder)
    os.setxattr(folder, "user.dwfs.query", b"state:ghost under:/q")
    hydrated = fsm.path("q-hydrated")
    os.mkdir(hydrated)
    os.setxattr(hydrated, "user.dwfs.query", b"state:hydrated under:/q")
    assert set(os.listdir(folder)) == {"one.dat", "two.dat", "three.dat"}
    with open(os.path.join(dest, "two.dat"), "rb") as f:
        f.read()
    assert stored(os.path.join(dest, "two.dat")) == "hydrated"
    assert set(os.listdir(folder)) == {"one.dat", "three.dat"}
    assert set(os.listdir(hydrated)) == {"two.dat"}


def test_cache_limit_dehydrates_the_least_recently_used(tmp_path, fs_mount):
    wh = make_warehouse(tmp_path / "wh", size="64M")
    with open(os.path.join(wh, "dwfs.toml"), "a", encoding="utf-8") as f:
        f.write('\n[filesystem]\nghost_cache_limit = "2M"\n')
    m = fs_mount(wh)
    m.mount()
    src = tmp_path / "src"
    src.mkdir()
    for k in range(5):
        (src / f"f{k}.bin").write_bytes(os.urandom(900 * 1024))
    dest = m.path("g")
    os.mkdir(dest)
    dwfs("ghost", "import", str(src), dest)
    paths = [os.path.join(dest, f"f{k}.bin") for k in range(5)]
    dwfs("ghost", "pin", paths[0])
    for p in paths[1:]:
        with open(p, "rb") as f:
            f.read()
        assert stored(p) == "hydrated"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = [state(p) for p in paths]
        if states.count("hydrated") <= 1:
            break
        time.sleep(0.1)
    assert states[0] == "pinned"  # never dehydrated, even over the limit
    assert states[4] == "hydrated"  # the most recently used stays
    assert states[1:4] == ["ghost"] * 3
    for k, p in enumerate(paths):  # every file still reads correctly
        with open(p, "rb") as f:
            assert f.read() == (src / f"f{k}.bin").read_bytes()


def test_ghosts_survive_a_remount_and_fsck(tmp_path, fs_mount):
    m = fs_mount(make_warehouse(tmp_path / "wh"))
    m.mount()
    src = tmp_path / "src"
    src.mkdir()
    (src / "kept.txt").write_bytes(b"kept content")
    (src / "later.txt").write_bytes(b"later content")
    dest = m.path("g")
    os.mkdir(dest)
    dwfs("ghost", "import", str(src), dest)
    with open(os.path.join(dest, "kept.txt"), "rb") as f:
        assert f.read() == b"kept content"
    assert stored(os.path.join(dest, "kept.txt")) == "hydrated"
    m.umount()
    r = dwfs("fsck", m.warehouse, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    m.mount()
    assert state(os.path.join(dest, "kept.txt")) == "hydrated"
    assert state(os.path.join(dest, "later.txt")) == "ghost"
    os.unlink(src / "kept.txt")  # stored: no longer needs its source
    with open(os.path.join(dest, "kept.txt"), "rb") as f:
        assert f.read() == b"kept content"
    with open(os.path.join(dest, "later.txt"), "rb") as f:
        assert f.read() == b"later content"


@contextlib.contextmanager
def watching(src: str, dest: str, *options: str):
    """`dwfs ghost import --watch` running (once it says it is watching); stopped after."""
    cmd = [sys.executable, "-m", "dwfs.cli", "ghost", "import", "--watch", *options, src, dest]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        while "watching" not in line:
            assert line, proc.stderr.read()
            line = proc.stdout.readline()
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_watch_follows_create_modify_move_delete(fsm, tmp_path):
    src = tmp_path / "watched"
    (src / "d").mkdir(parents=True)
    (src / "d" / "first.txt").write_bytes(b"first")
    dest = fsm.path("watched")
    os.mkdir(dest)
    with watching(str(src), dest):

        def soon(check) -> None:
            deadline = time.monotonic() + 10
            while not check():
                assert time.monotonic() < deadline, "the ghosts did not follow the source"
                time.sleep(0.1)

        def read(*parts: str) -> bytes | None:
            """The ghost's content; None while missing, or while the source has changed and
            the watcher has not yet caught up (EIO)."""
            try:
                with open(os.path.join(dest, *parts), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return None
            except OSError as exc:
                assert exc.errno == errno.EIO
                return None

        (src / "d" / "new.txt").write_bytes(b"created")
        soon(lambda: read("d", "new.txt") == b"created")
        assert stored(os.path.join(dest, "d", "new.txt")) == "hydrated"
        (src / "d" / "first.txt").write_bytes(b"first, then changed")
        soon(lambda: read("d", "first.txt") == b"first, then changed")
        os.rename(src / "d" / "new.txt", src / "renamed.txt")
        soon(lambda: read("renamed.txt") == b"created" and read("d", "new.txt") is None)
        os.rename(src / "d", src / "e")
        soon(lambda: read("e", "first.txt") == b"first, then changed"
             and not os.path.exists(os.path.join(dest, "d")))
        os.unlink(src / "renamed.txt")
        soon(lambda: read("renamed.txt") is None)
        shutil.rmtree(src / "e")
        soon(lambda: not os.path.exists(os.path.join(dest, "e")))


def test_watch_compares_the_whole_source_for_what_inotify_does_not_tell(fsm, tmp_path):
    """A write through a shared mapping raises no inotify event: the watcher's comparison of
    the whole source (every --rescan seconds) brings the ghost in step."""
    import mmap

    src = tmp_path / "mapped"
    src.mkdir()
    (src / "m.bin").write_bytes(b"a" * 8192)
    os.utime(src / "m.bin", ns=(10**18, 10**18))  # 2001: the mapped write makes it newer
    dest = fsm.path("mapped")
    os.mkdir(dest)
    with watching(str(src), dest, "--rescan", "1"):
        want = b"HELLO" + b"a" * 8187
        # The writer keeps the file open meanwhile: not even a close-after-write is seen.
        with open(src / "m.bin", "r+b") as writer, mmap.mmap(writer.fileno(), 8192) as m:
            m[:5] = b"HELLO"
            m.flush()
            deadline = time.monotonic() + 15
            while True:
                try:
                    with open(os.path.join(dest, "m.bin"), "rb") as f:
                        if f.read() == want:
                            break
                except OSError as exc:  # EIO while the ghost still describes the old source
                    assert exc.errno == errno.EIO
                assert time.monotonic() < deadline, "the ghost did not follow the mapped write"
                time.sleep(0.2)
        assert os.stat(os.path.join(dest, "m.bin")).st_mtime_ns > 10**18
    r = dwfs("ghost", "import", "--watch", "--rescan", "-1", str(src), dest, check=False)
    assert r.returncode == 1 and "--rescan -1: give 0 or more seconds" in r.stderr


def test_a_watcher_started_later_removes_what_went_while_nothing_watched(fsm, tmp_path):
    """An import adds and refreshes; a watcher (re)started later also compares the whole
    source at once, so a file deleted meanwhile loses its ghost without any event."""
    src = tmp_path / "later"
    src.mkdir()
    (src / "kept.txt").write_bytes(b"kept")
    (src / "gone.txt").write_bytes(b"gone")
    dest = import_into(fsm, str(src), "later")
    os.unlink(src / "gone.txt")
    with watching(str(src), dest):
        deadline = time.monotonic() + 15
        while os.path.exists(os.path.join(dest, "gone.txt")):
            assert time.monotonic() < deadline, "the stale ghost stayed"
            time.sleep(0.2)
    with open(os.path.join(dest, "kept.txt"), "rb") as f:
        assert f.read() == b"kept"


def test_sources_with_times_before_1970_and_past_2262(fsm, tmp_path):
    """A source file from 1960 keeps its time; one dated past what dwfs stores (ext4 keeps
    times to 2446) is imported with its time clamped, and both fetch."""
    src = tmp_path / "times"
    src.mkdir()
    (src / "old.txt").write_bytes(b"old")
    (src / "far.txt").write_bytes(b"far")
    os.utime(src / "old.txt", ns=(-315_619_200_000_000_000, -315_619_199_500_000_000))
    far = 14_000_000_000 * 10**9  # the year 2413
    os.utime(src / "far.txt", ns=(far, far))
    if os.stat(src / "far.txt").st_mtime_ns != far:
        pytest.skip("the source filesystem does not keep times past 2262")
    dest = import_into(fsm, str(src), "times")
    assert os.stat(os.path.join(dest, "old.txt")).st_mtime_ns == -315_619_199_500_000_000
    assert os.stat(os.path.join(dest, "far.txt")).st_mtime_ns == (1 << 63) - 1
    for name, data in (("old.txt", b"old"), ("far.txt", b"far")):
        with open(os.path.join(dest, name), "rb") as f:
            assert f.read() == data
        dwfs("ghost", "hydrate", os.path.join(dest, name))  # waits for the store to finish
        assert state(os.path.join(dest, name)) == "hydrated"


def test_import_errors_are_clear(fsm, tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    r = dwfs("ghost", "import", str(tmp_path / "file"), fsm.mountpoint, check=False)
    assert r.returncode != 0 and "not a directory" in r.stderr
    r = dwfs("ghost", "import", str(tmp_path), str(tmp_path), check=False)
    assert r.returncode != 0 and "not inside a mounted dwfs" in r.stderr
    inside = fsm.path("selfsrc")
    os.mkdir(inside)
    r = dwfs("ghost", "import", inside, fsm.mountpoint, check=False)
    assert r.returncode != 0 and "inside the mount" in r.stderr
    r = dwfs("ghost", "pin", inside, check=False)
    assert r.returncode != 0 and "no ghost" in r.stderr
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    with open(fsm.path("afile"), "wb") as f:
        f.write(b"x")
    for dest, message in ((fsm.path("no", "such"), "its parent directory does not exist"),
                          (fsm.path("afile"), "is not a directory")):
        r = dwfs("ghost", "import", str(src), dest, check=False)
        assert r.returncode == 1 and message in r.stderr, r.stderr
    assert not os.path.exists(fsm.path("no"))  # nothing made
    with open(fsm.path("afile"), "rb") as f:
        assert f.read() == b"x"


def test_import_makes_its_destination_when_only_the_parent_exists(fsm, tmp_path):
    """As `cp -r SRC DEST` makes DEST, with the caller's own permissions and umask."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"data")
    dwfs("ghost", "import", str(src), fsm.path("new"))
    assert stat.S_ISDIR(os.stat(fsm.path("new")).st_mode)
    assert os.listdir(fsm.path("new", "sub")) == ["f"]
    assert os.getxattr(fsm.path("new", "sub", "f"), "user.dwfs.state") == b"ghost"


def test_fsck_finds_broken_ghost_and_smart_folder_records(tmp_path, fs_mount):
    m = fs_mount(make_warehouse(tmp_path / "wh"))
    m.mount()
    os.mkdir(m.path("smart"))
    os.setxattr(m.path("smart"), "user.dwfs.query", b"ext:txt")
    os.mkdir(m.path("plain"))
    m.umount()
    db = sqlite3.connect(os.path.join(m.warehouse, "meta.db"))
    with db:
        smart = db.execute("SELECT inode FROM dentries WHERE name=?", (b"smart",)).fetchone()[0]
        plain = db.execute("SELECT inode FROM dentries WHERE name=?", (b"plain",)).fetchone()[0]
        db.execute("INSERT INTO ghosts (inode, source, size, mtime_ns, state) "
                   "VALUES (424242, x'2f78', 1, 0, 'ghost')")
        db.execute("INSERT INTO ghosts (inode, source, size, mtime_ns, state) "
                   "VALUES (?, x'2f79', 1, 0, 'ghost')", (plain,))
        db.execute("UPDATE dentries SET parent=? WHERE name=?", (smart, b"plain"))
    db.close()
    r = dwfs("fsck", m.warehouse, check=False)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "ghost record of inode 424242 is for a missing inode" in r.stdout
    assert f"ghost record of inode {plain} is for an inode that is not a regular file" in r.stdout
    assert f"smart folder inode {smart} has 1 entries" in r.stdout
    r = dwfs("fsck", m.warehouse, "--repair", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    r = dwfs("fsck", m.warehouse, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    m.mount()
    assert os.listdir(m.path("smart")) == ["plain"]  # an ordinary directory again


READER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
buf = bytearray(1 << 20)
n = 0
while True:
    k = os.readv(fd, [buf])
    if not k:
        break
    n += k
    print(n, flush=True)
"""


def reading(path: str, until: int) -> subprocess.Popen:
    """A process that reads `path` in 1 MiB reads, returned once it has read `until` bytes."""
    reader = subprocess.Popen([sys.executable, "-c", READER, path],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got = 0
    while got < until:
        line = reader.stdout.readline()
        assert line, reader.stderr.read()
        got = int(line)
    return reader


def test_an_import_survives_a_crash_right_after_the_command(tmp_path, fs_mount):
    """`dwfs ghost import` returns once the ghosts are durable: kill -9 of the daemon right
    after it loses none of them."""
    m = fs_mount(make_warehouse(tmp_path / "wh", size="64M"))
    m.mount()
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(200):
        (src / "sub" / f"f{i}.txt").write_bytes(f"file {i}\n".encode())
    dest = m.path("g")
    os.mkdir(dest)
    fd = os.open(m.mountpoint, os.O_RDONLY)
    os.fsync(fd)  # the destination directory itself is durable
    os.close(fd)
    dwfs("ghost", "import", str(src), dest)
    os.kill(daemon_pid(m.warehouse), signal.SIGKILL)
    subprocess.run(["fusermount3", "-u", m.mountpoint], check=True)
    m.mount()
    names = sorted(os.listdir(os.path.join(dest, "sub")))
    assert names == sorted(f"f{i}.txt" for i in range(200))
    with open(os.path.join(dest, "sub", "f7.txt"), "rb") as f:
        assert f.read() == b"file 7\n"
    m.umount()
    r = dwfs("fsck", m.warehouse, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kill9_during_a_fetch(tmp_path, fs_mount):
    m = fs_mount(make_warehouse(tmp_path / "wh", size="128M"))
    m.mount()
    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(96 * MiB)
    (src / "big.bin").write_bytes(big)
    (src / "small.txt").write_bytes(b"fetched and synced before the crash")
    dest = m.path("g")
    os.mkdir(dest)
    dwfs("ghost", "import", str(src), dest)
    small = os.path.join(dest, "small.txt")
    with open(small, "rb") as f:
        assert f.read() == b"fetched and synced before the crash"
    assert stored(small) == "hydrated"
    fd = os.open(small, os.O_RDONLY)
    os.fsync(fd)  # makes its state durable
    os.close(fd)
    reader = reading(os.path.join(dest, "big.bin"), 8 * MiB)
    pid = daemon_pid(m.warehouse)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    reader.wait(timeout=60)
    unmount = subprocess.run(["fusermount3", "-u", m.mountpoint], capture_output=True,
                             text=True, check=False)
    assert unmount.returncode == 0, unmount.stderr
    m.mount()  # no manual repair
    assert state(small) == "hydrated"
    with open(small, "rb") as f:
        assert f.read() == b"fetched and synced before the crash"
    assert state(os.path.join(dest, "big.bin")) in ("ghost", "hydrated")
    assert sha256_of(os.path.join(dest, "big.bin")) == hashlib.sha256(big).hexdigest()
    assert stored(os.path.join(dest, "big.bin")) == "hydrated"
    m.umount()
    r = dwfs("fsck", m.warehouse, "--verify-data", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
