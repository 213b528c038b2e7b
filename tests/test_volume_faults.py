"""Faults on real member files: silent corruption of chunks and of checksum-table copies, foreign,
swapped and stale members, rebuild onto a replacement (and its resumption after kill -9), and a
crash in the middle of stripe writes (the RAID write hole)."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from volhelpers import (
    LEVEL_MEMBERS,
    Model,
    apply,
    assert_reads,
    boundary_writes,
    build,
    close_members,
    max_loss_sets,
    open_vol,
    rand_bytes,
    remove_member,
    restore,
    snapshot,
)

import raid.rebuild
from backends import BlockFileMember
from backends.member import MemberIOError
from raid.assemble import read_label
from raid.checksums import UNWRITTEN, chunk_checksum
from raid.errors import AssemblyError, UnrecoverableError
from raid.geometry import BITMAP_OFFSET, BITMAP_SIZE, TABLE_PAGE
from raid.label import Label, SlotRecord
from raid.rebuild import attach_replacement, rebuild
from raid.scrub import scrub
from raid.table import page_offset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 4096


def _filled(directory, level, rows=24, seed=1, chunk=CHUNK):
    """An array whose every chunk is written, closed; returns (paths, uuid, g, model, rng)."""
    n = LEVEL_MEMBERS[level]
    paths, uuid, g = build(directory, level, n, chunk, rows)
    rng = random.Random(seed)
    model = Model(g.capacity)
    vol = open_vol(paths, uuid)
    apply(vol, model, [(0, rand_bytes(seed, g.capacity))], check=False)
    apply(vol, model, boundary_writes(rng, g, 10))
    for slot in range(g.members):
        for row in range(g.rows):
            assert vol.table.get(slot, row) != UNWRITTEN
    vol.close()
    return paths, uuid, g, model, rng


def _flip(path: str, offset: int, rng: random.Random) -> None:
    """XOR a byte of a member file with a non-zero value."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ rng.randrange(1, 256)]))


def _corrupt_chunk(path, g, row, rng) -> None:
    base = g.chunk_offset(row)
    assert base >= g.data_offset
    for pos in rng.sample(range(g.chunk), rng.randint(1, 3)):
        _flip(path, base + pos, rng)


def _corrupt_rows(paths, g, rng, max_per_row=None):
    """Corrupt up to `tolerance` chunks of every row of every group (at least one somewhere).

    Returns {slot: {row: is_data_column}}.
    """
    limit = g.tolerance if max_per_row is None else max_per_row
    hit: dict[int, dict[int, bool]] = {s: {} for s in range(g.members)}
    for group in range(g.groups):
        for row in range(g.rows):
            slots = g.column_slots(group, row)
            count = rng.randint(0, limit) if row else limit
            for c in rng.sample(range(g.group_size), count):
                _corrupt_chunk(paths[slots[c]], g, row, rng)
                hit[slots[c]][row] = c < g.k
    assert sum(len(v) for v in hit.values()) > 0
    return hit


# --- (a) corrupt chunks ---------------------------------------------------------------------------

CORRUPT_LEVELS = ["raid1", "raid5", "raid6", "raid10", "raid60", "raidz3"]


@pytest.mark.parametrize("level", CORRUPT_LEVELS)
def test_scrub_reports_then_repairs_corrupt_chunks(tmp_path, level):
    paths, uuid, g, model, rng = _filled(tmp_path / "a", level, seed=11)
    hit = _corrupt_rows(paths, g, rng)
    vol = open_vol(paths, uuid)
    # A scrub without repair reports every corrupt chunk against its own member, mends nothing.
    for _ in range(2):
        report = scrub(vol, repair=False)
        assert report.rows_checked == g.rows
        for s in range(g.members):
            found = report.members[s]
            assert found.checksum_errors == len(hit[s]), (s, found)
            assert found.fixed == 0
            assert found.parity_mismatches == found.table_errors == found.read_errors == 0
        assert report.errors == sum(len(v) for v in hit.values())
        assert not report.clean
        assert all(p["kind"] == "checksum mismatch" and not p["fixed"] for p in report.problems)
    # With repair: the same findings, each fixed.
    report = scrub(vol, repair=True)
    for s in range(g.members):
        assert report.members[s].checksum_errors == len(hit[s])
        assert report.members[s].fixed == len(hit[s])
        assert report.members[s].unrecoverable == 0
    assert report.fixed == report.errors > 0
    again = scrub(vol)
    assert again.clean and again.errors == 0, again.to_dict()
    assert_reads(vol, model)
    status = vol.status()
    for s in range(g.members):
        assert status["members"][s]["repaired"] == len(hit[s])
    vol.close()
    # The repairs are real: lose the most members the array survives and read everything.
    lost = max(max_loss_sets(g), key=lambda ls: sum(len(hit[s]) for s in ls))
    for s in lost:
        remove_member(paths[s])
    vol = open_vol(paths, uuid)
    assert vol.state() == "degraded"
    assert_reads(vol, model)
    vol.close()


@pytest.mark.parametrize("level", ["raid5", "raid6", "raidz2", "raid50"])
def test_reads_see_through_corruption_and_count_it(tmp_path, level):
    paths, uuid, g, model, rng = _filled(tmp_path / "a", level, seed=21)
    hit = _corrupt_rows(paths, g, rng)
    vol = open_vol(paths, uuid)
    assert_reads(vol, model)
    members = vol.status()["members"]
    for s in range(g.members):
        data_hits = sum(1 for is_data in hit[s].values() if is_data)
        # Every corrupt data chunk is read and caught; a corrupt parity chunk only when its
        # row needed reconstruction.
        assert data_hits <= members[s]["checksum_errors"] <= len(hit[s]), (s, members[s])
        # Corrupt data chunks are rewritten in place by the read that met them.
        assert data_hits <= members[s]["repaired"] <= members[s]["checksum_errors"]
        if not hit[s]:
            assert members[s]["checksum_errors"] == 0
    before = [m["checksum_errors"] for m in members]
    repaired = [m["repaired"] for m in members]
    assert_reads(vol, model)  # the read repaired the data chunks it caught: nothing new
    assert [m["checksum_errors"] for m in vol.status()["members"]] == before
    report = scrub(vol, repair=True)  # finds what reads did not mend, and mends it
    assert report.fixed == report.errors
    assert report.unrecoverable == 0
    for s in range(g.members):
        assert report.members[s].checksum_errors == len(hit[s]) - repaired[s]
    assert scrub(vol).clean
    vol.close()


def test_a_corrupt_chunk_is_counted_against_its_own_slot(tmp_path):
    paths, uuid, g, model, rng = _filled(tmp_path / "a", "raid5", seed=31)
    row = 5
    stripe = row * g.groups
    slots = g.column_slots(0, row)
    victim = slots[1]  # data column 1 of the row
    _corrupt_chunk(paths[victim], g, row, rng)
    vol = open_vol(paths, uuid)
    off = stripe * g.stripe_bytes + g.chunk + 10
    assert vol.read(off, 100) == model.get(off, 100)
    members = vol.status()["members"]
    assert [m["checksum_errors"] for m in members] == [
        1 if s == victim else 0 for s in range(g.members)
    ]
    assert members[victim]["repaired"] == 1
    assert vol.read(off, 100) == model.get(off, 100)
    assert vol.status()["members"][victim]["checksum_errors"] == 1  # repaired in place
    assert scrub(vol).clean
    vol.close()


def test_unaligned_reads_through_corrupt_chunks(tmp_path):
    """Reads that start and end inside corrupt chunks still return the written bytes."""
    paths, uuid, g, model, rng = _filled(tmp_path / "a", "raid6", seed=33)
    hit = _corrupt_rows(paths, g, rng, max_per_row=2)
    vol = open_vol(paths, uuid)
    for _ in range(40):
        off = rng.randrange(g.capacity - 1)
        n = rng.randrange(1, min(g.capacity - off, 3 * g.stripe_bytes) + 1)
        assert vol.read(off, n) == model.get(off, n), f"read {off}+{n}"
    assert_reads(vol, model)
    members = vol.status()["members"]
    for s in range(g.members):
        assert members[s]["checksum_errors"] <= len(hit[s])
    vol.close()


def test_member_read_error_mid_run_is_reconstructed(tmp_path, monkeypatch):
    """A member that fails a multi-chunk read is taken out and its chunks rebuilt."""
    paths, uuid, g, model, rng = _filled(tmp_path / "a", "raid6", seed=35)
    vol = open_vol(paths, uuid)
    victim = vol.slots[2].member
    calls = []

    def failing(offset, buffers):
        calls.append(len(buffers))
        raise MemberIOError(victim.path, "read", "injected")

    monkeypatch.setattr(victim, "readinto_many", failing)
    assert_reads(vol, model)
    assert max(calls) > 1  # the batched path asked for several chunks at once
    status = vol.status()["members"][2]
    assert status["state"] == "faulty"
    assert status["read_errors"] == 1
    assert_reads(vol, model)
    vol.close(write=False)


@pytest.mark.parametrize("level", ["raid5", "raid6", "raid10"])
def test_corruption_beyond_tolerance_raises_never_wrong_bytes(tmp_path, level):
    paths, uuid, g, model, rng = _filled(tmp_path / "a", level, seed=41)
    bad_rows = {3, 7}
    for row in bad_rows:
        slots = g.column_slots(0, row)
        for c in range(g.tolerance + 1):
            _corrupt_chunk(paths[slots[c]], g, row, rng)
    vol = open_vol(paths, uuid)
    failed = set()
    for stripe in range(g.stripes):
        group, row = g.locate(stripe)
        off = stripe * g.stripe_bytes
        try:
            got = vol.read(off, g.stripe_bytes)
        except UnrecoverableError:
            failed.add((group, row))
            continue
        assert got == model.get(off, g.stripe_bytes), f"wrong bytes in stripe {stripe}"
    assert failed == {(0, r) for r in bad_rows}
    report = scrub(vol, repair=True)
    assert report.unrecoverable == len(bad_rows) * (g.tolerance + 1)
    vol.close()


def test_scrub_finds_parity_that_verifies_but_does_not_match(tmp_path):
    """A parity chunk whose checksum was recorded for wrong contents (a bad write path)."""
    paths, uuid, g, model, rng = _filled(tmp_path / "a", "raid6", seed=45)
    row = 6
    slots = g.column_slots(0, row)
    p_slot = slots[g.k]  # P of the row
    vol = open_vol(paths, uuid)
    with open(paths[p_slot], "r+b") as f:
        f.seek(g.chunk_offset(row))
        wrong = bytearray(f.read(g.chunk))
        wrong[123] ^= 0x5A
        f.seek(g.chunk_offset(row))
        f.write(wrong)
    vol.table.set(p_slot, row, chunk_checksum(bytes(wrong), p_slot, row))
    vol.flush()
    report = scrub(vol)
    assert report.members[p_slot].parity_mismatches == 1
    assert report.errors == 1
    assert report.problems == [
        {"slot": p_slot, "row": row, "kind": "parity mismatch", "fixed": False}
    ]
    report = scrub(vol, repair=True)
    assert report.members[p_slot].fixed == 1
    assert scrub(vol).clean
    vol.close()
    for s in slots[:2]:  # now P (and Q) have to rebuild two data columns of the row
        remove_member(paths[s])
    vol = open_vol(paths, uuid)
    assert_reads(vol, model)
    vol.close()


# --- (b) corrupt checksum-table copies ----------------------------------------------------------


def test_corrupt_table_page_copy_is_found_and_mended(tmp_path):
    paths, uuid, g, model, rng = _filled(tmp_path / "a", "raid6", rows=200, seed=51)
    assert g.table_pages >= 3
    # Page 1 on slot 0 (the copy reads try first) and page 2 on slot 3.
    damaged = {0: 1, 3: 2}
    for slot, page in damaged.items():
        for pos in rng.sample(range(TABLE_PAGE), 3):
            _flip(paths[slot], page_offset(page) + pos, rng)
    vol = open_vol(paths, uuid)
    assert_reads(vol, model)
    members = vol.status()["members"]
    assert members[0]["checksum_errors"] >= 1  # its copy of page 1 failed; another was used
    assert all(m["checksum_errors"] == 0 for m in members[1:])
    for _ in range(2):  # without repair: reported, not mended
        report = scrub(vol, repair=False)
        for s in range(g.members):
            assert report.members[s].table_errors == (1 if s in damaged else 0)
            assert report.members[s].checksum_errors == 0
        kinds = {(p["slot"], p["kind"]) for p in report.problems}
        assert kinds == {(s, f"checksum-table page {p}") for s, p in damaged.items()}
    report = scrub(vol, repair=True)
    assert report.fixed == 2 and report.errors == 2
    assert scrub(vol).clean
    vol.close()
    copies = set()
    for path in paths:
        with open(path, "rb") as f:
            f.seek(page_offset(0))
            copies.add(f.read(g.table_pages * TABLE_PAGE))
    assert len(copies) == 1  # every member holds the same table again
    # With another member lost, the mended copies serve.
    remove_member(paths[1])
    vol = open_vol(paths, uuid)
    kept = [m["checksum_errors"] for m in vol.status()["members"]]
    assert kept[0] >= 1 and kept[1:] == [0] * (g.members - 1)  # counts kept in the labels
    assert_reads(vol, model)
    assert [m["checksum_errors"] for m in vol.status()["members"]] == kept  # none new
    vol.close()


def test_table_page_corrupt_with_a_member_missing(tmp_path):
    paths, uuid, g, model, rng = _filled(tmp_path / "a", "raid5", rows=200, seed=52)
    for page in range(g.table_pages):
        _flip(paths[0], page_offset(page) + rng.randrange(TABLE_PAGE), rng)
    remove_member(paths[2])
    vol = open_vol(paths, uuid)
    assert vol.state() == "degraded"
    assert_reads(vol, model)
    report = scrub(vol, repair=True)
    assert report.members[0].table_errors == g.table_pages
    assert scrub(vol).clean
    vol.close()


def test_table_page_corrupt_everywhere_raises(tmp_path):
    paths, uuid, g, model, rng = _filled(tmp_path / "a", "raid5", rows=200, seed=53)
    for path in paths:
        _flip(path, page_offset(0) + rng.randrange(TABLE_PAGE), rng)
    vol = open_vol(paths, uuid)
    with pytest.raises(UnrecoverableError):
        vol.read(0, 10)  # row 0's entries live on page 0
    last_row_off = (g.stripes - 1) * g.stripe_bytes  # a later page still reads
    assert vol.read(last_row_off, g.stripe_bytes) == model.get(last_row_off, g.stripe_bytes)
    vol.close()


# --- (c) labels: foreign, swapped and stale members ---------------------------------------------


def _member_states(vol):
    return [m["state"] for m in vol.status()["members"]]


def test_foreign_members_are_refused_and_named(tmp_path, caplog):
    paths, uuid, g, model, rng = _filled(tmp_path / "a", "raid5", seed=61)
    other_paths, other_uuid, _ = build(tmp_path / "b", "raid5", 4, CHUNK, 24)
    shutil.copyfile(other_paths[1], paths[1])  # slot 1 now holds a member of another array
    vol = open_vol(paths, uuid)
    assert vol.state() == "degraded"
    assert _member_states(vol) == ["active", "foreign", "active", "active"]
    reason = vol.status()["members"][1]["reason"]
    assert paths[1] in reason and other_uuid in reason
    assert paths[1] in caplog.text
    assert_reads(vol, model)
    vol.close()
    # A second unusable member (not a dwfs member at all) is one too many.
    with open(paths[3], "r+b") as f:
        f.write(os.urandom(8192))
    with pytest.raises(AssemblyError) as ei:
        open_vol(paths, uuid)
    assert paths[1] in str(ei.value) and paths[3] in str(ei.value)


def test_members_listed_in_another_order_go_to_the_slots_their_labels_name(tmp_path):
    # Disks whose device names changed at boot, or member files listed in another order:
    # each member carries its slot in its label, as an md superblock carries its role.
    paths, uuid, g, model, rng = _filled(tmp_path / "a", "raid6", seed=62)
    swapped = list(paths)
    swapped[1], swapped[4] = swapped[4], swapped[1]
    vol = open_vol(swapped, uuid)
    assert vol.state() == "clean"
    assert [m["path"] for m in vol.status()["members"]] == paths
    assert vol.assembly_notes == [f"slot 1: member found at {paths[1]}, listed as {paths[4]}",
                                  f"slot 4: member found at {paths[4]}, listed as {paths[1]}"]
    assert_reads(vol, model)
    apply(vol, model, boundary_writes(rng, g, 8))  # writes land on the right members
    vol.close()
    vol = open_vol(paths, uuid)  # and the listing in slot order still assembles clean
    assert vol.state() == "clean" and vol.assembly_notes == []
    assert_reads(vol, model)
    assert scrub(vol).clean
    vol.close()

    # raid5 tolerates one missing member: two swapped used to be refused past it.
    paths5, uuid5, g5, model5, _ = _filled(tmp_path / "b", "raid5", seed=63)
    vol = open_vol([paths5[3], paths5[2], paths5[1], paths5[0]], uuid5)
    assert vol.state() == "clean"
    assert_reads(vol, model5)
    vol.close()


def _outdated_image(tmp_path, seed: int):
    """A filled raidz2 array, and an image of its slot 1 taken before more writes:
    (paths, uuid, model, image)."""
    paths, uuid, g, model, rng = _filled(tmp_path / "a", "raidz2", seed=seed)
    image = str(tmp_path / "image-of-m1")
    shutil.copyfile(paths[1], image)
    vol = open_vol(paths, uuid)
    apply(vol, model, boundary_writes(rng, g, 12))
    vol.close()
    return paths, uuid, model, image


def test_an_older_copy_of_a_member_is_refused_where_the_member_itself_is_listed(tmp_path):
    paths, uuid, model, image = _outdated_image(tmp_path, 66)
    # The old image is listed in slot 3's place, before the member it copies.
    listed = [paths[0], image, paths[2], paths[1], paths[4]]
    vol = open_vol(listed, uuid)
    members = vol.status()["members"]
    assert [m["state"] for m in members] == ["active", "active", "active", "missing",
                                             "active"]
    assert members[1]["path"] == paths[1]
    assert members[3]["path"] == listed[3]
    assert "no member carries slot 3" in members[3]["reason"]
    assert_reads(vol, model)  # nothing of the old image is served
    vol.close()

    # Equal copies (a disk cloned with dd): the one listed in the slot's own place is used.
    clone = str(tmp_path / "clone-of-m2")
    shutil.copyfile(paths[2], clone)
    vol = open_vol([paths[0], paths[1], paths[2], clone, paths[4]], uuid)
    members = vol.status()["members"]
    assert members[2]["path"] == paths[2] and members[3]["state"] == "missing"
    assert_reads(vol, model)
    vol.close()


def test_members_not_where_listed_are_found_by_searching(tmp_path):
    paths, uuid, g, model, rng = _filled(tmp_path / "a", "raidz2", seed=67)
    moved = str(tmp_path / "elsewhere" / "renamed-2")
    os.makedirs(os.path.dirname(moved))
    os.rename(paths[2], moved)
    junk = str(tmp_path / "junk")
    with open(junk, "wb") as f:
        f.write(os.urandom(8192))
    other, other_uuid, _ = build(tmp_path / "other", "raid5", 3, CHUNK, 8)
    searched = []

    def search():
        searched.append(True)
        return [junk, str(tmp_path / "absent"), other[2], paths[0], moved]

    vol = open_vol(paths, uuid, search=search)
    assert searched and vol.state() == "clean"
    assert vol.status()["members"][2]["path"] == moved
    assert vol.assembly_notes == [f"slot 2: member found at {moved}, listed as {paths[2]}"]
    assert_reads(vol, model)
    vol.close()

    # Nothing is searched for when every slot is where it is listed.
    searched.clear()
    os.rename(moved, paths[2])
    vol = open_vol(paths, uuid, search=search)
    assert not searched and vol.state() == "clean"
    vol.close()


@pytest.mark.parametrize("how", ["deleted", "io_error"])
def test_stale_member_is_refused_and_named(tmp_path, caplog, how):
    paths, uuid, g, model, rng = _filled(tmp_path / "a", "raid5", seed=64)
    vol = open_vol(paths, uuid)
    old_copy = str(tmp_path / "old-m2.img")
    shutil.copyfile(paths[2], old_copy)
    if how == "deleted":
        os.unlink(paths[2])
        vol.check_members()
    else:
        os.truncate(paths[2], g.data_offset)  # every data read now comes up short
        assert_reads(vol, model)  # the read that meets the I/O error still answers
        assert "read failed" in vol.status()["members"][2]["reason"]
    assert vol.status()["members"][2]["state"] == "faulty"
    assert vol.state() == "degraded"
    apply(vol, model, boundary_writes(rng, g, 12))  # keep writing without it
    vol.close()
    if os.path.exists(paths[2]):
        os.unlink(paths[2])
    shutil.copyfile(old_copy, paths[2])  # the old member comes back

    caplog.clear()
    vol = open_vol(paths, uuid)
    assert vol.state() == "degraded"
    assert _member_states(vol) == ["active", "active", "stale", "active"]
    assert paths[2] in vol.status()["members"][2]["reason"]
    assert any(paths[2] in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    assert_reads(vol, model)  # the old member's outdated chunks are not used
    vol.close()

    # A stale member and a foreign one: too many refused, and both are named.
    with open(paths[0], "r+b") as f:
        f.write(b"\0" * 4096)  # wipe slot 0's label
    with pytest.raises(AssemblyError) as ei:
        open_vol(paths, uuid)
    assert paths[0] in str(ei.value) and paths[2] in str(ei.value)


def test_old_image_of_a_member_is_refused(tmp_path):
    paths, uuid, model, image = _outdated_image(tmp_path, 65)
    shutil.copyfile(image, paths[1])
    vol = open_vol(paths, uuid)
    assert _member_states(vol)[1] == "stale"
    assert paths[1] in vol.status()["members"][1]["reason"]
    assert_reads(vol, model)
    vol.close()


def test_image_one_label_update_behind_never_serves_old_bytes(tmp_path):
    """An old image of a member whose label is only one update behind (the array crashed in
    the session after the image was taken) passes the events check; its outdated table copy
    must not vouch for its outdated chunks."""
    paths, uuid, g, model, rng = _filled(tmp_path / "a", "raid5", seed=66)
    image = str(tmp_path / "image")
    shutil.copyfile(paths[0], image)
    vol = open_vol(paths, uuid)
    apply(vol, model, [(0, rng.randbytes(g.capacity))], check=False)
    vol.flush()
    close_members(vol)  # the process dies; labels stay one update ahead of the image
    shutil.copyfile(image, paths[0])

    vol = open_vol(paths, uuid, resync=False)  # read-only: nothing rewritten first
    assert_reads(vol, model)
    close_members(vol)
    shutil.copyfile(image, paths[0])
    vol = open_vol(paths, uuid)
    assert_reads(vol, model)
    report = scrub(vol, repair=True)
    assert report.unrecoverable == 0
    assert scrub(vol).clean
    vol.close()
    remove_member(paths[1])  # slot 0 now has to carry its share
    vol = open_vol(paths, uuid)
    assert_reads(vol, model)
    vol.close()


# --- (d) rebuild --------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["raid5", "raid6", "raid10", "raidz3"])
def test_rebuild_onto_replacement(tmp_path, level):
    paths, uuid, g, model, rng = _filled(tmp_path / "a", level, rows=80, seed=71)
    slot = 1
    size = os.path.getsize(paths[0])
    remove_member(paths[slot])
    vol = open_vol(paths, uuid)
    assert vol.state() == "degraded"
    new = str(tmp_path / "replacement.img")
    attach_replacement(vol, slot, BlockFileMember.create(new, size), new)
    status = vol.status()
    assert status["state"] == "rebuilding"
    assert status["members"][slot]["state"] == "rebuilding"
    assert status["members"][slot]["rebuilt_bytes"] == 0
    paths[slot] = new
    seen = []

    def progress(done, total):
        seen.append(done)
        if len(seen) == 2:  # an online write while the rebuild is part way
            apply(vol, model, [(0, rng.randbytes(g.capacity // 2 + 17))])

    rebuild(vol, slot, progress)
    assert seen[-1] == g.rows * g.chunk and len(seen) > 2
    assert seen == sorted(seen)
    assert vol.state() == "clean"
    assert vol.status()["members"][slot]["rebuilt_bytes"] is None
    assert_reads(vol, model)
    assert scrub(vol).clean
    vol.close()
    # The rebuilt member carries real data: lose the others the array can spare.
    lost = next(ls for ls in max_loss_sets(g) if slot not in ls and slot // g.group_size in
                {s // g.group_size for s in ls})
    for s in lost:
        remove_member(paths[s])
    vol = open_vol(paths, uuid)
    assert vol.status()["members"][slot]["state"] == "active"
    assert_reads(vol, model)
    vol.close()


REBUILD_CHILD = r"""
import os, sys
import raid.rebuild as rb
from backends import open_member
from raid.assemble import assemble

paths, uuid = sys.argv[1].split("|"), sys.argv[2]
slot, progress_path = int(sys.argv[3]), sys.argv[4]
rb.CHECKPOINT_SECONDS = 0.0  # write the label checkpoint after every batch of rows
fd = os.open(progress_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

def progress(done, total):
    os.write(fd, f"{done} {total}\n".encode())
    import time
    time.sleep(0.03)  # keep the rebuild going long enough to be killed part way

vol = assemble(paths, uuid, open_member)
assert vol.slots[slot].state == "rebuilding", vol.slots[slot]
rb.rebuild(vol, slot, progress)
os.write(fd, b"finished\n")
"""


def _child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _last_progress(path):
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    if not lines:
        return None
    return lines[-1]


@pytest.mark.timeout(300)
def test_rebuild_resumes_after_kill(tmp_path):
    chunk = 64 * 1024
    level, n = "raid5", 4
    size = 32 * 1024 * 1024
    rows = (size - 64 * 1024) // chunk
    paths, uuid, g = build(tmp_path / "a", level, n, chunk, rows)
    assert g.rows >= 400
    model = Model(g.capacity)
    vol = open_vol(paths, uuid)
    apply(vol, model, [(0, rand_bytes(81, g.capacity))], check=False)
    vol.close()
    slot = 2
    remove_member(paths[slot])
    vol = open_vol(paths, uuid)
    new = str(tmp_path / "replacement.img")
    attach_replacement(vol, slot, BlockFileMember.create(new, os.path.getsize(paths[0])), new)
    paths[slot] = new
    vol.close()

    progress_path = str(tmp_path / "progress")
    total = g.rows * g.chunk
    child = subprocess.Popen(
        [sys.executable, "-c", REBUILD_CHILD, "|".join(paths), uuid, str(slot), progress_path],
        cwd=REPO, env=_child_env(),
    )
    killed_at = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = _last_progress(progress_path)
            if line == "finished" or child.poll() is not None:
                break
            if line and int(line.split()[0]) >= total // 4:
                killed_at = int(line.split()[0])
                os.kill(child.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if child.poll() is None and killed_at is None:
            child.kill()
        child.wait(30)
    assert killed_at is not None, f"the rebuild child ended first: {child.returncode}"
    assert child.returncode == -signal.SIGKILL

    vol = open_vol(paths, uuid)
    member = vol.status()["members"][slot]
    assert member["state"] == "rebuilding"
    assert vol.slots[slot].rebuilt_rows > 0
    assert killed_at <= member["rebuilt_bytes"] < total
    resumed_from = member["rebuilt_bytes"]
    assert_reads(vol, model)  # rows below the checkpoint come from the new member
    seen = []
    rebuild(vol, slot, lambda done, tot: seen.append(done))
    step = raid.rebuild.ROWS_PER_LOCK * g.chunk
    assert resumed_from < seen[0] <= resumed_from + step  # it did not start over
    assert len(seen) <= (total - resumed_from) // step + 1
    assert seen[-1] == total
    assert vol.state() == "clean"
    assert_reads(vol, model)
    assert scrub(vol).clean
    vol.close()
    remove_member(paths[0])  # the rebuilt member now has to carry its share
    vol = open_vol(paths, uuid)
    assert vol.state() == "degraded"
    assert_reads(vol, model)
    vol.close()


# --- (e) crash in the middle of stripe writes -----------------------------------------------------

WRITER_CHILD = r"""
import json, os, sys
import numpy as np
from backends import open_member
from raid.assemble import assemble

cfg = json.load(open(sys.argv[1]))
start = int(sys.argv[2])
vol = assemble(cfg["paths"], cfg["uuid"], open_member)
log = os.open(cfg["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
pending = []
for i in range(start, len(cfg["plan"])):
    off, length, seed = cfg["plan"][i]
    vol.write(off, np.random.default_rng(seed).bytes(length))
    pending.append(i)
    if len(pending) == cfg["flush_every"]:
        vol.flush()
        os.write(log, (" ".join(map(str, pending)) + "\n").encode())
        os.fsync(log)
        pending = []
os.write(log, b"finished\n")
"""


def _extent_plan(g, rng):
    """Disjoint extents covering the volume, of up to three stripes, in random order."""
    plan, off = [], 0
    while off < g.capacity:
        length = min(rng.randint(1, 3 * g.stripe_bytes), g.capacity - off)
        plan.append([off, length, rng.randrange(2**32)])
        off += length
    rng.shuffle(plan)
    return plan


def _flushed(log_path):
    done = set()
    with open(log_path) as f:
        for line in f.read().splitlines():
            if line and line != "finished":
                done.update(int(x) for x in line.split())
    return done


def _check_extents(vol, plan, flushed):
    """Flushed extents read back exactly; others are, byte by byte, old (zero) or new."""
    whole = np.frombuffer(vol.read(0, vol.capacity), dtype=np.uint8)
    for i, (off, length, seed) in enumerate(plan):
        got = whole[off : off + length]
        new = np.frombuffer(rand_bytes(seed, length), dtype=np.uint8)
        if i in flushed:
            assert np.array_equal(got, new), f"flushed extent {i} ({off}+{length}) damaged"
        else:
            assert np.all((got == new) | (got == 0)), f"extent {i} holds foreign bytes"


def _count_lines(path):
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return len(f.read().splitlines())


def _run_writer_and_kill(cfg_path, start, log_path, rng):
    target = _count_lines(log_path) + rng.randint(3, 8)
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER_CHILD, cfg_path, str(start)], cwd=REPO, env=_child_env()
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            if _count_lines(log_path) >= target:
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.02))  # land somewhere inside the next batch of writes
        assert child.poll() is None, f"the writer ended before the kill: {child.returncode}"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(30)
    assert child.returncode == -signal.SIGKILL


@pytest.mark.timeout(300)
@pytest.mark.parametrize("level", ["raid5", "raid6", "raid10", "raidz2"])
def test_crash_mid_write_leaves_flushed_data_and_parity_intact(tmp_path, level, caplog):
    n = LEVEL_MEMBERS[level]
    paths, uuid, g = build(tmp_path / "a", level, n, CHUNK, rows=512)
    rng = random.Random(level)
    plan = _extent_plan(g, rng)
    log_path = str(tmp_path / "flushed.log")
    cfg_path = str(tmp_path / "cfg.json")
    with open(cfg_path, "w") as f:
        json.dump({"paths": paths, "uuid": uuid, "plan": plan, "log": log_path,
                   "flush_every": 6}, f)
    start = 0
    for _cycle in range(2):
        _run_writer_and_kill(cfg_path, start, log_path, rng)
        flushed = _flushed(log_path)
        assert flushed, "nothing was flushed before the kill"
        # The kill left the array unclean; the next assembly resyncs the write-intent regions.
        for path in paths:
            m = BlockFileMember.open(path)
            assert not read_label(m).clean
            m.close()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="raid"):
            vol = open_vol(paths, uuid)
        assert vol.state() == "clean"
        # Torn writes are not damage: no member is blamed, and the resync says what it did in
        # one summary instead of a line per chunk.
        assert [m["checksum_errors"] for m in vol.status()["members"]] == [0] * n
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        if warnings:  # (none when the kill fell where no write-intent bit was set)
            assert len(warnings) == 2, warnings
            assert "not shut down cleanly" in warnings[0] and "resync of" in warnings[1]
        report = scrub(vol)
        assert report.clean, report.to_dict()
        _check_extents(vol, plan, flushed)
        vol.close()
        start = max(flushed) + 1
    # The write hole: with any member gone, flushed data must come back from parity.
    snap = tmp_path / "snap"
    snapshot(paths, snap)
    for lost in max_loss_sets(g)[: g.members]:
        restore(paths, snap)
        for s in lost:
            remove_member(paths[s])
        vol = open_vol(paths, uuid, resync=False)
        assert vol.state() == "degraded"
        _check_extents(vol, plan, flushed)
        close_members(vol)


RESYNC_KILLER_CHILD = r"""
import os, signal, sys
import raid.assemble as A
from backends import open_member

paths, uuid, last_row = sys.argv[1].split("|"), sys.argv[2], int(sys.argv[3])
resync_row = A.resync_row

def resync_then_die(volume, group, row):
    found = resync_row(volume, group, row)
    if row == last_row:  # the first marked region is done: the power fails again
        os.kill(os.getpid(), signal.SIGKILL)
    return found

A.resync_row = resync_then_die
A.assemble(paths, uuid, open_member)
"""


@pytest.mark.timeout(300)
def test_crash_during_resync_keeps_the_other_regions_marked(tmp_path):
    chunk = 4096
    paths, uuid, g = build(tmp_path / "a", "raid5", 4, chunk, rows=2 * 4096 + 8)
    rpb = g.rows_per_intent_bit
    assert g.rows > rpb  # at least two write-intent regions
    rng = random.Random(12)
    model = Model(g.capacity)
    offsets = [10 * g.stripe_bytes, (rpb + 10) * g.stripe_bytes]  # one per region
    span = 2 * g.stripe_bytes  # whole stripes: written through to the members at once
    vol = open_vol(paths, uuid)
    apply(vol, model, [(off, rng.randbytes(span)) for off in offsets])
    vol.flush()
    before = Model(g.capacity)
    before.data[:] = model.data
    # Rewrite both regions and die before the flush: data and parity differ from the table.
    apply(vol, model, [(off, rng.randbytes(span)) for off in offsets])
    close_members(vol)
    child = subprocess.run(
        [sys.executable, "-c", RESYNC_KILLER_CHILD, "|".join(paths), uuid, str(rpb - 1)],
        cwd=REPO, env=_child_env(), timeout=120,
    )
    assert child.returncode == -signal.SIGKILL  # died during the resync, after region 0

    vol = open_vol(paths, uuid)  # must resync what the interrupted resync had not reached
    report = scrub(vol)
    assert report.clean, report.to_dict()
    for off in offsets:  # unflushed writes read back old or new, byte by byte
        got = np.frombuffer(vol.read(off, span), dtype=np.uint8)
        new = np.frombuffer(model.get(off, span), dtype=np.uint8)
        old = np.frombuffer(before.get(off, span), dtype=np.uint8)
        assert np.all((got == new) | (got == old))
    vol.close()


def test_crash_between_table_copies_is_resynced(tmp_path):
    """A kill while a flush had written the checksum table to some members only."""
    paths, uuid, g = build(tmp_path / "a", "raid5", 4, CHUNK, rows=64)
    assert g.table_pages == 1 and g.rows <= g.rows_per_intent_bit  # one page, one region
    rng = random.Random(9)
    model = Model(g.capacity)
    vol = open_vol(paths, uuid)
    apply(vol, model, boundary_writes(rng, g, 10))
    vol.flush()
    old_pages = {}
    for i, path in enumerate(paths):
        with open(path, "rb") as f:
            f.seek(page_offset(0))
            old_pages[i] = f.read(TABLE_PAGE)
    # Writes next to the flushed data, sharing its stripes and chunks, then a flush that
    # (as far as the members will show) reached slot 0's table copy only.
    for off in range(g.chunk // 2, g.capacity - g.stripe_bytes, 3 * g.stripe_bytes):
        apply(vol, model, [(off, rng.randbytes(g.chunk))], check=False)
    vol.flush()
    with open(paths[0], "rb") as f:
        f.seek(page_offset(0))
        assert f.read(TABLE_PAGE) != old_pages[0]
    # The process died in that flush: the other members keep the older (valid) copy of the
    # page, and the write-intent bit of the region is still set everywhere.
    marked = bytes([1]) + bytes(BITMAP_SIZE - 1)
    for i, path in enumerate(paths):
        with open(path, "r+b") as f:
            if i:
                f.seek(page_offset(0))
                f.write(old_pages[i])
            f.seek(BITMAP_OFFSET)
            f.write(marked)
    close_members(vol)

    vol = open_vol(paths, uuid)
    report = scrub(vol)
    assert report.clean, report.to_dict()
    assert_reads(vol, model)  # the table that slot 0 had matches the data on disk
    vol.close()
    for lost in range(g.members):
        snap = tmp_path / f"snap{lost}"
        snapshot(paths, snap)
        remove_member(paths[lost])
        vol = open_vol(paths, uuid, resync=False)
        assert_reads(vol, model)
        close_members(vol)
        restore(paths, snap)


def _four_stripes(tmp_path, chunk: int):
    """A raidz2 volume of five members whose first four stripes hold random bytes, flushed:
    (paths, uuid, geometry, the bytes, the open volume)."""
    paths, uuid, g = build(tmp_path / "a", "raidz2", 5, chunk, rows=16)
    data = rand_bytes(1, g.stripe_bytes * 4)
    vol = open_vol(paths, uuid)
    vol.write(0, data)
    vol.flush()
    return paths, uuid, g, data, vol


def test_torn_write_while_degraded_keeps_the_data_beside_it(tmp_path):
    """A pulled plug while degraded: a partial-stripe write tore its chunk and a parity chunk,
    so the missing member's chunk of that row cannot be reconstructed any more. The resync
    keeps the torn chunk's bytes: data in use beside the write in that chunk stays readable;
    the lost chunk raises, never wrong bytes; the other rows are untouched; the stripe can be
    written again and a rebuild onto a new member finishes."""
    chunk = 16384
    paths, uuid, g, old, vol = _four_stripes(tmp_path, chunk)
    group, row = g.locate(1)
    slots = g.column_slots(group, row)
    stripe = g.stripe_bytes
    half = chunk // 2
    # The new bytes go into the second half of data column 1 of stripe 1; its first half is
    # data in use. The row reaches the members, and the plug goes before the flush.
    vol.write(stripe + chunk + half, rand_bytes(2, half))
    vol._commit_all()
    close_members(vol)

    def region(slot: int, lo: int, hi: int):
        return paths[slot], g.chunk_offset(row) + lo, hi - lo

    def put(path: str, at: int, data: bytes) -> None:
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(data)

    # Tear (old bytes written back where the new ones did not land): column 1's new half
    # landed in its first 4 KiB only, parity P in its last 4 KiB only, Q not at all; then the
    # member holding data column 2 is lost.
    old_row = np.frombuffer(old[stripe : 2 * stripe], dtype=np.uint8).reshape(g.k, chunk)
    old_parity = g.codec.encode(old_row)
    path, at, _ = region(slots[1], half + 4096, chunk)
    put(path, at, old_row[1][half + 4096 :].tobytes())
    path, at, _ = region(slots[g.k], half, half + 4096)
    put(path, at, old_parity[0][half : half + 4096].tobytes())
    path, at, _ = region(slots[g.k + 1], 0, chunk)
    put(path, at, old_parity[1].tobytes())
    remove_member(paths[slots[2]])

    vol = open_vol(paths, uuid)
    assert vol.state() == "degraded"
    # In use beside the write: untouched, readable (column 0, and column 1's first half).
    assert bytes(vol.read(stripe, chunk + half)) == old[stripe : stripe + chunk + half]
    with pytest.raises(UnrecoverableError):
        vol.read(stripe + 2 * chunk, chunk)  # only parity held it, and the plug tore parity
    for s in (0, 2, 3):
        assert bytes(vol.read(s * stripe, stripe)) == old[s * stripe : (s + 1) * stripe]
    # The stripe stays writable (its new parity counts the lost chunk as zeros).
    fresh = rand_bytes(3, half)
    vol.write(stripe + chunk + half, fresh)
    vol.flush()
    assert bytes(vol.read(stripe + chunk + half, half)) == fresh
    # A rebuild goes past the lost chunk, which stays unreadable; the rest comes back.
    size = os.path.getsize(paths[slots[0]])
    new = str(tmp_path / "replacement.img")
    attach_replacement(vol, slots[2], BlockFileMember.create(new, size), new)
    rebuild(vol, slots[2])
    assert vol.state() == "clean"
    with pytest.raises(UnrecoverableError):
        vol.read(stripe + 2 * chunk, chunk)
    assert bytes(vol.read(stripe, chunk + half)) == old[stripe : stripe + chunk + half]
    for s in (0, 2, 3):
        assert bytes(vol.read(s * stripe, stripe)) == old[s * stripe : (s + 1) * stripe]
    again = rand_bytes(4, half)  # and the stripe stays writable with every member there
    vol.write(stripe + chunk + half, again)
    vol.flush()
    assert bytes(vol.read(stripe + chunk + half, half)) == again
    vol.close()


class _Space:
    """A stand-in for the filesystem's free space: volume bytes [lo, hi) hold nothing."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lock = threading.Lock()
        self.lo, self.hi = lo, hi
        self.asked: list[tuple[int, int]] = []

    def unused(self, offset: int, length: int) -> bool:
        self.asked.append((offset, length))
        return self.lo <= offset and offset + length <= self.hi


def test_scrub_rewrites_lost_chunks_only_where_nothing_lives(tmp_path):
    """A row a degraded crash left unrecoverable: scrub --repair reports its lost chunk while
    the space above says data lives there, and writes it as zeros with new parity once the
    space says nothing does; a second scrub is clean and every other byte is unchanged."""
    chunk = 16384
    paths, uuid, g, data, vol = _four_stripes(tmp_path, chunk)
    group, row = g.locate(1)
    slots = g.column_slots(group, row)
    vol.close()
    # Data column 2 of stripe 1 is lost beyond tolerance: its own chunk and both parities rot.
    rng = random.Random(5)
    for c in (2, g.k, g.k + 1):
        _corrupt_chunk(paths[slots[c]], g, row, rng)
    lost = (g.stripe_bytes + 2 * chunk, g.stripe_bytes + 3 * chunk)
    vol = open_vol(paths, uuid)
    with pytest.raises(UnrecoverableError):
        vol.read(lost[0], chunk)

    in_use = _Space(0, lost[0])  # the lost chunk is in use: nothing may be rewritten
    report = scrub(vol, repair=True, space=in_use)
    assert report.unrecoverable >= 1 and report.members[slots[2]].unrecoverable == 1
    assert (lost[0], chunk) in in_use.asked
    with pytest.raises(UnrecoverableError):
        vol.read(lost[0], chunk)

    free = _Space(*lost)
    report = scrub(vol, repair=True, space=free)
    assert report.unrecoverable == 0
    assert report.members[slots[2]].fixed == 1
    assert any(p["row"] == row and p["fixed"] for p in report.problems)
    assert bytes(vol.read(lost[0], chunk)) == bytes(chunk)
    again = scrub(vol, repair=False)
    assert again.clean, again.to_dict()
    expect = data[: lost[0]] + bytes(chunk) + data[lost[1] :]
    assert bytes(vol.read(0, len(data))) == expect
    vol.close()
    vol = open_vol(paths, uuid)  # and it stays so after reassembly
    assert scrub(vol, repair=False).clean
    assert bytes(vol.read(0, len(data))) == expect
    vol.close()


def test_error_counts_ride_in_the_labels_and_older_labels_have_none(tmp_path):
    """A member's error counts are written into every label and read back at the next open;
    a label written before the counts existed (no such keys) reads as zero counts."""
    paths, uuid, g, model, rng = _filled(tmp_path / "a", "raid6", rows=64, seed=53)
    vol = open_vol(paths, uuid)
    vol.slots[2].checksum_errors, vol.slots[2].repaired = 7, 5
    vol.slots[0].read_errors = 3
    vol.close()
    member = BlockFileMember.open(paths[1])
    try:
        label = read_label(member)
    finally:
        member.close()
    want = [(0, 0, 0)] * g.members
    want[0], want[2] = (3, 0, 0), (0, 7, 5)
    assert [(r.read_errors, r.checksum_errors, r.repaired) for r in label.slots] == want
    body = label.slots[2].to_dict()
    assert body == {"state": "active", "rebuilt_rows": 0, "checksum_errors": 7, "repaired": 5}
    assert Label.from_bytes(label.to_bytes()) == label
    vol = open_vol(paths, uuid)
    counts = [(m["read_errors"], m["checksum_errors"], m["repaired"])
              for m in vol.status()["members"]]
    assert counts[0] == (3, 0, 0) and counts[2] == (0, 7, 5)
    vol.clear_error_counts()
    assert all(m["checksum_errors"] == m["read_errors"] == m["repaired"] == 0
               for m in vol.status()["members"])
    vol.close()
    vol = open_vol(paths, uuid)
    assert all(m["checksum_errors"] == 0 for m in vol.status()["members"])
    vol.close()
    bare = {"state": "active", "rebuilt_rows": 0}  # a label body of an earlier version
    assert SlotRecord.from_dict(bare) == SlotRecord()
