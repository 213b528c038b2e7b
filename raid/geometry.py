"""Where every chunk of an array lives: member header layout, rows, and column placement.

Every member has the same layout: a 4 KiB label, a 4 KiB write-intent bitmap, the replicated
chunk-checksum table, then `rows` data chunks. Row r of every member belongs to stripe r of that
member's group; the group's k data and m parity columns are placed on its members by the level's
layout (Linux md left-symmetric for raid5/6/50/60, parity-first rotating columns for raidz).
Logical stripes of k chunks are dealt round-robin over the groups.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property

from raid import levels
from raid.codec import Codec

LABEL_OFFSET = 0
LABEL_SIZE = 4096
BITMAP_OFFSET = 4096
BITMAP_SIZE = 4096
BITMAP_BITS = BITMAP_SIZE * 8
TABLE_OFFSET = 8192
TABLE_PAGE = 4096
ENTRIES_PER_PAGE = TABLE_PAGE // 8 - 1  # the last word of a page is the page's own checksum
DATA_ALIGN = 64 * 1024
MIN_CHUNK = 4096
INTENT_REGION_BYTES = 16 * 1024 * 1024  # member bytes covered by one write-intent bit, at least


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def table_pages(rows: int, members: int) -> int:
    """Pages of the chunk-checksum table for `rows` rows of `members` members."""
    return (rows * members + ENTRIES_PER_PAGE - 1) // ENTRIES_PER_PAGE


def data_offset(rows: int, members: int) -> int:
    """Member offset of the first data chunk."""
    return _align(TABLE_OFFSET + table_pages(rows, members) * TABLE_PAGE, DATA_ALIGN)


def rows_for_capacity(capacity: int, members: int, chunk: int) -> int:
    """The most rows of `chunk` bytes that fit, with the header, in `capacity` bytes."""
    per_row = chunk + members * 8 / ENTRIES_PER_PAGE * 512 / 511
    rows = max(0, int((capacity - TABLE_OFFSET - DATA_ALIGN) / per_row))
    while rows > 0 and data_offset(rows, members) + rows * chunk > capacity:
        rows -= 1
    return rows


@dataclass(frozen=True)
class Geometry:
    """The fixed shape of an array, written into every member's label."""

    level: str
    members: int
    chunk: int
    rows: int

    @classmethod
    def plan(cls, level: str, members: int, chunk: int, member_capacity: int) -> Geometry:
        """The geometry for members of `member_capacity` bytes; raises on impossible input."""
        levels.shape_of(level, members)  # validates the level and member count
        if chunk < MIN_CHUNK or chunk & (chunk - 1):
            raise levels.LevelError(
                f"chunk size must be a power of two of at least {MIN_CHUNK}, got {chunk}"
            )
        rows = rows_for_capacity(member_capacity, members, chunk)
        if rows < 1:
            raise levels.LevelError(
                f"members of {member_capacity} bytes are too small for {chunk}-byte chunks"
            )
        return cls(level, members, chunk, rows)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(str(d["level"]), int(d["members"]), int(d["chunk"]), int(d["rows"]))

    @cached_property
    def shape(self) -> levels.Shape:
        return levels.shape_of(self.level, self.members)

    @property
    def k(self) -> int:
        return self.shape.k

    @property
    def m(self) -> int:
        return self.shape.m

    @property
    def groups(self) -> int:
        return self.shape.groups

    @property
    def group_size(self) -> int:
        return self.shape.group_size

    @property
    def tolerance(self) -> int:
        return self.shape.m

    @property
    def stripe_bytes(self) -> int:
        """Data bytes of one stripe (k chunks)."""
        return self.k * self.chunk

    @property
    def stripes(self) -> int:
        return self.rows * self.groups

    @property
    def capacity(self) -> int:
        """Usable bytes of the volume."""
        return self.stripes * self.stripe_bytes

    @cached_property
    def data_offset(self) -> int:
        return data_offset(self.rows, self.members)

    @property
    def member_bytes_needed(self) -> int:
        return self.data_offset + self.rows * self.chunk

    @property
    def rows_per_intent_bit(self) -> int:
        by_count = (self.rows + BITMAP_BITS - 1) // BITMAP_BITS
        by_size = max(1, INTENT_REGION_BYTES // self.chunk)
        return max(by_count, by_size)

    @cached_property
    def codec(self) -> Codec:
        return Codec(levels.parity_matrix(self.level, self.members))

    @cached_property
    def _code(self) -> str:
        return levels.level_spec(self.level).code

    def locate(self, stripe: int) -> tuple[int, int]:
        """(group, row) of logical stripe `stripe`."""
        return stripe % self.groups, stripe // self.groups

    def column_slots(self, group: int, row: int) -> tuple[int, ...]:
        """Global member slot of each column (data 0..k-1, then parity) of a group's row."""
        return self._placements[group][row % self.group_size]

    @cached_property
    def _placements(self) -> tuple[tuple[tuple[int, ...], ...], ...]:
        # Placement repeats every group_size rows: work it out once per group and phase.
        n = self.group_size
        return tuple(tuple(tuple(self._place(g, r)) for r in range(n)) for g in range(self.groups))

    def _place(self, group: int, row: int) -> list[int]:
        n = self.group_size
        k = self.k
        base = group * n
        if self._code in ("none", "mirror") or self.m == 0:
            local = list(range(n))
        elif self._code == "md":
            # Linux md ALGORITHM_LEFT_SYMMETRIC: P walks backwards; data follows the parity.
            p = n - 1 - (row % n)
            if self.m == 1:
                local = [(p + 1 + i) % n for i in range(k)] + [p]
            else:
                q = (p + 1) % n
                local = [(p + 2 + i) % n for i in range(k)] + [p, q]
        else:
            # raidz: parity columns first (P, Q, R), then data, rotated by row.
            order = list(range(self.m, n)) + list(range(self.m))  # data cols, then parity cols
            local = [(c + row) % n for c in order]
        return [base + s for s in local]

    def chunk_offset(self, row: int) -> int:
        """Member offset of the chunk in `row`."""
        return self.data_offset + row * self.chunk

    def table_index(self, slot: int, row: int) -> tuple[int, int]:
        """(page, index within page) of the checksum entry of `slot`'s chunk in `row`."""
        return divmod(row * self.members + slot, ENTRIES_PER_PAGE)

    @property
    def table_pages(self) -> int:
        return table_pages(self.rows, self.members)
