"""What a path given as a member (`dwfs mkfs --device`, `dwfs replace --device`) already holds:
a member of a dwfs array, or a filesystem, partition table or other signature that blkid
recognises. Making it a member overwrites its start, which destroys what it holds, so mkfs and
replace refuse such a device unless told `--force` (as `zpool create` and `mdadm --create`
do)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

from backends.member import Member, MemberIOError

log = logging.getLogger(__name__)

BLKID_SECONDS = 30


@dataclass(frozen=True)
class Contents:
    """Something found on a device: a dwfs member (its array and slot) or another kind."""

    what: str  # "slot 2 of dwfs array UUID", "an ext4 filesystem", "a gpt partition table"
    array_uuid: str | None = None


def contents(path: str, member: Member | None = None) -> Contents | None:
    """What the file or device at `path` holds (its label read through `member` if it is
    open as one, else straight from its first bytes), or None if nothing is known."""
    from backends.devices import read_head
    from raid.assemble import read_label
    from raid.geometry import LABEL_SIZE
    from raid.label import Label, LabelError

    try:
        if member is not None:
            label = read_label(member)
        else:
            label = Label.from_bytes(read_head(path, LABEL_SIZE) or b"")
    except (LabelError, MemberIOError):
        label = None  # no dwfs label: look for other signatures
    if label is not None:
        return Contents(f"slot {label.slot} of dwfs array {label.array_uuid}", label.array_uuid)
    return _blkid(path)


def _blkid(path: str) -> Contents | None:
    """A signature blkid's low-level probe finds at `path` (None if it finds none, or cannot
    run: it comes with util-linux, so that is logged)."""
    exe = shutil.which("blkid") or next(
        (p for p in ("/usr/sbin/blkid", "/sbin/blkid") if os.path.exists(p)), None)
    if exe is None:
        log.warning("blkid not found: %s is not checked for filesystems before it is "
                    "overwritten", path)
        return None
    try:
        r = subprocess.run([exe, "-p", "-o", "export", path], capture_output=True, text=True,
                           timeout=BLKID_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("blkid -p %s failed: %s; not checked for filesystems", path, exc)
        return None
    if r.returncode == 2:  # nothing found
        return None
    if r.returncode == 8:
        return Contents("more than one signature (blkid: ambivalent probing result)")
    if r.returncode != 0:
        log.warning("blkid -p %s exited %d: %s; not checked for filesystems", path,
                    r.returncode, r.stderr.strip())
        return None
    found = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    if "PTTYPE" in found and "TYPE" not in found:
        return Contents(f"a {found['PTTYPE']} partition table")
    kind = found.get("TYPE", "unknown")
    usage = found.get("USAGE", "signature")
    label = f" labelled {found['LABEL']!r}" if found.get("LABEL") else ""
    return Contents(f"{_article(kind)} {kind} {usage}{label}")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"
