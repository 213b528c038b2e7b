"""Every RAID level on real member files: random writes against a byte model, reassembly, every
survivable loss of members, one loss too many, degraded writes, and SQLite members."""

from __future__ import annotations

import errno
import itertools
import os
import random
import shutil
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from volhelpers import (
    LEVEL_MEMBERS,
    Model,
    apply,
    assert_reads,
    beyond_sets,
    boundary_writes,
    build,
    close_members,
    loss_sets,
    max_loss_sets,
    open_vol,
    plan,
    remove_member,
    restore,
    sample,
    snapshot,
    within_tolerance,
)

from backends import BlockFileMember, SqliteBlobMember
from raid.errors import AssemblyError, RaidError, UnrecoverableError
from raid.levels import LEVELS
from raid.rebuild import attach_replacement, rebuild

CHUNK = 4096
ROWS = 10
ALL_LEVELS = sorted(LEVELS)
REDUNDANT = [lv for lv in ALL_LEVELS if plan(lv, LEVEL_MEMBERS[lv], CHUNK, ROWS).tolerance > 0]


def hypo(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )


_examples = itertools.count()


def _fresh(tmp_path):
    d = tmp_path / f"ex{next(_examples)}"
    d.mkdir()
    return d


@st.composite
def write_op(draw, g):
    """One write: offset near a chunk/stripe boundary, at the end, or anywhere."""
    cap = g.capacity
    kind = draw(st.sampled_from(["any", "chunk", "stripe", "end"]))
    if kind == "any":
        off = draw(st.integers(0, cap - 1))
    elif kind == "chunk":
        off = draw(st.integers(0, cap // g.chunk - 1)) * g.chunk + draw(st.integers(-2, 2))
    elif kind == "stripe":
        off = draw(st.integers(0, cap // g.stripe_bytes - 1)) * g.stripe_bytes + draw(
            st.integers(-2, 2)
        )
    else:
        off = cap - draw(st.integers(1, 2 * g.stripe_bytes + 1))
    off = min(max(off, 0), cap - 1)
    length = draw(
        st.one_of(
            st.integers(1, 48),
            st.integers(1, 3 * g.stripe_bytes),
            st.sampled_from([g.chunk, g.stripe_bytes, g.chunk - 1, g.stripe_bytes + 1]),
            st.just(cap - off),
        )
    )
    length = min(length, cap - off)
    fill = draw(st.integers(0, 2**32 - 1))
    return off, random.Random(fill).randbytes(length)


# --- random writes on every level ---------------------------------------------------------------


@pytest.mark.parametrize("level", ALL_LEVELS)
@hypo(12)
@given(data=st.data())
def test_random_writes_match_model_and_survive_reassembly(tmp_path, level, data):
    n = LEVEL_MEMBERS[level]
    g = plan(level, n, CHUNK, ROWS)
    d = _fresh(tmp_path)
    paths, uuid, geometry = build(d, level, n, CHUNK, ROWS)
    assert geometry == g
    model = Model(g.capacity)
    vol = open_vol(paths, uuid)
    assert vol.capacity == g.capacity
    assert vol.read(0, g.capacity) == bytes(g.capacity)  # never written: zeros
    # Reading back after every write commits partial stripes at once; without it they
    # gather in the volume's write-back stripe cache until a read, flush or close.
    check = data.draw(st.booleans(), label="read_back")
    ops1 = data.draw(st.lists(write_op(g), min_size=1, max_size=10), label="ops1")
    apply(vol, model, ops1, check=check)
    # The last byte of the volume, and writes/reads at and past its end.
    last = data.draw(st.integers(1, 255), label="last")
    apply(vol, model, [(g.capacity - 1, bytes([last]))])
    assert vol.read(g.capacity - 1, 100) == bytes([last])
    assert vol.read(g.capacity, 10) == b""
    with pytest.raises(RaidError) as ei:
        vol.write(g.capacity - 1, b"xy")
    assert ei.value.errno == errno.ENOSPC
    assert_reads(vol, model)
    vol.close()

    vol = open_vol(paths, uuid)
    assert vol.state() == "clean"
    assert_reads(vol, model)
    apply(vol, model, data.draw(st.lists(write_op(g), max_size=6), label="ops2"), check=check)
    vol.close()

    vol = open_vol(paths, uuid)
    assert vol.state() == "clean"
    assert_reads(vol, model)
    for off, payload in data.draw(st.lists(write_op(g), max_size=5), label="reads"):
        assert vol.read(off, len(payload)) == model.get(off, len(payload))
    vol.close()
    shutil.rmtree(d)


@pytest.mark.parametrize("level", ["raid5", "raid6", "raidz3", "raid10"])
def test_small_writes_gathering_in_stripes(tmp_path, level):
    """Many small, overlapping writes into the same stripes with no read in between."""
    n = LEVEL_MEMBERS[level]
    paths, uuid, g = build(tmp_path, level, n, CHUNK, ROWS)
    rng = random.Random(17)
    model = Model(g.capacity)
    vol = open_vol(paths, uuid)
    apply(vol, model, [(0, rng.randbytes(g.capacity))], check=False)
    vol.flush()
    stripes = rng.sample(range(g.stripes), 3) + [g.stripes - 1]
    for _ in range(60):
        base = rng.choice(stripes) * g.stripe_bytes
        off = base + rng.randrange(g.stripe_bytes)
        length = min(rng.choice([1, 7, 100, g.chunk // 2, g.chunk]), g.capacity - off)
        apply(vol, model, [(off, rng.randbytes(length))], check=False)
    # A write that fills the rest of one stripe, and one that overwrites a whole stripe.
    apply(vol, model, [(stripes[0] * g.stripe_bytes, rng.randbytes(g.stripe_bytes))],
          check=False)
    vol.flush()
    assert_reads(vol, model)
    apply(vol, model, [(stripes[1] * g.stripe_bytes + 5, b"\x01\x02\x03")], check=False)
    vol.close()  # pending stripes are stored on close
    vol = open_vol(paths, uuid)
    assert_reads(vol, model)
    vol.close()
    remove_member(paths[1])  # and their parity is right
    vol = open_vol(paths, uuid)
    assert_reads(vol, model)
    vol.close()


# --- losing members -------------------------------------------------------------------------------


def _filled_array(tmp_path, level, seed, backend="file", rows=ROWS):
    n = LEVEL_MEMBERS[level]
    paths, uuid, g = build(tmp_path / "a", level, n, CHUNK, rows, backend)
    rng = random.Random(seed)
    model = Model(g.capacity)
    vol = open_vol(paths, uuid)
    # Most of the volume, then boundary-crossing writes over it.
    apply(vol, model, [(0, rng.randbytes(g.capacity - 3 * g.stripe_bytes - 5))], check=False)
    apply(vol, model, boundary_writes(rng, g, 20))
    vol.close()
    return paths, uuid, g, model, rng


@pytest.mark.parametrize("level", ALL_LEVELS)
def test_every_survivable_loss_reads_the_model(tmp_path, level):
    paths, uuid, g, model, rng = _filled_array(tmp_path, level, seed=zlib.crc32(level.encode()))
    snap = tmp_path / "snap"
    snapshot(paths, snap)
    sets = loss_sets(g)
    if g.tolerance == 0:
        assert sets == []
    else:
        # every survivable set, exhaustively (raid60: 120, raidz3: 63)
        assert all(within_tolerance(g, s) for s in sets)
        assert len(sets) >= g.members
    for i, lost in enumerate(sample(rng, sets, 130)):
        restore(paths, snap)
        for s in lost:
            remove_member(paths[s])
        # The first few go through a full assembly and shutdown; the rest are opened
        # read-only (no label writes, so no fsyncs) and dropped, since the snapshot is restored.
        full = i < 4
        vol = open_vol(paths, uuid, resync=full)
        assert vol.state() == "degraded", lost
        st_ = vol.status()
        assert [m["slot"] for m in st_["members"] if m["state"] != "active"] == sorted(lost)
        assert_reads(vol, model, rng, extra=3)
        if full:
            vol.close()
        else:
            close_members(vol)
    restore(paths, snap)
    vol = open_vol(paths, uuid)
    assert vol.state() == "clean"
    assert_reads(vol, model)
    vol.close()


@pytest.mark.parametrize("level", ALL_LEVELS)
def test_one_loss_too_many_never_returns_wrong_bytes(tmp_path, level):
    paths, uuid, g, model, rng = _filled_array(tmp_path, level, seed=7 + len(level))
    snap = tmp_path / "snap"
    snapshot(paths, snap)
    chosen = sample(rng, beyond_sets(g), 3)
    if g.groups > 1:  # make sure the last group is tried too
        last_group = [s for s in beyond_sets(g) if s[0] // g.group_size == g.groups - 1]
        chosen.append(last_group[0])
    for lost in chosen:
        assert not within_tolerance(g, lost)
        restore(paths, snap)
        for s in lost:
            remove_member(paths[s])
        with pytest.raises(AssemblyError) as ei:
            open_vol(paths, uuid)
        for s in lost:
            assert f"slot {s}" in str(ei.value)
        if len(lost) == g.members:
            with pytest.raises(AssemblyError):
                open_vol(paths, uuid, allow_failed=True)
            continue
        # Forced open: every read returns the model's bytes or raises, never other bytes.
        vol = open_vol(paths, uuid, allow_failed=True, resync=False)
        assert vol.state() == "failed"
        failed = ok = 0
        for off in range(0, g.capacity, g.chunk // 2):
            try:
                got = vol.read(off, g.chunk // 2)
            except UnrecoverableError:
                failed += 1
                continue
            ok += 1
            assert got == model.get(off, g.chunk // 2), f"wrong bytes at {off} with {lost} lost"
        assert failed > 0
        assert ok > 0  # chunks on surviving members (or other groups) still read
        with pytest.raises(UnrecoverableError):
            vol.write(0, bytes(g.stripe_bytes * g.groups))  # touches the failed group
        vol.close()


@pytest.mark.parametrize("level", ALL_LEVELS)
def test_runtime_loss_beyond_tolerance_fails_reads(tmp_path, level):
    paths, uuid, g, model, rng = _filled_array(tmp_path, level, seed=99)
    vol = open_vol(paths, uuid)
    lost = beyond_sets(g)[0]  # tolerance + 1 members of group 0
    for s in lost[:-1]:
        remove_member(paths[s])
    vol.check_members()
    if g.tolerance:
        assert vol.state() == "degraded"
        assert_reads(vol, model)
    remove_member(paths[lost[-1]])
    assert vol.status()["state"] == "failed"
    assert {m["slot"] for m in vol.status()["members"] if m["state"] == "faulty"} == set(lost)
    with pytest.raises(UnrecoverableError):
        vol.read(0, g.capacity)
    with pytest.raises(UnrecoverableError):
        vol.write(0, bytes(g.stripe_bytes))  # stripe 0 lives in group 0
    if g.groups > 1:  # the other groups still read and write
        off = g.stripe_bytes  # stripe 1 lives in group 1
        assert vol.read(off, g.stripe_bytes) == model.get(off, g.stripe_bytes)
        vol.write(off, b"\x5a" * 10)
        assert vol.read(off, 10) == b"\x5a" * 10
    vol.close()


# --- degraded writes ----------------------------------------------------------------------------


@pytest.mark.parametrize("level", REDUNDANT)
@hypo(6)
@given(data=st.data())
def test_degraded_writes_survive_reassembly_and_rebuild(tmp_path, level, data):
    n = LEVEL_MEMBERS[level]
    d = _fresh(tmp_path)
    paths, uuid, g = build(d, level, n, CHUNK, ROWS)
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    model = Model(g.capacity)
    vol = open_vol(paths, uuid)
    apply(vol, model, boundary_writes(rng, g, 8), check=False)
    vol.close()

    lost = data.draw(st.sampled_from(max_loss_sets(g)), label="lost")
    for s in lost:
        remove_member(paths[s])
    vol = open_vol(paths, uuid)
    assert vol.state() == "degraded"
    assert_reads(vol, model)
    ops = data.draw(st.lists(write_op(g), min_size=1, max_size=8), label="ops")
    apply(vol, model, ops, check=data.draw(st.booleans(), label="read_back"))
    apply(vol, model, [(g.capacity - 1, b"\xee")])
    assert_reads(vol, model)
    vol.close()

    vol = open_vol(paths, uuid)  # still without the lost members
    assert vol.state() == "degraded"
    assert_reads(vol, model)
    # Rebuild every lost slot onto a fresh member: the rebuilt data must match the model.
    size = os.path.getsize(paths[next(i for i in range(n) if i not in lost)])
    for s in lost:
        new = str(d / f"new{s}.img")
        attach_replacement(vol, s, BlockFileMember.create(new, size), new)
        paths[s] = new
        rebuild(vol, s)
    assert vol.state() == "clean"
    assert_reads(vol, model)
    vol.close()

    # Now lose a different survivable set: parity written while degraded must be right.
    other = data.draw(st.sampled_from(max_loss_sets(g)), label="other")
    for s in other:
        remove_member(paths[s])
    vol = open_vol(paths, uuid)
    assert vol.state() == "degraded"
    assert_reads(vol, model)
    vol.close()
    shutil.rmtree(d)


# --- SQLite members -----------------------------------------------------------------------------

SQLITE_LEVELS = ["raid5", "raid6", "raid10", "raidz2"]


@pytest.mark.parametrize("level", SQLITE_LEVELS)
def test_sqlite_members(tmp_path, level):
    paths, uuid, g, model, rng = _filled_array(tmp_path, level, seed=5, backend="sqlite")
    assert all(p.endswith(".db") for p in paths)
    with open(paths[0], "rb") as f:
        assert f.read(16).startswith(b"SQLite format 3")
    vol = open_vol(paths, uuid)
    assert vol.state() == "clean"
    assert isinstance(vol.slots[0].member, SqliteBlobMember)
    assert_reads(vol, model, rng, extra=5)
    apply(vol, model, boundary_writes(rng, g, 6))
    vol.close()

    snap = tmp_path / "snap"
    snapshot(paths, snap)
    saved = bytes(model.data)
    for lost in sample(rng, loss_sets(g), 6):
        restore(paths, snap)
        for s in lost:
            remove_member(paths[s])
        vol = open_vol(paths, uuid)
        assert vol.state() == "degraded"
        assert_reads(vol, model)
        vol.close()

    # Degraded writes onto SQLite members, then reassemble.
    restore(paths, snap)
    lost = max_loss_sets(g)[-1]
    for s in lost:
        remove_member(paths[s])
    vol = open_vol(paths, uuid)
    apply(vol, model, boundary_writes(rng, g, 6))
    vol.close()
    vol = open_vol(paths, uuid)
    assert vol.state() == "degraded"
    assert_reads(vol, model)
    vol.close()

    # A database deleted while the array runs is noticed and the array goes on degraded.
    restore(paths, snap)
    model.data[:] = saved
    vol = open_vol(paths, uuid)
    victim = max_loss_sets(g)[0][0]
    remove_member(paths[victim])
    st_ = vol.status()
    assert st_["state"] == "degraded"
    assert st_["members"][victim]["state"] == "faulty"
    apply(vol, model, boundary_writes(rng, g, 4))
    assert_reads(vol, model)
    vol.close()


def test_mixed_file_and_sqlite_members(tmp_path):
    n = LEVEL_MEMBERS["raid6"]
    kinds = ["file", "sqlite"] * (n // 2)
    paths, uuid, g = build(tmp_path, "raid6", n, CHUNK, ROWS, backend=kinds)
    rng = random.Random(3)
    model = Model(g.capacity)
    vol = open_vol(paths, uuid)
    apply(vol, model, boundary_writes(rng, g, 12))
    vol.close()
    remove_member(paths[0])  # a block file
    remove_member(paths[1])  # a database
    vol = open_vol(paths, uuid)
    assert vol.state() == "degraded"
    assert_reads(vol, model)
    apply(vol, model, boundary_writes(rng, g, 4))
    vol.close()
    vol = open_vol(paths, uuid)
    assert_reads(vol, model)
    vol.close()


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_write_durable_reaches_the_member(tmp_path, kind):
    """A durable record (the write-intent bitmap) is there after the member is reopened, and
    leaves the member's other data as it was; a record past the end is refused."""
    cls = BlockFileMember if kind == "file" else SqliteBlobMember
    path = str(tmp_path / "m")
    m = cls.create(path, 1 << 20)
    m.write(0, b"a" * 8192)
    m.write_durable(4096, b"R" * 100)
    with pytest.raises(OSError):
        m.write_durable((1 << 20) - 10, b"x" * 20)
    m.close()
    m = cls.open(path)
    assert m.read(0, 8192) == b"a" * 4096 + b"R" * 100 + b"a" * 3996
    m.close()


def _cached(path: str, offset: int, length: int) -> bool:
    """Whether the host's page cache holds [offset, offset + length) of `path` (a read that
    must not wait for the disk succeeds)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.preadv(fd, [bytearray(length)], offset, os.RWF_NOWAIT) == length
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_prefetch_brings_member_data_into_the_cache(tmp_path):
    """A read-ahead hint is carried out in the background (the data is in the host's cache
    soon after, without a read), and hints still queued when a member closes are dropped."""
    path = str(tmp_path / "m")
    m = BlockFileMember.create(path, 8 << 20)
    m.write(0, os.urandom(8 << 20))
    m.flush()
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert not _cached(path, 1 << 20, 1 << 20)
    m.prefetch(1 << 20, 1 << 20)
    deadline = time.monotonic() + 10
    while not _cached(path, 1 << 20, 1 << 20) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _cached(path, 1 << 20, 1 << 20)
    for i in range(64):  # closing with hints queued: they are dropped, nothing fails
        m.prefetch(i * 4096, 4096)
    m.close()
    other = BlockFileMember.create(str(tmp_path / "n"), 1 << 20)
    other.write(0, b"z" * 4096)
    other.prefetch(0, 4096)  # the background thread is still serving hints
    assert other.read(0, 4096) == b"z" * 4096
    other.close()
