"""The member contract: a fixed-capacity byte store that the RAID layer stripes over."""

from __future__ import annotations

from abc import ABC, abstractmethod


class MemberIOError(OSError):
    """An I/O failure of one member; the RAID layer marks the member faulty."""

    def __init__(self, path: str, operation: str, detail: str) -> None:
        super().__init__(f"member {path}: {operation} failed: {detail}")
        self.path = path
        self.operation = operation
        self.detail = detail


class Member(ABC):
    """A fixed-capacity byte store: read, write, flush (durable on return), close."""

    path: str
    capacity: int

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset` (never-written ranges read as zeros)."""

    def readinto(self, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` with the bytes at `offset`."""
        buffer[:] = self.read(offset, len(buffer))

    def readinto_many(self, offset: int, buffers: list[memoryview]) -> None:
        """Fill `buffers`, in order, with the consecutive bytes starting at `offset`."""
        for buffer in buffers:
            self.readinto(offset, buffer)
            offset += len(buffer)

    def readinto_uncached(self, offset: int, buffers: list[memoryview]) -> None:
        """Like `readinto_many`, bypassing the host's page cache where the member can (for
        buffers aligned to 4096 bytes in address and length, at an aligned offset)."""
        self.readinto_many(offset, buffers)

    def prefetch(self, offset: int, length: int) -> None:
        """Hint that [offset, offset + length) will be read soon (may do nothing)."""
        return None

    @abstractmethod
    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Store `data` at `offset`."""

    def write_stream(self, offset: int, data: bytes | memoryview) -> None:
        """Store `data` at `offset`, a write in a stream of whole stripes that nothing will
        read back soon: the member may queue it and skip its caches (`write` otherwise).
        Reads, other writes and `flush` see it as if it were done at once."""
        self.write(offset, data)

    @abstractmethod
    def flush(self) -> None:
        """Make every completed write durable before returning."""

    def write_durable(self, offset: int, data: bytes | memoryview) -> None:
        """Store a small record and return once it is durable (other writes may still be
        pending: unlike `flush`, this need not wait for them)."""
        self.write(offset, data)
        self.flush()

    @abstractmethod
    def check(self) -> None:
        """Raise MemberIOError if the backing store has gone away (deleted, detached)."""

    @abstractmethod
    def close(self) -> None:
        """Release the backing store; the member is unusable afterwards."""

    def _check_range(self, offset: int, length: int, operation: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.capacity:
            raise MemberIOError(
                self.path,
                operation,
                f"range {offset}+{length} outside capacity {self.capacity}",
            )
