"""Errors of the RAID layer; each carries the errno a filesystem should answer with."""

from __future__ import annotations

import errno


class RaidError(OSError):
    """Base of RAID errors; `errno` says what a filesystem should answer."""

    def __init__(self, message: str, code: int = errno.EIO) -> None:
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UnrecoverableError(RaidError):
    """Data that cannot be read or reconstructed (more members lost than the level tolerates)."""


class AssemblyError(RaidError):
    """The array cannot be put together from the given members."""


class ArrayCreateError(RaidError):
    """An array cannot be created as asked (bad level, sizes, existing members)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno.EINVAL)
