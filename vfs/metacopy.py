"""A copy of the metadata database kept on the volume, to restore a lost or corrupt one.

The first two blocks of the volume are superblock slots. A copy of generation g is the
database image written into sectors allocated for it (recorded in the `metacopy` table of the
image itself, so the copy's own space stays allocated after a restore), then a superblock in
slot g % 2 naming those sectors, the image's length and checksum, and the time. The previous
generation's sectors are freed only after the new superblock is durable, so at every moment
at least one slot describes a complete copy.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from dataclasses import dataclass

import xxhash

from vfs.alloc import SECTOR
from vfs.attrs import moment_text
from vfs.errors import FSError
from vfs.filedata import BLOCK, SECTORS_PER_BLOCK, VolumeLike
from vfs.metadb import MetaDB

log = logging.getLogger(__name__)

MAGIC = b"DWFSMETA"
VERSION = 1
_HEAD = struct.Struct("<8sIIQQQQI")  # magic, version, pad, generation, time, length, hash, runs
_RUN = struct.Struct("<QI")
MAX_RUNS = (BLOCK - _HEAD.size - 8) // _RUN.size


@dataclass
class CopyInfo:
    """What a superblock says about one copy."""

    generation: int
    time_ns: int
    length: int
    checksum: int
    runs: list[tuple[int, int]]

    def age_text(self) -> str:
        """When the copy was taken, as local time and age."""
        return moment_text(self.time_ns / 1e9)


def _runs(starts: list[int], sizes: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for s, n in zip(starts, sizes, strict=True):
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((s, n))
    return runs


def encode_superblock(info: CopyInfo) -> bytes:
    """A superblock slot's bytes."""
    if len(info.runs) > MAX_RUNS:
        raise FSError(errno.ENOSPC, f"metadata copy in {len(info.runs)} pieces; at most "
                      f"{MAX_RUNS} fit a superblock")
    body = _HEAD.pack(MAGIC, VERSION, 0, info.generation, info.time_ns, info.length,
                      info.checksum, len(info.runs))
    body += b"".join(_RUN.pack(a, n) for a, n in info.runs)
    body += struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
    return body + bytes(BLOCK - len(body))


def decode_superblock(raw: bytes) -> CopyInfo | None:
    """The copy a slot describes, or None for an empty or damaged slot."""
    if raw[:8] != MAGIC:
        return None
    magic, version, _pad, gen, when, length, checksum, nruns = _HEAD.unpack_from(raw)
    if version != VERSION or nruns > MAX_RUNS:
        return None
    end = _HEAD.size + nruns * _RUN.size
    (stored,) = struct.unpack_from("<Q", raw, end)
    if xxhash.xxh3_64_intdigest(raw[:end]) != stored:
        return None
    runs = [_RUN.unpack_from(raw, _HEAD.size + i * _RUN.size) for i in range(nruns)]
    return CopyInfo(gen, when, length, checksum, [(int(a), int(n)) for a, n in runs])


def write_copy(fs) -> CopyInfo:
    """Commit, then store a new copy of the metadata on the volume (fs: a vfs Filesystem)."""
    with fs.lock:
        db: MetaDB = fs.db
        fs.commit()
        gen = int(db.setting("metacopy_generation", 0)) + 1
        page_size = db.page_size
        estimate = db.pages_bytes()
        for _attempt in range(3):
            need = _sectors_for(estimate, page_size)
            if need > fs.alloc.free_count:
                _give_up_older_copies(fs, gen, need)
            sizes = [SECTORS_PER_BLOCK] * (need // SECTORS_PER_BLOCK)
            if need % SECTORS_PER_BLOCK:
                sizes.append(need % SECTORS_PER_BLOCK)
            fs.alloc.mark()
            pieces = [p for ps in fs.alloc.allocate_split(sizes) for p in ps]
            starts = [s for s, _n in pieces]
            sizes = [n for _s, n in pieces]
            db.changemany("INSERT INTO metacopy (generation, addr, nsect) VALUES (?, ?, ?)",
                          [(gen, s, n) for s, n in zip(starts, sizes, strict=True)])
            now = time.time_ns()
            db.set_setting("metacopy_generation", gen)
            db.set_setting("metacopy_time_ns", now)
            db.commit()
            image = db.image()
            if len(image) <= need * SECTOR:
                break
            # The database grew past the estimate: give the space back and try bigger.
            _drop_generation(fs, gen)
            db.set_setting("metacopy_generation", gen - 1)
            fs.commit()
            estimate = len(image)
        else:
            raise FSError(errno.EIO, "metadata copy: the database keeps growing past its space")
        runs = _runs(starts, sizes)
        padded = image + bytes(need * SECTOR - len(image))
        pos = 0
        for addr, n in runs:
            fs.volume.write(addr * SECTOR, memoryview(padded)[pos : pos + n * SECTOR])
            pos += n * SECTOR
        fs.volume.flush()
        info = CopyInfo(gen, now, len(image), xxhash.xxh3_64_intdigest(image), runs)
        fs.volume.write((gen % 2) * BLOCK, encode_superblock(info))
        fs.volume.flush()
        for old in [r[0] for r in db.rows(
                "SELECT DISTINCT generation FROM metacopy WHERE generation<?", (gen,))]:
            _drop_generation(fs, old)
        fs.commit()
        log.info("metadata copy %d written: %d bytes in %d runs", gen, len(image), len(runs))
        return info


def _sectors_for(db_bytes: int, page_size: int) -> int:
    """Volume sectors given to a copy of a database of `db_bytes` bytes (room to grow)."""
    return -(-int(db_bytes * 1.1 + 4 * page_size) // SECTOR)


def copy_reserve(db: MetaDB) -> int:
    """Sectors to keep free for the next metadata copy: file data may not use them, so a
    full filesystem can still refresh its copy (at unmount, say)."""
    return _sectors_for(int(db.pages_bytes() * 1.25), db.page_size) + 256


def _give_up_older_copies(fs, gen: int, need: int) -> None:
    """Free the older copies before writing copy `gen` when the volume has no room for it
    beside them (the database grew since they were made, and the volume is nearly full): until
    the new copy is written, the volume holds no intact copy; the database itself is
    committed."""
    olds = [r[0] for r in fs.db.rows(
        "SELECT DISTINCT generation FROM metacopy WHERE generation<?", (gen,))]
    if not olds:
        return
    log.warning("metadata copy %d needs %d sectors and %d are free: the older copy is given up "
                "first, so the volume holds no intact copy until this one is written",
                gen, need, fs.alloc.free_count)
    for old in olds:
        _drop_generation(fs, old)
    fs.commit()  # (sectors held by the drop come back)


def _drop_generation(fs, gen: int) -> None:
    for addr, n in fs.db.rows("SELECT addr, nsect FROM metacopy WHERE generation=?", (gen,)):
        fs.alloc.hold(addr, n)
    fs.db.change("DELETE FROM metacopy WHERE generation=?", (gen,))


def latest_copy(volume: VolumeLike) -> tuple[CopyInfo, bytes] | None:
    """The newest complete, intact copy on the volume and its image, or None."""
    found = []
    for slot in (0, 1):
        info = decode_superblock(bytes(volume.read(slot * BLOCK, BLOCK)))
        if info is not None:
            found.append(info)
    for info in sorted(found, key=lambda i: -i.generation):
        parts = [bytes(volume.read(a * SECTOR, n * SECTOR)) for a, n in info.runs]
        image = b"".join(parts)[: info.length]
        if len(image) == info.length and xxhash.xxh3_64_intdigest(image) == info.checksum:
            return info, image
        log.warning("metadata copy %d on the volume is damaged (checksum mismatch); trying "
                    "an older one", info.generation)
    return None


def restore_copy(volume: VolumeLike, db_path: str) -> CopyInfo:
    """Replace the database file at `db_path` with the newest copy from the volume."""
    got = latest_copy(volume)
    if got is None:
        raise FSError(errno.ENOENT, "no intact metadata copy on the volume")
    info, image = got
    tmp = db_path + ".restore"
    with open(tmp, "wb") as f:
        f.write(image)
        f.flush()
        os.fsync(f.fileno())
    for suffix in ("-wal", "-shm"):
        try:
            os.unlink(db_path + suffix)
        except FileNotFoundError:
            continue
    os.replace(tmp, db_path)
    dirfd = os.open(os.path.dirname(os.path.abspath(db_path)), os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    log.warning("metadata restored from copy %d taken %s", info.generation, info.age_text())
    return info
