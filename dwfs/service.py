"""What the CLI and the mount daemon both do to a warehouse's volume: status, scrub, replace."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import apsw

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


def status(volume: Volume, cfg: WarehouseConfig) -> dict:
    """The status document of `dwfs status --json`."""
    doc = volume.status()
    doc["warehouse"] = cfg.directory
    return doc


def clear(volume: Volume, cfg: WarehouseConfig) -> dict:
    """Forget the members' error counts; the status document afterwards."""
    volume.clear_error_counts()
    return status(volume, cfg)


def run_scrub(volume: Volume, repair: bool, progress: Progress | None = None,
              space: FreeSpace | None = None) -> dict:
    """Scrub the volume (lost chunks in `space` it may rewrite); the report as a dict."""
    return scrub(volume, repair=repair, progress=progress, space=space).to_dict()


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
    return run_scrub(volume, repair, progress, space)


def replace(
    volume: Volume,
    cfg: WarehouseConfig,
    slot: int,
    device: str | None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    max_rate: int | None = None,
) -> dict:
    """Rebuild `slot` onto a new member (or resume an interrupted rebuild of it)."""
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
        capacity = -(-g.member_bytes_needed // (1 << 20)) * (1 << 20)
        member, path, cfg_path = replacement_member(cfg, slot, device, capacity)
        attach_replacement(volume, slot, member, path)
        if cfg.members[slot] != cfg_path:
            cfg.members[slot] = cfg_path
            cfg.save()
    rebuild(volume, slot, progress, stop, max_rate)
    return {"slot": slot, "path": volume.slots[slot].path, "resumed_at_bytes": resumed_at,
            "rebuilt_bytes": g.rows * g.chunk, "state": volume.state()}
