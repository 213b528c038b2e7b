"""Helpers shared by the volume tests: building arrays on real member files, a byte model,
boundary-biased write plans, member loss sets and member-file snapshots."""

from __future__ import annotations

import itertools
import os
import random
import shutil
from collections.abc import Iterable, Sequence

import numpy as np

from backends import BlockFileMember, SqliteBlobMember, open_member
from raid.assemble import assemble, create_array
from raid.geometry import Geometry, data_offset
from raid.volume import Volume

# Every level of raid.levels.LEVELS with a sensible member count.
LEVEL_MEMBERS = {
    "raid0": 3,
    "raid1": 3,
    "raid5": 4,
    "raid6": 6,
    "raid10": 4,
    "raid50": 6,
    "raid60": 8,
    "raidz1": 3,
    "raidz2": 5,
    "raidz3": 7,
}

SQLITE_SUFFIXES = ("-wal", "-shm", "-journal")


def member_size(members: int, chunk: int, rows: int) -> int:
    """Member bytes that hold the header plus `rows` data chunks."""
    return data_offset(rows, members) + rows * chunk


def plan(level: str, members: int, chunk: int, rows: int) -> Geometry:
    """The geometry an array of members sized for `rows` rows will get."""
    return Geometry.plan(level, members, chunk, member_size(members, chunk, rows))


def build(
    directory,
    level: str,
    members: int,
    chunk: int = 4096,
    rows: int = 10,
    backend: str | Sequence[str] = "file",
) -> tuple[list[str], str, Geometry]:
    """Create an array on new members in `directory`; returns (paths, uuid, geometry)."""
    os.makedirs(directory, exist_ok=True)
    size = member_size(members, chunk, rows)
    kinds = [backend] * members if isinstance(backend, str) else list(backend)
    paths, ms = [], []
    for i, kind in enumerate(kinds):
        if kind == "file":
            p = os.path.join(directory, f"m{i}.img")
            ms.append(BlockFileMember.create(p, size))
        else:
            p = os.path.join(directory, f"m{i}.db")
            ms.append(SqliteBlobMember.create(p, size))
        paths.append(p)
    uuid, geometry = create_array(ms, level, chunk)
    for m in ms:
        m.close()
    return paths, uuid, geometry


def open_vol(paths: Sequence[str], uuid: str, **kw) -> Volume:
    return assemble(list(paths), uuid, open_member, **kw)


def _files_of(path: str) -> list[str]:
    return [path] + [path + s for s in SQLITE_SUFFIXES]


def remove_member(path: str) -> None:
    """Delete a member's files (a block file, or a database with its WAL files)."""
    for p in _files_of(path):
        if os.path.exists(p):
            os.unlink(p)


def snapshot(paths: Sequence[str], dest) -> None:
    """Copy the member files (closed array) to `dest`."""
    os.makedirs(dest, exist_ok=True)
    for path in paths:
        for p in _files_of(path):
            if os.path.exists(p):
                shutil.copyfile(p, os.path.join(dest, os.path.basename(p)))


def restore(paths: Sequence[str], src) -> None:
    """Put the member files saved by `snapshot` back, dropping whatever is there now."""
    for path in paths:
        remove_member(path)
        for p in _files_of(path):
            saved = os.path.join(src, os.path.basename(p))
            if os.path.exists(saved):
                shutil.copyfile(saved, p)


def rand_bytes(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).bytes(n)


class Model:
    """What the volume must read back."""

    def __init__(self, capacity: int) -> None:
        self.data = bytearray(capacity)

    def write(self, offset: int, payload: bytes) -> None:
        self.data[offset : offset + len(payload)] = payload

    def get(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])


def boundary_offset(rng: random.Random, g: Geometry) -> int:
    """An offset near a chunk or stripe boundary, at the end, or anywhere."""
    cap = g.capacity
    kind = rng.choice(("any", "chunk", "stripe", "end", "start"))
    if kind == "any":
        off = rng.randrange(cap)
    elif kind == "chunk":
        off = rng.randrange(cap // g.chunk) * g.chunk + rng.randint(-3, 3)
    elif kind == "stripe":
        off = rng.randrange(cap // g.stripe_bytes) * g.stripe_bytes + rng.randint(-3, 3)
    elif kind == "end":
        off = cap - rng.randint(1, 2 * g.stripe_bytes + 1)
    else:
        off = rng.randint(0, 3)
    return min(max(off, 0), cap - 1)


def boundary_length(rng: random.Random, g: Geometry, off: int) -> int:
    choices = (
        rng.randint(1, 64),
        rng.randint(1, 3 * g.stripe_bytes),
        g.chunk,
        g.stripe_bytes,
        g.chunk + 1,
        g.stripe_bytes - 1,
        g.capacity - off,  # to the very end of the volume
    )
    return min(rng.choice(choices), g.capacity - off)


def boundary_writes(rng: random.Random, g: Geometry, count: int) -> list[tuple[int, bytes]]:
    """Writes across chunk and stripe boundaries, always including the last byte."""
    ops = [(g.capacity - 1, bytes([rng.randrange(1, 256)]))]
    for _ in range(count):
        off = boundary_offset(rng, g)
        n = boundary_length(rng, g, off)
        ops.append((off, rng.randbytes(n)))
    rng.shuffle(ops)
    return ops


def apply(vol: Volume, model: Model, ops: Iterable[tuple[int, bytes]], check: bool = True) -> None:
    """Write every op to the volume and the model; re-read a window around each write."""
    g = vol.geometry
    for off, payload in ops:
        vol.write(off, payload)
        model.write(off, payload)
        if check:
            lo = max(0, off - g.stripe_bytes - 1)
            hi = min(g.capacity, off + len(payload) + g.stripe_bytes + 1)
            assert vol.read(lo, hi - lo) == model.get(lo, hi - lo), f"after write at {off}"


def assert_reads(vol: Volume, model: Model, rng: random.Random | None = None, extra: int = 0):
    """The whole volume equals the model, and so do `extra` random unaligned reads."""
    whole = vol.read(0, vol.capacity)
    assert len(whole) == len(model.data)
    if whole != model.data:
        first = next(i for i, (a, b) in enumerate(zip(whole, model.data, strict=True)) if a != b)
        raise AssertionError(f"volume differs from the model first at byte {first}")
    for _ in range(extra):
        assert rng is not None
        off = boundary_offset(rng, vol.geometry)
        n = boundary_length(rng, vol.geometry, off)
        assert vol.read(off, n) == model.get(off, n), f"read {off}+{n}"


def group_slots(g: Geometry, group: int) -> list[int]:
    return list(range(group * g.group_size, (group + 1) * g.group_size))


def within_tolerance(g: Geometry, lost: Iterable[int]) -> bool:
    per_group = [0] * g.groups
    for s in lost:
        per_group[s // g.group_size] += 1
    return max(per_group) <= g.tolerance


def loss_sets(g: Geometry) -> list[tuple[int, ...]]:
    """Every non-empty set of members the array survives (at most `tolerance` per group)."""
    per_group = []
    for group in range(g.groups):
        slots = group_slots(g, group)
        options = [
            combo for r in range(g.tolerance + 1) for combo in itertools.combinations(slots, r)
        ]
        per_group.append(options)
    sets = [tuple(itertools.chain(*parts)) for parts in itertools.product(*per_group)]
    return [s for s in sets if s]


def max_loss_sets(g: Geometry) -> list[tuple[int, ...]]:
    """Survivable sets that lose exactly `tolerance` members in every group they touch."""
    out = []
    for s in loss_sets(g):
        counts = [sum(1 for x in s if x // g.group_size == grp) for grp in range(g.groups)]
        if all(c in (0, g.tolerance) for c in counts):
            out.append(s)
    return out


def beyond_sets(g: Geometry) -> list[tuple[int, ...]]:
    """Sets of `tolerance + 1` members of one group: one more than that group survives."""
    out = []
    for group in range(g.groups):
        out.extend(itertools.combinations(group_slots(g, group), g.tolerance + 1))
    return out


def sample(rng: random.Random, items: list, limit: int) -> list:
    return items if len(items) <= limit else rng.sample(items, limit)


def close_members(vol: Volume) -> None:
    """Release the members without a clean shutdown (as if the process had died)."""
    for s in vol.slots:
        if s.member is not None:
            s.member.close()
            s.member = None
    vol._closed = True
