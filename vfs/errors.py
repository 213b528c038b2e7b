"""The filesystem's error: an OSError carrying the errno POSIX prescribes."""

from __future__ import annotations

import errno
import os


class FSError(OSError):
    """A filesystem operation refused or failed; `errno` is what the caller gets."""

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(code, message or os.strerror(code))
        self.message = message or os.strerror(code)

    def __str__(self) -> str:
        return f"{errno.errorcode.get(self.errno, self.errno)}: {self.message}"


class MetadataError(FSError):
    """The metadata database is missing, unreadable or of an unknown format."""

    def __init__(self, message: str, code: int = errno.EIO) -> None:
        super().__init__(code, message)
