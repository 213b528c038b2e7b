"""Helpers for tests that build arrays on real block files."""

from __future__ import annotations

import os

from backends import BlockFileMember, open_member
from raid.assemble import assemble, create_array
from raid.volume import Volume

MEMBER_SIZE = 2 * 1024 * 1024


def make_array(directory, level: str, members: int, chunk: int = 4096,
               size: int = MEMBER_SIZE) -> tuple[list[str], str]:
    """Create an array of block-file members; returns (paths, array uuid)."""
    paths = [os.path.join(directory, f"m{i}.img") for i in range(members)]
    ms = [BlockFileMember.create(p, size) for p in paths]
    uuid, _ = create_array(ms, level, chunk)
    for m in ms:
        m.close()
    return paths, uuid


def open_array(paths, uuid, **kw) -> Volume:
    return assemble(paths, uuid, open_member, **kw)
