"""Sequential reads through a real filesystem mount while the same file is rewritten: what the
volume reads ahead (raid/readahead.py) must never show a reader stale or misplaced bytes."""

from __future__ import annotations

import os
import random
import shlex
import subprocess
import threading

import numpy as np
import pytest

MiB = 1 << 20
BLOCKS = 24


def _block(index: int, version: int) -> bytes:
    return (index.to_bytes(4, "little") + version.to_bytes(4, "little")) * (MiB // 8)


@pytest.mark.timeout(300)
def test_sequential_readers_beside_a_rewriting_writer_see_only_current_blocks(mounted_fs):
    path = os.path.join(mounted_fs.mountpoint, "rewritten")
    with open(path, "wb") as f:
        for i in range(BLOCKS):
            f.write(_block(i, 0))
        f.flush()
        os.fsync(f.fileno())
    last = [0] * BLOCKS  # the version of each block whose write has returned
    written: list[set[int]] = [{0} for _ in range(BLOCKS)]
    stop = threading.Event()
    problems: list[str] = []
    passes = 0

    def reader() -> None:
        nonlocal passes
        fd = os.open(path, os.O_RDONLY)
        try:
            while not stop.is_set():
                # Drop this file's pages so that every pass asks the daemon again.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                for i in range(BLOCKS):
                    floor = last[i]
                    # A read racing a write of the same range may see some of each (as on any
                    # Linux file system), so each 8-byte word is judged on its own.
                    words = np.frombuffer(os.pread(fd, MiB, i * MiB), dtype="<u4")
                    index, version = words[0::2], words[1::2]
                    if len(words) != MiB // 4 or (index != i).any():
                        problems.append(f"block {i}: misplaced bytes")
                        return
                    versions = {int(v) for v in np.unique(version)}
                    if not versions <= written[i] or min(versions) < floor:
                        problems.append(f"block {i}: versions {sorted(versions)}, after "
                                        f"{floor} was written")
                        return
                passes += 1
        finally:
            os.close(fd)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    rng = random.Random(7)
    fd = os.open(path, os.O_WRONLY)
    try:
        for version in range(1, 120):
            i = rng.randrange(BLOCKS)
            written[i].add(version)
            os.pwrite(fd, _block(i, version), i * MiB)
            last[i] = version
            if version % 10 == 0:
                os.fsync(fd)
    finally:
        os.close(fd)
    stop.set()
    t.join(timeout=120)
    assert not t.is_alive()
    assert not problems, problems[0]
    assert passes > 0
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        for i in range(BLOCKS):
            assert f.read(MiB) == _block(i, last[i]), f"block {i}"


@pytest.mark.timeout(120)
@pytest.mark.skipif(os.geteuid() != 0, reason="raising a mount's readahead needs root")
def test_kernel_readahead_is_raised_before_the_first_file_is_opened(tmp_path, fs_mount):
    # A file keeps the readahead the kernel had when it was opened. Raised a moment after the
    # mount, it was still 128 KiB for `dwfs mount W M && cp M/big ...`, whose copy then went
    # 128 KiB a request, about a tenth as fast.
    from mountutil import DWFS, make_warehouse

    from dwfs.fusesession import READAHEAD_KB

    m = fs_mount(make_warehouse(tmp_path / "wh"))
    mount = shlex.join([*DWFS, "mount", m.warehouse, str(m.mountpoint)])
    # mountpoint -d stats the mount: the first request, answered after INIT.
    script = (f"{mount} >/dev/null && dev=$(mountpoint -d {shlex.quote(str(m.mountpoint))}) "
              "&& cat /sys/class/bdi/$dev/read_ahead_kb")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert int(out) == READAHEAD_KB
    m.umount()
