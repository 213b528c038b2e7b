"""Where bytes rest: members the RAID layer stripes over (block files, SQLite blobs)."""

from __future__ import annotations

from backends.blockfile import BlockFileMember
from backends.member import Member, MemberIOError
from backends.sqliteblob import SqliteBlobMember

BACKENDS = ("file", "sqlite")


def create_member(backend: str, path: str, capacity: int) -> Member:
    """Create a new member of the given backend kind."""
    if backend == "file":
        return BlockFileMember.create(path, capacity)
    if backend == "sqlite":
        return SqliteBlobMember.create(path, capacity)
    raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


def open_member(path: str) -> Member:
    """Open an existing member, recognising its backend from the file's first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise MemberIOError(path, "open", exc.strerror or str(exc)) from exc
    if head.startswith(b"SQLite format 3"):
        return SqliteBlobMember.open(path)
    return BlockFileMember.open(path)


__all__ = [
    "BACKENDS",
    "BlockFileMember",
    "Member",
    "MemberIOError",
    "SqliteBlobMember",
    "create_member",
    "open_member",
]
