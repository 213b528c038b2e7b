"""Volume space the filesystem does not use: what the volume's scrub may rewrite as zeros when
a crash while degraded left chunks there that redundancy can no longer reconstruct."""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager

from vfs.alloc import SECTOR, Allocator
from vfs.filedata import BLOCK
from vfs.metadb import MetaDB

RESERVED_SECTORS = 2 * BLOCK // SECTOR  # the two metadata-copy superblocks at the start


def used_sectors(db: MetaDB) -> list[tuple[int, int]]:
    """The (start, count) sector extents the committed metadata uses: the superblocks, file
    contents and the metadata copies."""
    used = [(0, RESERVED_SECTORS)]
    used += list(db.rows("SELECT addr, nsect FROM extents"))
    used += list(db.rows("SELECT addr, nsect FROM metacopy"))
    return used


class FreeSpace:
    """Answers `raid.scrub.FreeSpace`: hold `lock` while asking and while rewriting."""

    def __init__(self, alloc: Allocator, lock: AbstractContextManager) -> None:
        self.alloc = alloc
        self.lock = lock

    @classmethod
    def committed(cls, db: MetaDB, capacity: int) -> FreeSpace:
        """The free space of an unmounted filesystem, from its committed metadata."""
        return cls(Allocator(capacity // SECTOR, used_sectors(db)), threading.Lock())

    def unused(self, offset: int, length: int) -> bool:
        """Whether volume bytes [offset, offset + length) hold nothing in use, nor anything
        freed since the last commit (a crash would bring it back into use)."""
        first = offset // SECTOR
        return self.alloc.is_free(first, -(-(offset + length) // SECTOR) - first)
