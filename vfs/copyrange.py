"""copy_file_range(2) inside the filesystem: file data copied from one file to another without
crossing into the kernel and back."""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING

from vfs.errors import FSError

if TYPE_CHECKING:
    from vfs.view import View

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read and written at a time
MOST = 64 << 20  # bytes copied by one call at most: callers go on after a short copy


def copy_range(view: View, src: int, off_in: int, dst: int, off_out: int, length: int) -> int:
    """Copy up to `length` bytes of file `src` at `off_in` to file `dst` at `off_out`; returns
    how many were copied: fewer at the source's end, past MOST, or when an error (such as
    ENOSPC) stops a copy that has made progress; an error before any byte is raised.

    Ranges of the source that are holes stay holes where the destination has no data either
    (the last byte is written when the copy ends in a hole, to give the destination its
    size). The kernel has checked the descriptors and refused overlapping ranges of one file.
    """
    if off_in < 0 or off_out < 0 or length < 0:
        raise FSError(errno.EINVAL, f"copy of {length} bytes from {off_in} to {off_out}")
    size = view.getattr(src).size
    end = min(off_in + min(length, MOST), size)
    pos = off_in
    try:
        while pos < end:
            data_at = _next_data(view, src, pos, end)
            if data_at > pos:  # a hole in the source up to data_at
                pos = _copy_hole(view, dst, pos, data_at, end, off_out - off_in)
                continue
            n = min(CHUNK, end - pos)
            data = view.read(src, pos, n)
            if len(data) < n:
                n = len(data)
                end = pos + n  # the source was truncated meanwhile
                if n == 0:
                    break
            view.write(dst, pos + off_out - off_in, data)
            pos += n
    except OSError as exc:
        if pos == off_in:
            raise
        log.info("copy from inode %d to %d stopped after %d bytes: %s", src, dst,
                 pos - off_in, exc)
    return max(0, pos - off_in)


def _next_data(view: View, ino: int, pos: int, end: int) -> int:
    """The first offset at or after `pos` holding data, or `end` if none comes before it."""
    try:
        return min(view.seek(ino, pos, os.SEEK_DATA), end)
    except FSError as exc:
        if exc.errno == errno.ENXIO:
            return end
        raise


def _copy_hole(view: View, dst: int, pos: int, stop: int, end: int, shift: int) -> int:
    """Make the destination read zeros where source bytes [pos, stop) are a hole; returns
    where the copy goes on."""
    if _next_data(view, dst, pos + shift, stop + shift) < stop + shift:
        n = min(CHUNK, stop - pos)  # the destination has data there: overwrite it
        view.write(dst, pos + shift, bytes(n))
        return pos + n
    if stop == end and view.getattr(dst).size < end + shift:
        view.write(dst, end - 1 + shift, b"\0")  # an all-zero sector is stored as a hole
    return stop
