"""The member label: who a member is (array, slot), how fresh it is (events) and the array's shape.

Layout of the 4 KiB label block: magic, format version, length of a JSON body, the body, and an
xxh64 checksum of everything before the last 8 bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import xxhash

from raid.geometry import LABEL_SIZE, Geometry

MAGIC = b"DWFSRAID"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<8sII")


class LabelError(ValueError):
    """A label block that is not a valid dwfs label."""


# A member's error counts, kept in the labels from one open of the array to the next (as ZFS
# keeps a device's until `zpool clear`), until `dwfs clear` or a replacement.
ERROR_COUNTS = ("read_errors", "write_errors", "checksum_errors", "repaired")


@dataclass
class SlotRecord:
    """The array's view of one slot: state, while rebuilding how many rows are done, and its
    member's error counts."""

    state: str = "active"  # active | faulty | missing | rebuilding
    rebuilt_rows: int = 0
    read_errors: int = 0
    write_errors: int = 0
    checksum_errors: int = 0
    repaired: int = 0

    def to_dict(self) -> dict:
        d = {"state": self.state, "rebuilt_rows": self.rebuilt_rows}
        d.update((k, getattr(self, k)) for k in ERROR_COUNTS if getattr(self, k))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SlotRecord:
        """The record of a label body (labels from before the counts have none: zero)."""
        return cls(str(d["state"]), int(d["rebuilt_rows"]),
                   *(int(d.get(k, 0)) for k in ERROR_COUNTS))


@dataclass
class Label:
    """Identity and freshness of one member, and the array state it last saw."""

    array_uuid: str
    slot: int
    events: int
    geometry: Geometry
    clean: bool = True
    slots: list[SlotRecord] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        body = json.dumps(
            {
                "array_uuid": self.array_uuid,
                "slot": self.slot,
                "events": self.events,
                "clean": self.clean,
                "geometry": self.geometry.to_dict(),
                "slots": [s.to_dict() for s in self.slots],
            },
            separators=(",", ":"),
        ).encode()
        head = _HEAD.pack(MAGIC, FORMAT_VERSION, len(body))
        if len(head) + len(body) > LABEL_SIZE - 8:
            raise LabelError(f"label body of {len(body)} bytes does not fit in {LABEL_SIZE}")
        block = bytearray(LABEL_SIZE)
        block[: len(head)] = head
        block[len(head) : len(head) + len(body)] = body
        block[-8:] = struct.pack("<Q", xxhash.xxh64_intdigest(bytes(block[:-8])))
        return bytes(block)

    @classmethod
    def from_bytes(cls, block: bytes) -> Label:
        if len(block) != LABEL_SIZE:
            raise LabelError(f"label block is {len(block)} bytes, expected {LABEL_SIZE}")
        magic, version, length = _HEAD.unpack_from(block)
        if magic != MAGIC:
            raise LabelError("no dwfs label (wrong magic): not a dwfs member")
        if version != FORMAT_VERSION:
            raise LabelError(f"label format version {version}, this dwfs reads {FORMAT_VERSION}")
        (stored,) = struct.unpack("<Q", block[-8:])
        if stored != xxhash.xxh64_intdigest(block[:-8]):
            raise LabelError("label checksum mismatch: the label is corrupt")
        try:
            d = json.loads(block[_HEAD.size : _HEAD.size + length])
            return cls(
                array_uuid=str(d["array_uuid"]),
                slot=int(d["slot"]),
                events=int(d["events"]),
                clean=bool(d["clean"]),
                geometry=Geometry.from_dict(d["geometry"]),
                slots=[SlotRecord.from_dict(s) for s in d["slots"]],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise LabelError(f"label body is malformed: {exc}") from exc
