"""What the CLI and the mount daemon both do to a warehouse's volume: status, scrub, replace."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable

import apsw

from backends import create_member
from backends.devices import describe, identity, is_block_device, size_of
from dwfs.config import WarehouseConfig
from dwfs.warehouse import WarehouseError, meta_path, replacement_member
from raid.rebuild import attach_replacement, rebuild
from raid.scrub import FreeSpace, scrub
from raid.volume import Volume
from vfs.errors import FSError
from vfs.freespace import FreeSpace as FilesystemSpace
from vfs.metadb import MetaDB

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


SCRUB_RECORD = "last-scrub.json"  # in the warehouse: when the last scrub ran and what it found


def status(volume: Volume, cfg: WarehouseConfig) -> dict:
    """The status document of `dwfs status --json`."""
    doc = volume.status()
    doc["warehouse"] = cfg.directory
    doc["last_scrub"] = last_scrub(cfg)
    doc["spares"] = [cfg.resolve(x) for x in cfg.spares]
    doc["assembly_notes"] = list(volume.assembly_notes)  # members found where not listed
    for m in doc["members"]:  # what disk each is (kept for one that is gone)
        m["disk"] = cfg.disks[m["slot"]]
    return doc


def last_scrub(cfg: WarehouseConfig) -> dict | None:
    """What the last scrub that ran to its end recorded, or None (never, or unreadable)."""
    path = os.path.join(cfg.directory, SCRUB_RECORD)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: cannot read the last scrub's record: %s", path, exc)
        return None
    return doc if isinstance(doc, dict) else None


def _record_scrub(cfg: WarehouseConfig, report: dict, started: float, seconds: float) -> None:
    """Keep a scrub's summary for `dwfs status` (written whole: temporary file, rename)."""
    doc = {"started": started, "seconds": round(seconds, 3), "repair": report["repair"],
           **{k: report[k] for k in ("rows_checked", "bytes_checked", "errors", "fixed",
                                     "unrecoverable")}}
    path = os.path.join(cfg.directory, SCRUB_RECORD)
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except OSError as exc:
        log.warning("%s: cannot record the scrub: %s", path, exc)


def clear(volume: Volume, cfg: WarehouseConfig) -> dict:
    """Forget the members' error counts; the status document afterwards."""
    volume.clear_error_counts()
    return status(volume, cfg)


def run_scrub(volume: Volume, cfg: WarehouseConfig, repair: bool,
              progress: Progress | None = None, space: FreeSpace | None = None) -> dict:
    """Scrub the volume (lost chunks in `space` it may rewrite); the report as a dict, also
    recorded for `dwfs status` unless the volume is open read-only."""
    started, t0 = time.time(), time.monotonic()
    report = scrub(volume, repair=repair, progress=progress, space=space).to_dict()
    if not volume.read_only:
        _record_scrub(cfg, report, started, time.monotonic() - t0)
    return report


def scrub_unmounted(volume: Volume, cfg: WarehouseConfig, repair: bool,
                    progress: Progress | None = None) -> dict:
    """Scrub the volume of a warehouse nothing has mounted; on a filesystem warehouse, lost
    chunks its committed metadata leaves unused may be rewritten."""
    space = None
    if repair and os.path.exists(meta_path(cfg)):
        try:
            db = MetaDB(meta_path(cfg), read_only=True)
            try:
                space = FilesystemSpace.committed(db, volume.capacity)
            finally:
                db.close()
        except (apsw.Error, FSError) as exc:
            log.warning("%s: the metadata database cannot be read (%s); scrub repairs only "
                        "what redundancy can", cfg.directory, exc)
    return run_scrub(volume, cfg, repair, progress, space)


def member_capacity(volume: Volume) -> int:
    """Bytes a new member of the volume gets (what it needs, in whole MiB)."""
    return -(-volume.geometry.member_bytes_needed // (1 << 20)) * (1 << 20)


def add_spare(volume: Volume, cfg: WarehouseConfig, path: str, force: bool = False) -> dict:
    """List a spare in dwfs.toml, for the mount daemon to rebuild onto when a member fails: a
    disk (block device) that is free and large enough, or else a new member file made at
    `path` (the size a member needs, its space reserved). A disk that holds a filesystem, a
    partition table or a dwfs member is refused unless `force`."""
    path = os.path.abspath(path)
    mine = identity(path)
    if any(identity(k) == mine
           for k in cfg.member_paths() + [cfg.resolve(x) for x in cfg.spares]):
        raise WarehouseError(f"{path} is already a member or a spare of {cfg.directory}",
                             errno.EEXIST)
    if is_block_device(path):
        _check_spare_disk(volume, path, force)
    else:
        if os.path.lexists(path):
            raise WarehouseError(f"{path} exists; a spare file is made new, so give a path "
                                 "that does not exist yet (or a disk)", errno.EEXIST)
        if not os.path.isdir(os.path.dirname(path)):
            raise WarehouseError(f"{os.path.dirname(path)} is not a directory", errno.ENOENT)
        create_member(cfg.backend, path, member_capacity(volume)).close()
    cfg.spares.append(path)
    cfg.save()
    log.info("%s: spare %s added", cfg.directory, path)
    return {"spares": list(cfg.spares)}


def _check_spare_disk(volume: Volume, path: str, force: bool) -> None:
    """Raise WarehouseError unless the disk at `path` can stand in for a member."""
    from dwfs.devicecheck import contents

    try:
        size = size_of(path)
    except OSError as exc:
        raise WarehouseError(f"{path}: {exc.strerror}", exc.errno or errno.EIO) from exc
    needed = member_capacity(volume)
    if size < needed:
        raise WarehouseError(f"{path} holds {size} bytes; a member of this array needs "
                             f"{needed}", errno.ENOSPC)
    found = contents(path)
    if found is not None and not force:
        raise WarehouseError(f"{path} holds {found.what}; it would be overwritten when a "
                             "member fails (--force adds it all the same)", errno.EBUSY)
    if found is not None:
        log.warning("spare %s holds %s; added anyway (--force)", path, found.what)


def remove_spare(cfg: WarehouseConfig, path: str) -> dict:
    """Take `path` off the spares (the file stays where it is)."""
    want = os.path.realpath(os.path.abspath(path))
    kept = [x for x in cfg.spares if os.path.realpath(cfg.resolve(x)) != want]
    if len(kept) == len(cfg.spares):
        raise WarehouseError(f"{path} is not a spare of {cfg.directory}", errno.ENOENT)
    cfg.spares[:] = kept
    cfg.save()
    log.info("%s: spare %s removed (the file stays)", cfg.directory, path)
    return {"spares": list(cfg.spares)}


def replace(
    volume: Volume,
    cfg: WarehouseConfig,
    slot: int,
    device: str | None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    max_rate: int | None = None,
    force: bool = False,
    spare: bool = False,
) -> dict:
    """Rebuild `slot` onto a new member (or resume an interrupted rebuild of it); `force`
    lets a device that holds a filesystem or another array's member be overwritten, and a
    `spare` (the device is one) may hold a filesystem."""
    g = volume.geometry
    if not 0 <= slot < g.members:
        raise WarehouseError(f"slot {slot} does not exist: the array has slots 0 to "
                             f"{g.members - 1}")
    s = volume.slots[slot]
    resumed_at = 0
    same_place = device is None or device == s.path
    if s.state == "rebuilding" and same_place:
        resumed_at = s.rebuilt_rows * g.chunk
        log.info("slot %d: resuming the interrupted rebuild at byte %d", slot, resumed_at)
    else:
        group = slot // g.group_size
        members = volume.slots[group * g.group_size : (group + 1) * g.group_size]
        lost_others = sum(1 for x in members if x.index != slot and x.state != "active")
        if lost_others + 1 > g.tolerance:
            raise WarehouseError(
                f"slot {slot} cannot be rebuilt: with it, {lost_others + 1} member(s) of its "
                f"group would be out of service and {g.level} recovers {g.tolerance}"
            )
        member, path, cfg_path = replacement_member(cfg, slot, device, member_capacity(volume),
                                                     force, spare)
        attach_replacement(volume, slot, member, path)
        disk = describe(path)
        if (cfg.members[slot], cfg.disks[slot]) != (cfg_path, disk):
            cfg.members[slot], cfg.disks[slot] = cfg_path, disk
            cfg.save()
    rebuild(volume, slot, progress, stop, max_rate)
    return {"slot": slot, "path": volume.slots[slot].path, "resumed_at_bytes": resumed_at,
            "rebuilt_bytes": g.rows * g.chunk, "state": volume.state()}
