"""How a volume makes writes durable: every member flushed at once, and write-intent regions
that stay marked for a while after their last write (so repeated fsyncs of one place do not
each pay for a durable bitmap write), cleared by a clean close."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from volhelpers import Model, apply, assert_reads, build

import raid.records
from backends import BlockFileMember
from raid.assemble import assemble
from raid.geometry import BITMAP_OFFSET, BITMAP_SIZE

CHUNK = 4096


class RecordingMember(BlockFileMember):
    """A real block-file member that counts its durable writes and can hold its flushes
    until every member of the array is flushing."""

    barrier: threading.Barrier | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.durable_writes = 0
        self.flushes = 0

    def write_durable(self, offset, data) -> None:
        self.durable_writes += 1
        super().write_durable(offset, data)

    def flush(self) -> None:
        self.flushes += 1
        if RecordingMember.barrier is not None:
            RecordingMember.barrier.wait(timeout=10)  # BrokenBarrierError unless all arrive
        super().flush()


def _bitmap(path: str) -> np.ndarray:
    """The write-intent bits stored in a member file."""
    with open(path, "rb") as f:
        f.seek(BITMAP_OFFSET)
        raw = f.read(BITMAP_SIZE)
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")


@pytest.fixture
def array(tmp_path):
    paths, uuid, g = build(tmp_path / "a", "raid6", 5, CHUNK, rows=2 * 4096 + 8)
    assert g.rows >= 2 * g.rows_per_intent_bit  # at least two write-intent regions
    yield paths, uuid, g
    RecordingMember.barrier = None


def test_members_are_flushed_at_once(array):
    paths, uuid, g = array
    vol = assemble(paths, uuid, RecordingMember.open)
    model = Model(g.capacity)
    apply(vol, model, [(g.stripe_bytes // 3, random.Random(1).randbytes(5 * g.chunk))])
    # Each member's flush waits until all five are flushing: flushed one after another,
    # the first would wait alone and the barrier would break.
    RecordingMember.barrier = threading.Barrier(len(paths))
    vol.flush()
    RecordingMember.barrier = None
    assert all(s.member.flushes >= 1 for s in vol.slots)
    assert all(s.state == "active" and not s.write_errors for s in vol.slots)
    assert_reads(vol, model)
    vol.close()


def test_a_region_written_again_soon_is_not_marked_again(array, monkeypatch):
    paths, uuid, g = array
    vol = assemble(paths, uuid, RecordingMember.open)
    rng = random.Random(2)
    model = Model(g.capacity)
    small = 512  # a part of one stripe: written through the stripe cache at the flush
    apply(vol, model, [(g.stripe_bytes, rng.randbytes(small))])
    vol.flush()
    marks = [s.member.durable_writes for s in vol.slots]
    assert all(m == 1 for m in marks)  # region 0 marked once on every member
    for path in paths:  # still marked on disk after the flush: its last write is recent
        assert _bitmap(path)[0] == 1
    for _ in range(5):  # written and flushed again and again: no further durable marking
        apply(vol, model, [(g.stripe_bytes + rng.randrange(g.stripe_bytes), rng.randbytes(small))])
        vol.flush()
    assert [s.member.durable_writes for s in vol.slots] == marks

    # Another region is marked on its own; once both have been idle long enough, the next
    # flush unmarks them.
    far = (g.rows_per_intent_bit + 1) * g.stripe_bytes  # a stripe of region 1
    apply(vol, model, [(far, rng.randbytes(small))])
    vol.flush()
    assert all(s.member.durable_writes == 2 for s in vol.slots)
    for path in paths:
        assert _bitmap(path)[0] == 1 and _bitmap(path)[1] == 1
    monkeypatch.setattr(raid.records, "INTENT_LINGER", 0.0)
    vol.flush()
    for path in paths:
        assert not _bitmap(path).any()
    assert_reads(vol, model)
    vol.close()


def test_a_clean_close_leaves_no_region_marked(array):
    paths, uuid, g = array
    vol = assemble(paths, uuid, RecordingMember.open)
    model = Model(g.capacity)
    apply(vol, model, [(g.stripe_bytes, random.Random(3).randbytes(512))])
    vol.flush()
    assert all(_bitmap(p)[0] == 1 for p in paths)
    vol.close()
    for path in paths:
        assert not _bitmap(path).any()
    vol = assemble(paths, uuid, BlockFileMember.open)  # reopens without a resync
    assert_reads(vol, model)
    vol.close()
