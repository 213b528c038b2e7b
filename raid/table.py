"""The chunk-checksum table: one entry per chunk of every member, replicated on every member.

Pages are loaded on first use from the first member whose copy verifies (copies that fail are
counted against their member and rewritten), changed in memory, and written to every member on
flush.
At most MAX_PAGES pages are kept: past that, the clean ones are dropped (see `trim`), so memory
stays bounded however large the members are.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

from raid.checksums import page_checksum
from raid.geometry import ENTRIES_PER_PAGE, TABLE_OFFSET, TABLE_PAGE, Geometry

log = logging.getLogger(__name__)

PageReader = Callable[[int], np.ndarray]
# Pages kept in memory before the clean ones are dropped: 16 MiB, each page covering 511 chunks
# (128 MiB of member space at the default chunk size), so reloading one costs little beside them.
MAX_PAGES = 4096


class ChecksumTable:
    """In-memory view of the replicated checksum table."""

    def __init__(self, geometry: Geometry, seed: int, reader: PageReader,
                 max_pages: int = MAX_PAGES) -> None:
        self.geometry = geometry
        self.max_pages = max_pages
        self.seed = seed
        self._reader = reader
        self._pages: dict[int, np.ndarray] = {}
        self.dirty: set[int] = set()
        self._loading = threading.Lock()  # a loaded page goes in, or `forget` runs
        self._generation = 0  # how many times `forget` ran

    def page(self, page_no: int) -> np.ndarray:
        """The page's words (entries then the page checksum), loading it if needed."""
        page = self._pages.get(page_no)
        while page is None:
            # Every caller holds the volume's lock today, so loads, changes and `forget` do not
            # overlap. Should a page ever load without it: a load that a `forget` overtook
            # (its bytes may predate the flush before that) is read again, and of two loads of
            # one page the first to finish is kept, with any change made to it.
            generation = self._generation
            loaded = self._reader(page_no)
            with self._loading:
                if generation == self._generation:
                    page = self._pages.setdefault(page_no, loaded)
                else:
                    page = self._pages.get(page_no)
        return page

    def get(self, slot: int, row: int) -> int:
        """The checksum entry of `slot`'s chunk in `row` (0: never written)."""
        p, i = self.geometry.table_index(slot, row)
        return int(self.page(p)[i])

    def set(self, slot: int, row: int, value: int) -> None:
        """Change an entry; the page is written to members on the next flush."""
        p, i = self.geometry.table_index(slot, row)
        page = self.page(p)
        if int(page[i]) != value:
            page[i] = value
            self.dirty.add(p)

    def sealed(self, page_no: int) -> bytes:
        """The page as stored: entries with the page's own checksum in the last word."""
        page = self.page(page_no)
        page[-1] = page_checksum(page, page_no, self.seed)
        return page.tobytes()

    def verify(self, raw: bytes, page_no: int) -> np.ndarray | None:
        """The page parsed from stored bytes, or None if its checksum fails."""
        page = np.frombuffer(raw, dtype=np.uint64).copy()
        if int(page[-1]) != page_checksum(page, page_no, self.seed):
            return None
        return page

    def forget(self) -> None:
        """Drop clean pages from memory (they are reloaded on demand). Only under the volume's
        lock, which every change of a page and every flush hold."""
        with self._loading:
            for p in list(self._pages):
                if p not in self.dirty:
                    del self._pages[p]
            self._generation += 1

    def trim(self) -> None:
        """`forget` once more than `max_pages` pages are in memory (under the volume's lock)."""
        if len(self._pages) > self.max_pages:
            log.debug("checksum table: %d pages in memory; dropping the clean ones",
                      len(self._pages))
            self.forget()

    @property
    def pages_in_memory(self) -> int:
        """How many pages are held in memory."""
        return len(self._pages)


def page_offset(page_no: int) -> int:
    """Member offset of a checksum-table page."""
    return TABLE_OFFSET + page_no * TABLE_PAGE


def empty_page(page_no: int, seed: int) -> bytes:
    """A sealed page in which every chunk is 'never written'."""
    page = np.zeros(ENTRIES_PER_PAGE + 1, dtype=np.uint64)
    page[-1] = page_checksum(page, page_no, seed)
    return page.tobytes()
