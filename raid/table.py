"""The chunk-checksum table: one entry per chunk of every member, replicated on every member.

Pages are loaded on first use from the first member whose copy verifies (copies that fail are
counted against their member and rewritten), changed in memory, and written to every member on
flush.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from raid.checksums import page_checksum
from raid.geometry import ENTRIES_PER_PAGE, TABLE_OFFSET, TABLE_PAGE, Geometry

log = logging.getLogger(__name__)

PageReader = Callable[[int], np.ndarray]


class ChecksumTable:
    """In-memory view of the replicated checksum table."""

    def __init__(self, geometry: Geometry, seed: int, reader: PageReader) -> None:
        self.geometry = geometry
        self.seed = seed
        self._reader = reader
        self._pages: dict[int, np.ndarray] = {}
        self.dirty: set[int] = set()

    def page(self, page_no: int) -> np.ndarray:
        """The page's words (entries then the page checksum), loading it if needed."""
        page = self._pages.get(page_no)
        if page is None:
            page = self._reader(page_no)
            self._pages[page_no] = page
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
        """Drop clean pages from memory (they are reloaded on demand)."""
        for p in list(self._pages):
            if p not in self.dirty:
                del self._pages[p]


def page_offset(page_no: int) -> int:
    """Member offset of a checksum-table page."""
    return TABLE_OFFSET + page_no * TABLE_PAGE


def empty_page(page_no: int, seed: int) -> bytes:
    """A sealed page in which every chunk is 'never written'."""
    page = np.zeros(ENTRIES_PER_PAGE + 1, dtype=np.uint64)
    page[-1] = page_checksum(page, page_no, seed)
    return page.tobytes()
