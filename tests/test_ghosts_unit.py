"""Ghost files in vfs without a kernel: fetches that serve a range before the whole file has
arrived, one fetch shared by concurrent readers, a fetch cut by a crash, imports that merge
and refresh, watcher changes."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time

import pytest
from test_vfs_unit import Env

from vfs.attrs import ROOT_INODE, Caller, SetAttr
from vfs.errors import FSError
from vfs.ghostimport import import_tree, sync_changes
from vfs.ghosts import GHOST, HYDRATED, Ghosts
from vfs.ghostsource import LEAD_PIECES, PIECE
from vfs.inodeflags import APPEND, IMMUTABLE
from vfs.view import View

MiB = 1 << 20
ROOT = Caller(0, 0)


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path / "fs", rows=512)
    yield e
    if e.fs is not None:
        e.close()


def source_tree(tmp_path, big: int = 24 * MiB) -> str:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(big))
    (src / "sub" / "small.txt").write_bytes(b"small\n")
    return str(src)


def imported(env: Env, tmp_path, big: int = 24 * MiB) -> tuple[str, View, int]:
    """A source tree imported as ghosts at the root: its path, the view, big.bin's inode."""
    src = source_tree(tmp_path, big)
    view = View(env.fs)
    import_tree(env.fs, view.ghosts, ROOT_INODE, src, ROOT)
    return src, view, ino_of(view, "big.bin")


def ino_of(view: View, *names: str) -> int:
    ino = ROOT_INODE
    for n in names:
        ino = view.lookup(ino, n.encode()).ino
    return ino


def test_a_range_is_served_before_the_whole_file_arrives(env, tmp_path):
    src, view, big = imported(env, tmp_path)
    view.ghosts.fetch_rate = 4 * MiB  # the whole file takes about 6 s
    head = view.read(big, 0, 4096)
    with open(os.path.join(src, "big.bin"), "rb") as f:
        expected = f.read(4096)
    assert bytes(head) == expected
    fetch = view.ghosts.fetches[big]
    assert fetch.arrived < 24 * MiB  # served while the fetch goes on
    assert view.ghosts.state(big) == GHOST
    view.ghosts.fetch_rate = None
    view.ghosts.hydrate(big)
    assert view.ghosts.state(big) == HYDRATED
    view.ghosts.close()


def test_concurrent_readers_share_one_fetch(env, tmp_path):
    src, view, big = imported(env, tmp_path, 8 * MiB)
    started: list[int] = []
    original = view.ghosts._start

    def counting_start(rec, *args):
        started.append(rec.ino)
        return original(rec, *args)

    view.ghosts._start = counting_start
    results: dict[int, bytes] = {}

    def reader(k: int) -> None:
        results[k] = bytes(view.read(big, k * MiB, MiB))

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    with open(os.path.join(src, "big.bin"), "rb") as f:
        data = f.read()
    assert b"".join(results[k] for k in range(8)) == data
    assert started == [big]
    view.ghosts.close()


def test_a_changed_or_missing_source_fails_the_read_and_keeps_the_ghost(env, tmp_path):
    src, view, big = imported(env, tmp_path, 3 * MiB)
    path = os.path.join(src, "big.bin")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(FSError) as info:
        view.read(big, 0, 4096)
    assert info.value.errno == errno.EIO
    assert view.ghosts.state(big) == GHOST
    assert env.fs.getattr(big).blocks == 0  # nothing partial kept
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(path, path + ".away")
    with pytest.raises(FSError) as info:
        view.read(big, 0, 4096)
    assert info.value.errno == errno.EIO
    os.rename(path + ".away", path)
    with open(path, "rb") as f:
        assert bytes(view.read(big, 0, 3 * MiB)) == f.read()
    view.ghosts.hydrate(big)  # the read may return before every piece is stored
    assert view.ghosts.state(big) == HYDRATED
    view.ghosts.close()


@pytest.mark.parametrize("failure", [RuntimeError("a bug"), OSError(errno.EIO, "member")])
@pytest.mark.timeout(60)
def test_an_unexpected_failure_while_storing_fails_the_read(env, tmp_path, failure):
    """An error of any kind while a fetch stores its pieces (a bug, an I/O error from below)
    ends the fetch: readers get EIO instead of waiting forever, the file stays a ghost with
    nothing partial kept, and the next read fetches it again."""
    src, view, big = imported(env, tmp_path, 3 * MiB)
    original = env.fs.write
    calls = []

    def failing_write(ino, offset, data, keep_times=False):
        if ino == big and keep_times:
            calls.append(offset)
            raise failure
        return original(ino, offset, data, keep_times)

    env.fs.write = failing_write
    with pytest.raises(FSError) as info:
        view.ghosts.hydrate(big)
    assert info.value.errno == errno.EIO and calls
    assert view.ghosts.state(big) == GHOST and big not in view.ghosts.fetches
    assert env.fs.getattr(big).blocks == 0
    env.fs.write = original
    with open(os.path.join(src, "big.bin"), "rb") as f:
        assert bytes(view.read(big, 0, 3 * MiB)) == f.read()
    view.ghosts.hydrate(big)
    assert view.ghosts.state(big) == HYDRATED
    view.ghosts.close()


def change_behind_its_mtime(view: View, src: str, big: int, offset: int) -> None:
    """Take big.bin's hashes (hydrate, dehydrate), then change its source's content at
    `offset` and put its mtime back, so that only the hashes can tell."""
    view.ghosts.hydrate(big)
    view.ghosts.dehydrate(big)
    path = os.path.join(src, "big.bin")
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"changed")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_hash_mismatch_is_caught_piece_by_piece(env, tmp_path):
    src, view, big = imported(env, tmp_path, 3 * MiB)
    change_behind_its_mtime(view, src, big, 2 * MiB + 5)
    assert bytes(view.read(big, 0, 4096))  # the first piece is still the same
    with pytest.raises(FSError) as info:
        view.read(big, 2 * MiB, 4096)
    assert info.value.errno == errno.EIO
    assert view.ghosts.state(big) == GHOST
    assert env.fs.getattr(big).blocks == 0
    view.ghosts.close()


def held_store(env: Env, big: int) -> threading.Event:
    """Make the stores of inode `big`'s fetch wait until the returned event is set."""
    original = env.fs.write
    gate = threading.Event()

    def held_write(ino, offset, data, keep_times=False):
        if ino == big and keep_times:
            assert gate.wait(30), "the store was never let go"
        return original(ino, offset, data, keep_times)

    env.fs.write = held_write
    return gate


def held_back_fetch(view: View, big: int):
    """Start inode `big`'s fetch with room for two pieces and wait until it is held back."""
    view.ghosts.buffer_bytes = 2 * MiB
    view.read(big, 0, 4096)
    fetch = view.ghosts.fetches[big]
    with fetch.cond:
        assert fetch.cond.wait_for(lambda: fetch.held_back, 10)
    return fetch


@pytest.mark.timeout(60)
def test_readers_beyond_a_fetch_held_back_by_its_store_read_the_source(env, tmp_path):
    """When storing falls behind, a read beyond what the fetch has brought is served from the
    source (checked piece by piece) instead of waiting for the volume."""
    src, view, big = imported(env, tmp_path, 24 * MiB)
    with open(os.path.join(src, "big.bin"), "rb") as f:
        expected = f.read()
    gate = held_store(env, big)
    fetch = held_back_fetch(view, big)
    arrived = fetch.arrived
    assert arrived <= 4 * MiB
    got = view.read(big, 20 * MiB + 5, 2 * MiB)  # pieces 20-22, far beyond the fetch
    assert bytes(got) == expected[20 * MiB + 5:22 * MiB + 5]
    assert bytes(view.read(big, 23 * MiB, 4 * MiB)) == expected[23 * MiB:]  # clipped at the end
    assert fetch.arrived == arrived  # served while the fetch stood still
    assert view.ghosts.state(big) == GHOST
    gate.set()
    view.ghosts.hydrate(big)
    assert view.ghosts.state(big) == HYDRATED
    assert bytes(view.read(big, 0, 24 * MiB)) == expected
    view.ghosts.close()


@pytest.mark.timeout(60)
def test_a_read_ahead_of_a_held_back_fetch_checks_the_source(env, tmp_path):
    """A piece read from the source ahead of the fetch is checked like the fetch's own: changed
    content gives EIO, never the changed bytes, and the fetch then fails too."""
    src, view, big = imported(env, tmp_path, 24 * MiB)
    change_behind_its_mtime(view, src, big, 20 * MiB + 5)
    gate = held_store(env, big)
    held_back_fetch(view, big)
    with pytest.raises(FSError) as info:
        view.read(big, 20 * MiB, 4096)
    assert info.value.errno == errno.EIO
    assert bytes(view.read(big, 19 * MiB, 4096))  # the pieces before it are still served
    gate.set()
    with pytest.raises(FSError) as info:
        view.ghosts.hydrate(big)
    assert info.value.errno == errno.EIO
    assert view.ghosts.state(big) == GHOST
    assert env.fs.getattr(big).blocks == 0
    view.ghosts.close()


def test_an_interrupted_fetch_is_dropped_after_a_crash(env, tmp_path):
    src, view, big = imported(env, tmp_path, 4 * MiB)
    with open(os.path.join(src, "big.bin"), "rb") as f:
        env.fs.write(big, 0, f.read(MiB), keep_times=True)  # what a fetch stores first
    env.fs.commit()
    assert env.fs.getattr(big).blocks > 0
    env.close(clean=False)  # the daemon dies before the fetch ends
    fs = env.open()
    ghosts = Ghosts(fs)
    assert ghosts.state(big) == GHOST
    assert fs.getattr(big).blocks == 0


def test_reimport_merges_refreshes_and_leaves_other_files_alone(env, tmp_path):
    src = source_tree(tmp_path, big=MiB)
    view = View(env.fs)
    r1 = import_tree(env.fs, view.ghosts, ROOT_INODE, src, ROOT)
    assert (r1.ghosts, r1.directories) == (2, 1)
    small = ino_of(view, "sub", "small.txt")
    assert bytes(view.read(small, 0, 100)) == b"small\n"
    with open(os.path.join(src, "sub", "small.txt"), "wb") as f:
        f.write(b"grown bigger\n")
    with open(os.path.join(src, "new.txt"), "wb") as f:
        f.write(b"new")
    local = env.fs.create(ino_of(view, "sub"), b"mine.txt", 0o644, 0, ROOT)
    env.fs.write(local.ino, 0, b"local")
    with open(os.path.join(src, "sub", "mine.txt"), "wb") as f:
        f.write(b"source")
    r2 = import_tree(env.fs, view.ghosts, ROOT_INODE, src, ROOT)
    assert (r2.ghosts, r2.refreshed, r2.unchanged) == (1, 1, 1)
    assert len(r2.skipped) == 1 and "mine.txt" in r2.skipped[0]
    assert bytes(view.read(small, 0, 100)) == b"grown bigger\n"
    assert bytes(view.read(local.ino, 0, 100)) == b"local"
    view.ghosts.close()


def test_sync_changes_follow_moves_and_deletes(env, tmp_path):
    src = source_tree(tmp_path, big=MiB)
    view = View(env.fs)
    import_tree(env.fs, view.ghosts, ROOT_INODE, src, ROOT)
    os.rename(os.path.join(src, "sub"), os.path.join(src, "moved"))
    sync_changes(env.fs, view.ghosts, ROOT_INODE, src, ROOT, [["moved", "sub", "moved"]])
    small = ino_of(view, "moved", "small.txt")
    assert bytes(view.read(small, 0, 100)) == b"small\n"  # the source path moved with it
    os.unlink(os.path.join(src, "big.bin"))
    sync_changes(env.fs, view.ghosts, ROOT_INODE, src, ROOT, [["changed", "big.bin"]])
    assert env.fs.find(ROOT_INODE, b"big.bin") is None
    view.ghosts.close()


def test_watched_removals_leave_flagged_ghosts(env, tmp_path):
    """A source removed while watched removes its ghost, unless chattr's flags keep it: an
    immutable ghost, or one in an append-only directory, stays (reported as skipped); an
    import into an immutable directory is refused."""
    src = source_tree(tmp_path, big=MiB)
    view = View(env.fs)
    import_tree(env.fs, view.ghosts, ROOT_INODE, src, ROOT)
    (tmp_path / "src" / "sub" / "other.txt").write_bytes(b"other\n")
    import_tree(env.fs, view.ghosts, ROOT_INODE, src, ROOT)
    big, sub = ino_of(view, "big.bin"), ino_of(view, "sub")
    env.fs.set_flags(big, IMMUTABLE)
    env.fs.set_flags(sub, APPEND)
    os.unlink(os.path.join(src, "big.bin"))
    os.unlink(os.path.join(src, "sub", "small.txt"))
    report = sync_changes(env.fs, view.ghosts, ROOT_INODE, src, ROOT,
                          [["changed", "big.bin"], ["changed", "sub/small.txt"]])
    assert env.fs.find(ROOT_INODE, b"big.bin") is not None
    assert env.fs.find(sub, b"small.txt") is not None
    assert len(report.skipped) == 2 and all("chattr" in s for s in report.skipped)
    env.fs.set_flags(sub, 0)
    sync_changes(env.fs, view.ghosts, ROOT_INODE, src, ROOT, [["changed", "sub/small.txt"]])
    assert env.fs.find(sub, b"small.txt") is None  # unflagged again: it follows its source
    env.fs.set_flags(sub, IMMUTABLE)
    with pytest.raises(FSError) as exc:
        view.import_ghosts(sub, src, ROOT)
    assert exc.value.errno == errno.EPERM
    env.fs.set_flags(sub, 0)
    env.fs.set_flags(big, 0)
    view.ghosts.close()


def test_watched_moves_leave_flagged_ghosts(env, tmp_path):
    """A watched move of a source whose ghost is immutable keeps that ghost where it is and
    gives the new place a ghost of its own, instead of stopping the sync with EPERM."""
    src = source_tree(tmp_path, big=MiB)
    view = View(env.fs)
    import_tree(env.fs, view.ghosts, ROOT_INODE, src, ROOT)
    small = ino_of(view, "sub", "small.txt")
    env.fs.set_flags(small, IMMUTABLE)
    os.rename(os.path.join(src, "sub", "small.txt"), os.path.join(src, "moved.txt"))
    report = sync_changes(env.fs, view.ghosts, ROOT_INODE, src, ROOT,
                          [["moved", "sub/small.txt", "moved.txt"]])
    assert env.fs.find(ino_of(view, "sub"), b"small.txt").ino == small
    moved = ino_of(view, "moved.txt")
    assert moved != small and bytes(view.read(moved, 0, 100)) == b"small\n"
    assert any("chattr" in s for s in report.skipped)
    env.fs.set_flags(small, 0)
    view.ghosts.close()


def test_truncating_a_ghost_fetches_it_unless_to_zero(env, tmp_path):
    src, view, big = imported(env, tmp_path, big=2 * MiB)
    small = ino_of(view, "sub", "small.txt")
    view.setattr(big, SetAttr(size=MiB + 3))
    assert view.ghosts.state(big) is None
    with open(os.path.join(src, "big.bin"), "rb") as f:
        assert bytes(view.read(big, 0, 2 * MiB)) == f.read(MiB + 3)
    view.setattr(small, SetAttr(size=0))
    assert view.ghosts.state(small) is None
    assert bytes(view.read(small, 0, 100)) == b""
    view.ghosts.close()


def test_a_source_changed_during_its_fetch_is_refreshed_after_it(env, tmp_path):
    src, view, big = imported(env, tmp_path, big=8 * MiB)
    view.ghosts.fetch_rate = 8 * MiB  # the fetch takes about a second
    view.read(big, 0, 4096)
    assert big in view.ghosts.fetches
    new = os.urandom(3 * MiB)
    with open(os.path.join(src, "big.bin"), "wb") as f:
        f.write(new)
    report = import_tree(env.fs, view.ghosts, ROOT_INODE, src, ROOT)  # waits for the fetch
    assert report.refreshed == 1
    assert big not in view.ghosts.fetches
    view.ghosts.fetch_rate = None
    assert env.fs.getattr(big).size == 3 * MiB
    assert bytes(view.read(big, 0, 4 * MiB)) == new
    view.ghosts.close()


def test_sync_follows_exchanges_links_and_kind_changes(env, tmp_path):
    """What a watcher reports of renameat2(RENAME_EXCHANGE) (a move each way), of a link
    re-pointed and of a name that changed kind brings the destination in step: exchanged
    directories keep only their own entries, links made by the import follow their source
    (and go with it), a link made in the mount is left alone."""
    from posixutil import RENAME_EXCHANGE, renameat2

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "e").mkdir()
    (src / "d" / "only-in-d").write_bytes(b"d")
    (src / "e" / "only-in-e").write_bytes(b"e")
    (src / "x").write_bytes(b"x")
    (src / "y").write_bytes(b"yy")
    os.symlink("x", src / "link")
    view = View(env.fs)
    import_tree(env.fs, view.ghosts, ROOT_INODE, str(src), ROOT)
    mine = env.fs.symlink(ROOT_INODE, b"mine", b"target", ROOT)

    def sync(*changes):
        sync_changes(env.fs, view.ghosts, ROOT_INODE, str(src), ROOT, [list(c) for c in changes])

    def names(*path):
        return sorted(env.fs.listdir(ino_of(view, *path) if path else ROOT_INODE))

    renameat2(str(src / "d"), str(src / "e"), RENAME_EXCHANGE)
    renameat2(str(src / "x"), str(src / "y"), RENAME_EXCHANGE)
    sync(("moved", "d", "e"), ("moved", "e", "d"), ("moved", "x", "y"), ("moved", "y", "x"))
    assert names("d") == [b"only-in-e"] and names("e") == [b"only-in-d"]
    assert bytes(view.read(ino_of(view, "x"), 0, 10)) == b"yy"
    assert bytes(view.read(ino_of(view, "y"), 0, 10)) == b"x"
    os.unlink(src / "link")
    os.symlink("y", src / "link")
    sync(("changed", "link"), ("changed", "link"))
    assert env.fs.readlink(ino_of(view, "link")) == b"y"
    os.unlink(src / "link")
    (src / "link").mkdir()
    (src / "link" / "inside").write_bytes(b"i")
    sync(("changed", "link"))
    assert names("link") == [b"inside"]
    shutil.rmtree(src / "link")
    sync(("changed", "link/inside"), ("changed", "link"))
    assert b"link" not in names()
    assert env.fs.readlink(mine.ino) == b"target"  # not the import's: never touched
    view.ghosts.close()


def followed(env: Env, tmp_path, size: int, rate: float = 0) -> tuple[View, int, bytes]:
    """A ghost of `size` bytes whose readers count as following its fetch for a minute after
    each read if they read at `rate` or faster: the view, its inode and its content."""
    src, view, big = imported(env, tmp_path, size)
    with open(os.path.join(src, "big.bin"), "rb") as f:
        expected = f.read()
    view.ghosts.follow_seconds = 60.0
    view.ghosts.follow_rate = rate
    return view, big, expected


@pytest.mark.timeout(60)
def test_a_fetch_keeps_pace_with_a_reader_that_follows_it(env, tmp_path):
    """A fetch stays within LEAD_PIECES of a reader that keeps reading, and keeps the last
    pieces in memory until that reader has them; then the file is hydrated. (Unpaced, the fetch
    runs to the end at once and the reader reads the rest back from the volume.)"""
    size = 48 * MiB
    view, big, expected = followed(env, tmp_path, size)
    lead = LEAD_PIECES * PIECE
    fetch = None
    for offset in range(0, size - PIECE, PIECE):
        assert bytes(view.read(big, offset, PIECE)) == expected[offset:offset + PIECE]
        fetch = fetch or view.ghosts.fetches[big]
        assert fetch.arrived <= offset + PIECE + lead
    deadline = time.monotonic() + 30  # every piece gets stored; the fetch waits for the reader
    while fetch.stored_to < size:
        assert time.monotonic() < deadline, "the fetch never stored its last pieces"
        time.sleep(0.01)
    assert view.ghosts.state(big) == GHOST and view.ghosts.fetches.get(big) is fetch
    last = view.ghosts.read_held(big, size - PIECE, PIECE)  # from memory, without the volume
    assert last is not None and bytes(last) == expected[-PIECE:]
    fetch.wait_done()
    assert view.ghosts.state(big) == HYDRATED
    assert bytes(view.read(big, 0, size)) == expected
    view.ghosts.close()


@pytest.mark.timeout(60)
def test_a_fetch_goes_on_alone_when_its_reader_stops(env, tmp_path):
    """A reader that stops after the first piece holds the fetch back for no longer than the
    follow window: the whole file is then fetched and stored without it."""
    src, view, big = imported(env, tmp_path, 32 * MiB)
    view.ghosts.follow_seconds = 0.05
    assert bytes(view.read(big, 0, 4096))
    view.ghosts.fetches[big].wait_done()
    assert view.ghosts.state(big) == HYDRATED
    with open(os.path.join(src, "big.bin"), "rb") as f:
        assert bytes(view.read(big, 0, 32 * MiB)) == f.read()
    view.ghosts.close()


@pytest.mark.timeout(60)
def test_a_reader_far_ahead_is_not_kept_waiting_by_one_the_fetch_follows(env, tmp_path):
    """While the fetch keeps pace with a reader at the head, a reader of the tail waits only
    for the fetch to get there, not for the first reader to read its way there."""
    size = 48 * MiB
    view, big, expected = followed(env, tmp_path, size)
    assert bytes(view.read(big, 0, PIECE)) == expected[:PIECE]  # the fetch now follows it
    got: list[bytes] = []
    tail = threading.Thread(target=lambda: got.append(bytes(view.read(big, size - PIECE,
                                                                     PIECE))))
    tail.start()
    deadline = time.monotonic() + 20
    while tail.is_alive():  # the head reader keeps reading, and so keeps being followed
        assert time.monotonic() < deadline, "the tail reader waited for the head reader"
        assert bytes(view.read(big, 0, 4096)) == expected[:4096]
        tail.join(0.01)
    assert got == [expected[-PIECE:]]
    view.ghosts.hydrate(big)  # (the tail reader was served up to the end: nothing to follow)
    assert view.ghosts.state(big) == HYDRATED
    view.ghosts.close()


@pytest.mark.timeout(60)
def test_a_fetch_does_not_keep_pace_with_a_slow_reader(env, tmp_path):
    """A reader slower than the follow rate (a player streaming a film) does not hold the
    fetch back: once its pace is known, the whole file is fetched without it."""
    size = 48 * MiB
    view, big, expected = followed(env, tmp_path, size, rate=1 << 60)  # every reader is slower
    for offset in range(0, (LEAD_PIECES + 1) * PIECE, PIECE):
        assert bytes(view.read(big, offset, PIECE)) == expected[offset:offset + PIECE]
    fetch = view.ghosts.fetches.get(big)
    assert fetch is None or not fetch.fast
    view.ghosts.hydrate(big)  # without the reader reading on
    assert view.ghosts.state(big) == HYDRATED
    assert bytes(view.read(big, 0, size)) == expected
    view.ghosts.close()


def stop_following(fetch) -> None:
    """Make the reader of `fetch` count as gone (its follow window closed)."""
    with fetch.cond:
        fetch.follow_seconds = 0.0
        fetch.cond.notify_all()


@pytest.mark.timeout(60)
def test_a_fetch_stores_nothing_while_a_fast_reader_follows_it(env, tmp_path):
    """While a reader follows the fetch (and the fetch has pieces still to read), its pieces
    wait in memory: the reader does not share the processor with the store. Once the reader
    stops, every piece is stored and the file is hydrated."""
    size = 48 * MiB
    view, big, expected = followed(env, tmp_path, size)
    end = size - (LEAD_PIECES + 4) * PIECE  # the fetch then has pieces still to read
    for offset in range(0, end, PIECE):
        assert bytes(view.read(big, offset, PIECE)) == expected[offset:offset + PIECE]
    fetch = view.ghosts.fetches[big]
    time.sleep(0.5)  # time enough to store what has arrived, were the store not deferred
    assert fetch.arrived >= end and fetch.arrived < size
    assert fetch.stored_to == 0 and env.fs.getattr(big).blocks == 0
    stop_following(fetch)
    fetch.wait_done()
    assert fetch.error is None and view.ghosts.state(big) == HYDRATED
    assert bytes(view.read(big, 0, size)) == expected
    view.ghosts.close()


@pytest.mark.timeout(60)
def test_a_reader_beyond_a_full_buffer_of_deferred_pieces_reads_the_source(env, tmp_path,
                                                                          caplog):
    """When the pieces waiting for a followed reader fill the buffer, the fetch is held back
    and the reader reads on from the source; the pieces are stored once it stops."""
    size = 40 * MiB
    view, big, expected = followed(env, tmp_path, size)
    view.ghosts.buffer_bytes = 4 * MiB
    for offset in range(0, size - 3 * PIECE, PIECE // 2):
        assert bytes(view.read(big, offset, PIECE)) == expected[offset:offset + PIECE]
    fetch = view.ghosts.fetches[big]
    time.sleep(0.5)  # time enough to store the buffer, were the store not deferred
    assert fetch.held_back and fetch.arrived <= 5 * MiB and fetch.stored_to == 0
    stop_following(fetch)
    fetch.wait_done()
    assert fetch.error is None and view.ghosts.state(big) == HYDRATED
    assert bytes(view.read(big, 0, size)) == expected
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")]
    view.ghosts.close()


@pytest.mark.timeout(60)
def test_a_ghost_larger_than_the_free_space_is_read_from_its_source(env, tmp_path, caplog):
    """No fetch fills the volume only to fail: reads are served from the source, checked, the
    file stays a ghost and nothing is stored; hydrating it (or writing to it) is ENOSPC."""
    free = env.fs.free_sectors() * 4096
    size = free + 5 * MiB + 123
    src, view, big = imported(env, tmp_path, size)
    with open(os.path.join(src, "big.bin"), "rb") as f:
        expected = f.read()
    assert bytes(view.read(big, 0, size)) == expected
    assert bytes(view.read(big, size - 5000, 4 * MiB)) == expected[-5000:]  # clipped at the end
    assert bytes(view.read(big, 7 * MiB + 3, 4096)) == expected[7 * MiB + 3:7 * MiB + 4099]
    assert big not in view.ghosts.fetches
    assert view.ghosts.state(big) == GHOST
    assert env.fs.getattr(big).blocks == 0
    assert env.fs.free_sectors() * 4096 == free
    for call in (lambda: view.ghosts.hydrate(big), lambda: view.write(big, 0, b"x")):
        with pytest.raises(FSError) as info:
            call()
        assert info.value.errno == errno.ENOSPC
    assert view.ghosts.state(big) == GHOST and env.fs.free_sectors() * 4096 == free
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert bytes(view.read(big, 0, 4096)) == expected[:4096]  # still readable
    view.ghosts.close()


@pytest.mark.timeout(60)
def test_a_source_changed_under_a_ghost_too_large_to_store_gives_eio(env, tmp_path):
    """Pieces read from the source for a ghost that does not fit are checked like a fetch's."""
    free = env.fs.free_sectors() * 4096
    src, view, big = imported(env, tmp_path, free + MiB)
    assert view.ghosts.seal_some() and view.ghosts.record(big).hashes  # hashes taken
    path = os.path.join(src, "big.bin")
    st = os.stat(path)
    with open(path, "r+b") as f:  # new bytes behind the old size and mtime
        f.seek(3 * MiB + 10)
        f.write(b"changed")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert bytes(view.read(big, 0, 4096))
    with pytest.raises(FSError) as info:
        view.read(big, 3 * MiB, 4096)
    assert info.value.errno == errno.EIO
    view.ghosts.close()
