"""Chunk checksums and checksum-table pages.

A chunk's checksum is xxh3-64 seeded with its slot and row, so a chunk written to the wrong
place fails verification too. The value 0 is reserved: it marks a chunk that was never written
and reads as zeros without touching the member.
"""

from __future__ import annotations

import numpy as np
import xxhash

UNWRITTEN = 0


def chunk_checksum(data, slot: int, row: int) -> int:
    """Checksum of a chunk's bytes at (slot, row); never 0."""
    value = xxhash.xxh3_64_intdigest(data, seed=(slot << 48) ^ row)
    return value or 1


def page_checksum(page: np.ndarray, page_no: int, array_seed: int) -> int:
    """Checksum of a checksum-table page (its entries, not its last word)."""
    return xxhash.xxh3_64_intdigest(page[:-1].tobytes(), seed=array_seed ^ (page_no << 1))


def array_seed(array_uuid: str) -> int:
    """A per-array seed so that pages of another array never verify."""
    return xxhash.xxh64_intdigest(array_uuid.encode()) & 0x7FFF_FFFF_FFFF_FFFF
