"""POSIX access control lists, kept as the `system.posix_acl_access` and
`system.posix_acl_default` attributes in the kernel's binary form: reading and checking them,
and how an access list and the mode's permission bits follow each other.

The kernel checks permissions against these lists itself (the mount asks for FUSE_POSIX_ACL);
what it leaves to the filesystem is keeping the mode and the access list in step (setting a
list, chmod) and giving new files their directory's default list (as posix_acl_create does).
"""

from __future__ import annotations

import errno
import struct

from vfs.errors import FSError

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"
NAMES = (ACCESS, DEFAULT)
VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_NO_ID = 0xFFFFFFFF
PERMS = 0o777

Entry = tuple[int, int, int]  # tag, permission bits (rwx), user or group id


def parse(value: bytes) -> list[Entry]:
    """The entries of a list in binary form; EINVAL unless it is valid as the kernel's
    posix_acl_valid has it: owner, named users, owning group, named groups, a mask (required
    with named entries), other, in that order."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise FSError(errno.EINVAL, f"access control list of {len(value)} bytes")
    if _HEADER.unpack_from(value)[0] != VERSION:
        raise FSError(errno.EOPNOTSUPP, "access control list of an unknown version")
    entries = [_ENTRY.unpack_from(value, p)
               for p in range(_HEADER.size, len(value), _ENTRY.size)]
    state, needs_mask = USER_OBJ, False  # the entry kinds that may come next
    for tag, perm, _ident in entries:
        if perm & ~7:
            raise FSError(errno.EINVAL, f"access control list permission {perm:o}")
        if tag == USER_OBJ and state == USER_OBJ:
            state = USER
        elif tag == USER and state == USER or tag == GROUP and state == GROUP:
            needs_mask = True
        elif tag == GROUP_OBJ and state == USER:
            state = GROUP
        elif tag == MASK and state == GROUP:
            state = OTHER
        elif tag == OTHER and (state == OTHER or state == GROUP and not needs_mask):
            state = 0
        else:
            raise FSError(errno.EINVAL, f"access control list entry {tag:#x} out of place")
    if state != 0:
        raise FSError(errno.EINVAL, "access control list without all its required entries")
    return [(tag, perm, ident if tag in (USER, GROUP) else _NO_ID)
            for tag, perm, ident in entries]


def pack(entries: list[Entry]) -> bytes:
    """The binary form of a list."""
    return _HEADER.pack(VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


def is_minimal(entries: list[Entry]) -> bool:
    """True if the list says no more than permission bits do (owner, group, other only)."""
    return len(entries) == 3


def mode_bits(entries: list[Entry]) -> int:
    """The permission bits an access list stands for: the group class is the mask when there
    is one."""
    perm = {tag: p for tag, p, _ in entries if tag != USER and tag != GROUP}
    return perm[USER_OBJ] << 6 | perm.get(MASK, perm[GROUP_OBJ]) << 3 | perm[OTHER]


def with_mode(entries: list[Entry], mode: int) -> list[Entry]:
    """An access list after chmod to `mode` (the mask, or the owning group without one,
    takes the group bits)."""
    group_tag = MASK if any(tag == MASK for tag, _, _ in entries) else GROUP_OBJ
    bits = {USER_OBJ: mode >> 6 & 7, group_tag: mode >> 3 & 7, OTHER: mode & 7}
    return [(tag, bits.get(tag, perm), ident) for tag, perm, ident in entries]


def inherited(default: list[Entry], mode: int) -> tuple[list[Entry], int]:
    """What a new file with requested `mode` gets in a directory with `default` as its default
    list: its access list and mode (the kernel's posix_acl_create_masq)."""
    out: list[Entry] = []
    bits = mode & PERMS
    group_at = mask_at = -1
    for tag, perm, ident in default:
        if tag == USER_OBJ:
            perm &= bits >> 6 & 7
            bits &= perm << 6 | ~0o700
        elif tag == OTHER:
            perm &= bits & 7
            bits &= perm | ~0o007
        elif tag == GROUP_OBJ:
            group_at = len(out)
        elif tag == MASK:
            mask_at = len(out)
        out.append((tag, perm, ident))
    at = mask_at if mask_at >= 0 else group_at
    tag, perm, ident = out[at]
    perm &= bits >> 3 & 7
    bits &= perm << 3 | ~0o070
    out[at] = (tag, perm, ident)
    return out, (mode & ~PERMS) | (bits & PERMS)
