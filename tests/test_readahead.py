"""Sequential read-ahead of a volume (raid/readahead.py) on real member files: what it serves
must always be what the volume holds, after writes, corruption, lost members and closing."""

from __future__ import annotations

import logging
import os
import random
import threading

import pytest
from volhelpers import Model, build, open_vol, rand_bytes, remove_member

import raid.readahead
from backends import BlockFileMember
from raid.checksums import UNWRITTEN

CHUNK = 4096
ROWS = 96


@pytest.fixture(autouse=True)
def small_spans(monkeypatch):
    # Spans of a few stripes, so that a small volume holds many of them.
    monkeypatch.setattr(raid.readahead, "SPAN_BYTES", 8 * CHUNK * 4)
    monkeypatch.setattr(raid.readahead, "HINT_BYTES", 16 * CHUNK)
    monkeypatch.setattr(raid.readahead, "STREAK_BYTES", 2 * CHUNK)
    monkeypatch.setattr(raid.readahead, "STREAK_SLACK", CHUNK)


def _filled(tmp_path, level="raid6", members=6, seed=1, backend="file"):
    paths, uuid, g = build(tmp_path / "a", level, members, CHUNK, ROWS, backend)
    vol = open_vol(paths, uuid)
    model = Model(vol.capacity)
    data = rand_bytes(seed, vol.capacity)
    vol.write(0, data)
    model.write(0, data)
    vol.flush()
    return paths, uuid, vol, model


def _read_sequentially(vol, size: int) -> bytes:
    out = bytearray()
    pos = 0
    while pos < vol.capacity:
        n = min(size, vol.capacity - pos)
        out += vol.read(pos, n)
        pos += n
    return bytes(out)


def _start_streak(vol) -> None:
    """Read back to back from the start, so that the volume plans spans ahead."""
    vol.read(0, CHUNK)
    vol.read(CHUNK, CHUNK)


def test_a_sequential_reader_is_served_from_spans_read_ahead(tmp_path, caplog):
    paths, uuid, vol, model = _filled(tmp_path)
    caplog.set_level(logging.DEBUG, logger="raid.readahead")
    try:
        ahead = vol._ahead
        pos = 0
        size = 3 * CHUNK
        served = 0
        while pos < vol.capacity:
            n = min(size, vol.capacity - pos)
            if ahead.covers(pos) and ahead.covers(pos + n - 1):
                served += 1
            assert vol.read(pos, n) == model.get(pos, n), f"read at {pos}"
            pos += n
        # All but the start (read before any span was planned) came from spans, and every
        # span read cleanly (a failed one would leave its reads to the ordinary path).
        assert served > (vol.capacity // size) // 2
        assert not [r.getMessage() for r in caplog.records if "read-ahead" in r.getMessage()]
    finally:
        vol.close()


@pytest.mark.parametrize("size", [CHUNK, 7000, 64 * 1024 + 5])
def test_reads_of_any_size_across_span_boundaries_match(tmp_path, size):
    paths, uuid, vol, model = _filled(tmp_path, seed=size)
    try:
        assert _read_sequentially(vol, size) == bytes(model.data)
    finally:
        vol.close()


def test_sqlite_members_are_read_ahead_through_their_own_reads(tmp_path, caplog):
    # No direct I/O there: spans read through readinto_many, from several threads at once.
    paths, uuid, vol, model = _filled(tmp_path, level="raidz1", members=4, backend="sqlite")
    try:
        with caplog.at_level(logging.DEBUG, logger="raid.readahead"):
            assert _read_sequentially(vol, 3 * CHUNK) == bytes(model.data)
            assert _read_sequentially(vol, 5 * CHUNK) == bytes(model.data)
        assert not [r.getMessage() for r in caplog.records if "read-ahead" in r.getMessage()]
        assert all(m["checksum_errors"] == 0 for m in vol.status()["members"])
    finally:
        vol.close()


def test_a_write_into_a_span_read_ahead_is_seen_by_the_next_read(tmp_path):
    paths, uuid, vol, model = _filled(tmp_path)
    try:
        span = vol._ahead.span_bytes
        _start_streak(vol)  # the next spans are being read
        assert vol._ahead.covers(span)
        for off, n in ((span + 100, 3000), (2 * span - 10, 4 * CHUNK), (span, span)):
            payload = os.urandom(n)
            vol.write(off, payload)  # partial stripes stay in the stripe cache, whole ones not
            model.write(off, payload)
        assert _read_sequentially(vol, 5000) == bytes(model.data)
    finally:
        vol.close()


def _corrupt_a_chunk_ahead(tmp_path):
    """A filled volume, closed, with 64 bytes of the data chunk in column 1 of a stripe three
    quarters in (where read-ahead, not the first read, gets it) overwritten; returns what
    `_filled` does (the volume closed), the chunk's slot, row and volume offset."""
    paths, uuid, vol, model = _filled(tmp_path)
    g = vol.geometry
    vol.close()
    stripe = (3 * g.capacity // 4) // g.stripe_bytes
    group, row = g.locate(stripe)
    slot = g.column_slots(group, row)[1]
    with open(paths[slot], "r+b") as f:
        f.seek(g.chunk_offset(row) + 17)
        f.write(b"\xff" * 64)
    return paths, uuid, vol, model, slot, row, stripe * g.stripe_bytes + g.chunk


def test_a_corrupt_chunk_in_a_span_is_read_carefully_counted_once_and_repaired(tmp_path):
    paths, uuid, vol, model, slot, _, _ = _corrupt_a_chunk_ahead(tmp_path)
    vol = open_vol(paths, uuid)
    try:
        assert _read_sequentially(vol, 2 * CHUNK) == bytes(model.data)
        counts = {m["slot"]: m["checksum_errors"] for m in vol.status()["members"]}
        assert counts[slot] == 1
        assert sum(counts.values()) == 1
        vol.flush()
    finally:
        vol.close()
    vol = open_vol(paths, uuid)
    try:
        kept = {m["slot"]: m["checksum_errors"] for m in vol.status()["members"]}
        assert kept == counts  # (the count is kept in the labels)
        assert _read_sequentially(vol, 2 * CHUNK) == bytes(model.data)
        assert {m["slot"]: m["checksum_errors"] for m in vol.status()["members"]} == kept
    finally:
        vol.close()


def test_a_reader_that_checks_for_itself_gets_span_bytes_unchecked_then_the_repair(tmp_path):
    # The filesystem checks what it reads against its own sector checksums, so spans do not
    # hash its chunks a second time; when its check fails it reads again without
    # caller_checks, and that read must check the chunk, leave the span and repair.
    paths, uuid, vol, model, slot, row, at = _corrupt_a_chunk_ahead(tmp_path)
    g = vol.geometry
    vol = open_vol(paths, uuid)
    try:
        pos, seen = 0, b""
        while pos < at:  # a sequential reader gets there, spans ahead of it
            vol.read(pos, CHUNK, caller_checks=True)
            pos += CHUNK
        assert vol._ahead.covers(at)
        seen = bytes(vol.read(at, CHUNK, caller_checks=True))
        assert seen[17:81] == b"\xff" * 64  # unchecked: the caller's check would fail
        assert sum(m["checksum_errors"] for m in vol.status()["members"]) == 0
        assert bytes(vol.read(at, CHUNK)) == model.get(at, CHUNK)  # its second read
        counts = {m["slot"]: m["checksum_errors"] for m in vol.status()["members"]}
        assert counts[slot] == 1 and sum(counts.values()) == 1
        assert bytes(vol.read(at, CHUNK, caller_checks=True)) == model.get(at, CHUNK)
        assert _read_sequentially(vol, 2 * CHUNK) == bytes(model.data)
    finally:
        vol.close()
    with open(paths[slot], "rb") as f:  # repaired on the member
        f.seek(g.chunk_offset(row) + 17)
        assert f.read(64) == model.get(at + 17, 64)


def test_a_degraded_volume_reads_sequentially_without_the_lost_member(tmp_path):
    paths, uuid, vol, model = _filled(tmp_path, level="raidz2", members=5)
    vol.close()
    remove_member(paths[2])
    vol = open_vol(paths, uuid)
    try:
        assert vol.state() == "degraded"
        assert _read_sequentially(vol, 3 * CHUNK) == bytes(model.data)
    finally:
        vol.close()


def test_a_member_failing_under_spans_read_ahead_is_reconstructed(tmp_path):
    paths, uuid, vol, model = _filled(tmp_path)
    try:
        _start_streak(vol)
        assert vol._ahead.covers(vol._ahead.span_bytes)
        # The member's reads fail from now on (its descriptors are closed), with spans planned
        # or in flight on it.
        vol.settle_read_ahead()
        _start_streak(vol)
        vol.slots[3].member.close()
        assert _read_sequentially(vol, 3 * CHUNK) == bytes(model.data)
        assert vol.slots[3].state == "faulty"
    finally:
        vol.close()


def test_never_written_stripes_read_as_zeros_from_spans(tmp_path):
    paths, uuid, g = build(tmp_path / "a", "raid5", 4, CHUNK, ROWS)
    vol = open_vol(paths, uuid)
    try:
        model = Model(vol.capacity)
        rng = random.Random(5)
        for _ in range(6):  # a few written islands among unwritten stripes
            off = rng.randrange(0, vol.capacity - 3 * CHUNK)
            payload = rand_bytes(off, rng.randrange(1, 3 * CHUNK))
            vol.write(off, payload)
            model.write(off, payload)
        vol.flush()
        unwritten = [row for row in range(ROWS) if vol.table.get(0, row) == UNWRITTEN]
        assert unwritten  # the test reads never-written chunks
        assert _read_sequentially(vol, 2 * CHUNK) == bytes(model.data)
    finally:
        vol.close()


def test_reads_that_are_not_back_to_back_read_nothing_ahead(tmp_path):
    paths, uuid, vol, model = _filled(tmp_path)
    try:
        rng = random.Random(3)
        span = vol._ahead.span_bytes
        for _ in range(200):
            # Random reads, some landing near the one before (within HINT_BYTES) by chance.
            off = rng.randrange(0, vol.capacity - CHUNK)
            if rng.random() < 0.5:
                off = min(vol.capacity - CHUNK, off % (4 * span))
            assert vol.read(off, 100) == model.get(off, 100)
            assert not vol._ahead._spans, f"spans planned after a read at {off}"
        _start_streak(vol)  # now back to back
        assert vol._ahead._spans
    finally:
        vol.close()


def test_a_long_stream_keeps_more_spans_ahead_than_a_short_one(tmp_path, monkeypatch):
    monkeypatch.setattr(raid.readahead, "LONG_STREAK", 24 * CHUNK)
    monkeypatch.setattr(raid.readahead, "LONG_DEPTH", 8)
    paths, uuid, vol, model = _filled(tmp_path)
    try:
        span = vol._ahead.span_bytes
        assert vol.capacity >= (raid.readahead.LONG_DEPTH + 2) * span
        _start_streak(vol)
        assert 0 < len(vol._ahead._spans) <= raid.readahead.DEPTH
        pos = 2 * CHUNK
        while pos < 23 * CHUNK:  # a streak of 23 chunks
            assert vol.read(pos, CHUNK) == model.get(pos, CHUNK)
            pos += CHUNK
        assert len(vol._ahead._spans) <= raid.readahead.DEPTH + 1  # still a short stream
        assert vol.read(pos, CHUNK) == model.get(pos, CHUNK)
        assert len(vol._ahead._spans) > raid.readahead.DEPTH + 1
        assert _read_sequentially(vol, 5000) == model.get(0, vol.capacity)
    finally:
        vol.close()


def test_interleaved_sequential_readers_are_each_read_ahead(tmp_path):
    """Two readers going through different parts of the volume in turns (two files copied
    at once) each get spans ahead of them, and what they keep stays within SPANS_BUDGET spans
    ahead (and the two being read, and the two just read)."""
    paths, uuid, vol, model = _filled(tmp_path)
    try:
        ahead = vol._ahead
        half = (vol.capacity // 2) // CHUNK * CHUNK
        pos = [0, half]
        served = [0, 0]
        reads = 0
        while pos[1] + CHUNK <= vol.capacity and pos[0] + CHUNK <= half:
            for r in (0, 1):
                if ahead.covers(pos[r]) and ahead.covers(pos[r] + CHUNK - 1):
                    served[r] += 1
                assert vol.read(pos[r], CHUNK) == model.get(pos[r], CHUNK), f"reader {r}"
                pos[r] += CHUNK
                assert len(ahead._spans) <= raid.readahead.SPANS_BUDGET + 4
            reads += 1
        assert reads > 20
        assert served[0] > reads // 2 and served[1] > reads // 2, (served, reads)
        assert len(ahead._streams) == 2
    finally:
        vol.close()


def test_a_dozen_interleaved_readers_are_each_followed(tmp_path, monkeypatch):
    """Twelve readers in turns (more than the eight an earlier version followed) each keep
    their stream: most of their reads come from spans, and what is planned ahead of them all
    stays within SPANS_BUDGET spans."""
    monkeypatch.setattr(raid.readahead, "SPAN_BYTES", 4 * CHUNK * 4)
    monkeypatch.setattr(raid.readahead, "HINT_BYTES", 4 * CHUNK)
    paths, uuid, vol, model = _filled(tmp_path)
    try:
        ahead = vol._ahead
        n = 12
        region = (vol.capacity // n) // CHUNK * CHUNK
        assert region > raid.readahead.HINT_BYTES + ahead.span_bytes
        pos = [k * region for k in range(n)]
        served = reads = 0
        for step in range(region // CHUNK):
            for k in range(n):
                if step >= 4:  # past each stream's start
                    reads += 1
                    served += ahead.covers(pos[k]) and ahead.covers(pos[k] + CHUNK - 1)
                assert vol.read(pos[k], CHUNK) == model.get(pos[k], CHUNK), f"reader {k}"
                pos[k] += CHUNK
                assert len(ahead._spans) <= raid.readahead.SPANS_BUDGET + 2 * n
        assert served > 0.6 * reads, (served, reads)
        assert len(ahead._streams) == n
    finally:
        vol.close()


def test_random_reads_beside_a_sequential_reader_do_not_push_it_out(tmp_path, monkeypatch):
    """Many more random readers than STREAMS, between each two reads of a sequential one:
    the sequential stream is still followed and served from spans."""
    # Random reads continue a stream only when they land this near its last one: on a small
    # volume most of them would otherwise join a few streams instead of starting new ones.
    monkeypatch.setattr(raid.readahead, "HINT_BYTES", CHUNK // 2)
    paths, uuid, vol, model = _filled(tmp_path)
    try:
        ahead = vol._ahead
        rng = random.Random(5)
        _start_streak(vol)
        # Past what the spans planned at the start cover, only a stream still followed has
        # spans ahead of it.
        tail = raid.readahead.DEPTH * ahead.span_bytes + 2 * CHUNK
        pos, served, reads = 2 * CHUNK, 0, 0
        while pos + CHUNK <= vol.capacity // 2:
            for _ in range(3 * raid.readahead.STREAMS):
                off = rng.randrange(vol.capacity // 2, vol.capacity - 100)
                assert vol.read(off, 100) == model.get(off, 100)
            if pos >= tail:
                reads += 1
                served += ahead.covers(pos) and ahead.covers(pos + CHUNK - 1)
            assert vol.read(pos, CHUNK) == model.get(pos, CHUNK)
            pos += CHUNK
        assert reads > 20 and served > 0.8 * reads, (served, reads)
        assert len(ahead._streams) == raid.readahead.STREAMS  # the random ones came and went
    finally:
        vol.close()


def test_closing_with_spans_in_flight_waits_for_them(tmp_path):
    paths, uuid, vol, model = _filled(tmp_path)
    _start_streak(vol)
    assert vol._ahead.covers(vol._ahead.span_bytes)
    vol.close()  # joins the reads in flight before the members close
    assert vol._ahead.take(vol._ahead.span_bytes, CHUNK) is None
    vol = open_vol(paths, uuid)
    try:
        assert _read_sequentially(vol, 8 * CHUNK) == bytes(model.data)
    finally:
        vol.close()


def test_spans_are_read_with_direct_io_into_aligned_buffers(tmp_path):
    paths, uuid, vol, model = _filled(tmp_path)
    try:
        _read_sequentially(vol, 2 * CHUNK)
        members = [s.member for s in vol.slots]
        assert all(isinstance(m, BlockFileMember) for m in members)
        # Every member reads directly (none refused here).
        assert all(m._direct is not None and m._direct_reads for m in members)
    finally:
        vol.close()


def test_a_sequential_reader_beside_a_writer_sees_only_written_versions(tmp_path):
    # One thread reads the volume front to back again and again (spans in play) while another
    # rewrites blocks with increasing version numbers. Every block a read returns must be a
    # version written to it, no older than the last write that returned before the read began;
    # once the writer stops, every block reads as its last version.
    paths, uuid, g = build(tmp_path / "a", "raid6", 6, CHUNK, ROWS)
    vol = open_vol(paths, uuid)
    blocks = vol.capacity // CHUNK

    def version(block: int, v: int) -> bytes:
        return (block.to_bytes(4, "little") + v.to_bytes(4, "little")) * (CHUNK // 8)

    try:
        for b in range(blocks):
            vol.write(b * CHUNK, version(b, 0))
        written = {b: {0} for b in range(blocks)}
        last = dict.fromkeys(range(blocks), 0)
        stop = threading.Event()
        problems: list[str] = []

        def reader() -> None:
            while not stop.is_set():
                for pos in range(0, vol.capacity, 3 * CHUNK):
                    n = min(3 * CHUNK, vol.capacity - pos)
                    floor = [last[b] for b in range(pos // CHUNK, (pos + n) // CHUNK)]
                    data = bytes(vol.read(pos, n))
                    for i in range(0, len(data), CHUNK):
                        b = (pos + i) // CHUNK
                        v = int.from_bytes(data[i + 4 : i + 8], "little")
                        if data[i : i + CHUNK] != version(b, v) or v not in written[b]:
                            problems.append(f"block {b}: read a version never written")
                            return
                        if v < floor[i // CHUNK]:
                            problems.append(f"block {b}: read version {v} after version "
                                            f"{floor[i // CHUNK]} was written")
                            return

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        rng = random.Random(11)
        for v in range(1, 400):
            b = rng.randrange(blocks)
            written[b].add(v)  # before the write: the reader may see it from now on
            vol.write(b * CHUNK, version(b, v))
            last[b] = v  # written: reads that begin from now on must not see older ones
        stop.set()
        t.join(timeout=60)
        assert not t.is_alive()
        assert not problems, problems[0]
        data = _read_sequentially(vol, 5 * CHUNK)
        for b in range(blocks):
            assert data[b * CHUNK : (b + 1) * CHUNK] == version(b, last[b]), f"block {b}"
    finally:
        vol.close()
