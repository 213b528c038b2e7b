"""A block-file member's queued direct writes (`write_stream`): what a reader, a later write,
a flush and a failure see of them, on real files."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from backends.blockfile import BlockFileMember
from backends.directwriter import QUEUE_BYTES
from backends.member import MemberIOError

CHUNK = 64 * 1024
MiB = 1 << 20


def _member(tmp_path, size: int = 16 * MiB) -> BlockFileMember:
    m = BlockFileMember.create(str(tmp_path / "member.img"), size)
    if m._direct is None:
        pytest.skip("the temporary directory's file system has no O_DIRECT")
    return m


def _chunks(seed: int, n: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, CHUNK, dtype=np.uint8).tobytes() for _ in range(n)]


def test_streamed_chunks_read_back_at_once_and_reach_the_file(tmp_path):
    m = _member(tmp_path)
    chunks = _chunks(1, 40)  # more than the queue holds: the writer must wait for room
    for i, c in enumerate(chunks):
        m.write_stream(i * CHUNK, c)
    assert m.read(5 * CHUNK, CHUNK) == chunks[5]  # a read waits for the queue
    assert m.read(0, 40 * CHUNK) == b"".join(chunks)
    m.flush()
    with open(m.path, "rb") as f:  # another descriptor, through the page cache
        assert f.read(40 * CHUNK) == b"".join(chunks)
    m.close()


def test_a_later_ordinary_write_lands_over_a_queued_one(tmp_path):
    m = _member(tmp_path)
    first, second = _chunks(2, 2)
    m.write_stream(3 * CHUNK, first)
    m.write(3 * CHUNK + 100, second[:1000])  # unaligned: through the page cache, after it
    m.write_stream(4 * CHUNK, first)
    m.write_stream(4 * CHUNK, second)  # the same place twice: the second one stays
    m.flush()
    m.close()
    with open(tmp_path / "member.img", "rb") as f:
        f.seek(3 * CHUNK)
        got = f.read(2 * CHUNK)
    assert got[:100] == first[:100]
    assert got[100:1100] == second[:1000]
    assert got[1100:CHUNK] == first[1100:]
    assert got[CHUNK:] == second


def test_an_unaligned_stream_write_is_an_ordinary_write(tmp_path):
    m = _member(tmp_path)
    data = _chunks(3, 1)[0][:5000]
    m.write_stream(12345, data)
    assert m.read(12345, 5000) == data
    m.close()


def test_a_failed_queued_write_fails_the_next_call_on_the_member(tmp_path):
    m = _member(tmp_path)
    writer = m._direct
    assert writer is not None
    # The kernel refuses writes on a descriptor opened for reading only: a real EBADF from
    # pwritev, as a member whose device went away would give an EIO.
    good_fd = writer.fd
    writer.fd = os.open(m.path, os.O_RDONLY | os.O_DIRECT)
    try:
        for i in range(QUEUE_BYTES // CHUNK + 4):
            try:
                m.write_stream(i * CHUNK, _chunks(4, 1)[0])
            except MemberIOError:
                break  # the failure surfaced on a later write: as good as on flush
        else:
            with pytest.raises(MemberIOError, match="member .*write failed"):
                m.flush()
    finally:
        os.close(writer.fd)
        writer.fd = good_fd
    m.write_stream(0, _chunks(5, 1)[0])  # the error was reported once; the queue works again
    m.flush()
    m.close()


def test_a_file_that_refuses_direct_writes_gets_them_through_the_page_cache(tmp_path,
                                                                            monkeypatch):
    # Some file systems open with O_DIRECT and then refuse such writes (EINVAL: alignment they
    # want larger). None does here, so the refusal is injected for the direct descriptor only;
    # the fallback writes are real.
    import backends.directwriter as dw

    m = _member(tmp_path)
    writer = m._direct
    assert writer is not None
    real = os.pwritev

    def refusing(fd, buffers, offset, *flags):
        if fd == writer.fd:
            raise OSError(22, "Invalid argument")
        return real(fd, buffers, offset, *flags)

    monkeypatch.setattr(dw.os, "pwritev", refusing)
    chunks = _chunks(6, 20)
    for i, c in enumerate(chunks):
        m.write_stream(i * CHUNK, c)
    m.flush()  # no error: the refused writes went through the page cache
    assert not writer.usable
    assert m.read(0, 20 * CHUNK) == b"".join(chunks)
    m.close()


def test_a_large_write_behind_a_small_one_makes_room_instead_of_waiting_forever(tmp_path):
    # A small queued write does not wake the writing thread on its own (it waits for 1 MiB);
    # a write too large to fit beside it must wake it rather than wait for room forever.
    m = _member(tmp_path, 32 * MiB)
    small = _chunks(7, 1)[0]
    large = np.random.default_rng(8).integers(0, 256, QUEUE_BYTES - CHUNK // 2,
                                              dtype=np.uint8)
    large = large[: len(large) // 4096 * 4096].tobytes()
    m.write_stream(0, small)
    m.write_stream(MiB, large)
    assert m.read(0, CHUNK) == small
    assert m.read(MiB, len(large)) == large
    m.close()


def test_a_drain_on_another_thread_returns_while_small_writes_keep_coming(tmp_path):
    # One thread drains the queue (a member read by read-ahead) while another goes on queueing
    # small writes (the volume's writer). A small write does not wake the writing thread on
    # its own; one queued while somebody drains must, or the drain and the thread wait for
    # each other until 1 MiB more is queued, which may never come.
    m = _member(tmp_path)
    writer = m._direct
    block = memoryview(bytes(range(256)) * 16)
    for round_ in range(3000):
        writer.submit(0, block)
        drain = threading.Thread(target=writer.drain, daemon=True)
        drain.start()
        for i in range(1, 4):
            writer.submit(i * 4096, block)
        drain.join(timeout=10)
        assert not drain.is_alive(), f"the drain never returned (round {round_})"
        writer.drain()
    assert m.read(0, 4 * 4096) == bytes(block) * 4
    m.close()


def test_label_probes_of_many_devices_leave_out_one_that_hangs(tmp_path, monkeypatch, caplog):
    # A dying disk can hang a read for minutes; the search for moved members must not wait
    # for it. (A hung device cannot be made here: a read that sleeps stands in for it.)
    import time

    from backends import devices

    paths = []
    for name in ("a", "hangs", "b", "empty"):
        p = tmp_path / name
        p.write_bytes(b"" if name == "empty" else name.encode() * 3)
        paths.append(str(p))
    real = devices.read_head
    release = threading.Event()

    def read_head(path, length):
        if path.endswith("hangs"):
            release.wait(30)
        return real(path, length)

    monkeypatch.setattr(devices, "read_head", read_head)
    start = time.monotonic()
    heads = devices.read_heads(paths, 4, timeout=0.5)
    took = time.monotonic() - start
    release.set()
    assert heads == {paths[0]: b"aaa", paths[2]: b"bbb"}  # the empty one has nothing to give
    assert took < 10
    assert any("hangs did not answer" in r.getMessage() for r in caplog.records)
