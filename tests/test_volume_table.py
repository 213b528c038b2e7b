"""The chunk-checksum table in memory: bounded however large the array, and never stale when its
clean pages are dropped and reloaded while other threads read ahead."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from volhelpers import Model, build, open_vol, plan, rand_bytes

from raid.geometry import ENTRIES_PER_PAGE
from raid.scrub import scrub
from raid.table import ChecksumTable

pytestmark = pytest.mark.timeout(120)

CHUNK = 4096
ROWS = 8192  # 4 members: 32,768 table entries, 65 pages


def _scattered_writes(vol, model, rng, count, seed):
    g = vol.geometry
    for i in range(count):
        off = rng.randrange(g.capacity - 64 * 1024)
        data = rand_bytes(seed + i, rng.randrange(1, 64 * 1024))
        vol.write(off, data)
        model.write(off, data)


def _no_checksum_errors(vol):
    return {s.index: s.checksum_errors for s in vol.slots if s.checksum_errors}


def test_table_pages_in_memory_stay_bounded(tmp_path):
    paths, uuid, g = build(tmp_path, "raid5", 4, CHUNK, ROWS)
    assert g.table_pages > 60
    vol = open_vol(paths, uuid)
    vol.table.max_pages = 4
    model = Model(g.capacity)
    rng = random.Random(3)
    for round_ in range(4):
        _scattered_writes(vol, model, rng, 40, 1000 * round_)
        vol.flush()
        assert vol.table.pages_in_memory <= 4  # every clean page beyond the bound dropped
    # A sequential read of the whole volume touches every page; the read-ahead loads a few
    # between the trims.
    most = 0
    step = 1 << 20
    for off in range(0, g.capacity, step):
        assert bytes(vol.read(off, step)) == model.get(off, step), off
        most = max(most, vol.table.pages_in_memory)
    assert most <= 4 + 8, most
    assert _no_checksum_errors(vol) == {}
    vol.close()
    vol = open_vol(paths, uuid)
    try:
        assert bytes(vol.read(0, g.capacity)) == model.get(0, g.capacity)
        report = scrub(vol, repair=False)
        assert report.errors == 0
    finally:
        vol.close()


def test_a_page_read_while_pages_are_dropped_is_read_again():
    """A page loaded (without the volume's lock) from the members before a change, a flush and
    a `forget` must not go into memory after them: it would vouch for the old checksums."""
    g = plan("raid5", 4, CHUNK, ROWS)
    stored = {0: np.zeros(ENTRIES_PER_PAGE + 1, dtype=np.uint64)}
    inside, go_on = threading.Event(), threading.Event()
    hold = [True]

    def reader(page_no: int) -> np.ndarray:
        page = stored[page_no].copy()
        if hold[0]:
            hold[0] = False
            inside.set()
            assert go_on.wait(30)
        return page

    table = ChecksumTable(g, 1, reader)
    seen: list[np.ndarray] = []
    t = threading.Thread(target=lambda: seen.append(table.page(0)))
    t.start()
    assert inside.wait(30)  # the reader holds page 0 as it was
    table.set(0, 0, 12345)  # a writer loads page 0 itself and changes it
    stored[0] = np.frombuffer(table.sealed(0), dtype=np.uint64).copy()  # the flush
    table.dirty.clear()
    table.forget()  # page 0 is clean now: dropped
    go_on.set()
    t.join(30)
    assert int(seen[0][0]) == 12345
    assert table.get(0, 0) == 12345


def test_dropped_pages_while_reading_ahead_keep_the_data_whole(tmp_path):
    """Readers stream through the volume (the spans planned ahead of them load pages) while a
    writer changes entries and flushes, and every flush drops the clean pages: nothing fails
    its checksum, and everything reads back as written."""
    paths, uuid, g = build(tmp_path, "raid5", 4, CHUNK, ROWS)
    vol = open_vol(paths, uuid)
    vol.table.max_pages = 1
    model = Model(g.capacity)
    rng = random.Random(7)
    _scattered_writes(vol, model, rng, 20, 0)
    vol.flush()
    stop = threading.Event()
    failures: list[BaseException] = []

    def reader(start: int) -> None:
        try:
            while not stop.is_set():
                for off in range(start, g.capacity, 1 << 20):
                    vol.read(off, 1 << 20)
                    if stop.is_set():
                        return
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failures.append(exc)

    threads = [threading.Thread(target=reader, args=(s * (g.capacity // 3),)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(30):
            _scattered_writes(vol, model, rng, 5, 100 * (i + 1))
            vol.flush()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not failures, failures
    assert _no_checksum_errors(vol) == {}
    assert bytes(vol.read(0, g.capacity)) == model.get(0, g.capacity)
    vol.close()
    vol = open_vol(paths, uuid)
    try:
        assert scrub(vol, repair=False).errors == 0
        assert _no_checksum_errors(vol) == {}
    finally:
        vol.close()
