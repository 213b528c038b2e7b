"""A warehouse on disk: creating one (mkfs), locking it, and assembling its volume."""

from __future__ import annotations

import datetime
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import apsw

from backends.member import Member, MemberIOError
from dwfs.config import CONFIG_NAME, WarehouseConfig
from raid.errors import ArrayCreateError, RaidError
from vfs.errors import FSError
from vfs.metadb import META_NAME, MetaDB

if TYPE_CHECKING:
    from raid.geometry import Geometry
    from raid.volume import Volume
    from vfs.fs import Filesystem

# The array and filesystem modules (numpy, the codecs) are imported where they are used: the
# command line imports this module, and commands that need neither start faster without them.

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class WarehouseError(RaidError):
    """A warehouse operation that cannot be done as asked."""

    def __init__(self, message: str, code: int = errno.EINVAL) -> None:
        super().__init__(message, code)


@dataclass
class MkfsRequest:
    """What `dwfs mkfs` was asked for."""

    directory: str
    level: str
    chunk_size: int
    backend: str = "file"
    devices: int = 0
    device_size: int = 0
    device_paths: tuple[str, ...] = ()
    raw: bool = False  # the raw volume only: no filesystem on it (`dwfs mount --raw` uses it)
    force: bool = False  # overwrite --device paths that hold a filesystem or a dwfs member


def mkfs(req: MkfsRequest, progress: Progress | None = None) -> tuple[WarehouseConfig, Geometry]:
    """Create a warehouse directory, its members and a new array; nothing is left on failure."""
    from backends import BACKENDS, create_member, open_member
    from raid.assemble import create_array

    directory = os.path.abspath(req.directory)
    if os.path.exists(os.path.join(directory, CONFIG_NAME)):
        raise WarehouseError(f"{directory} already holds a warehouse ({CONFIG_NAME} exists)",
                             errno.EEXIST)
    if req.backend not in BACKENDS:
        raise WarehouseError(f"unknown backend {req.backend!r}; known: {', '.join(BACKENDS)}")
    if req.device_paths and req.devices:
        raise WarehouseError("give either --devices N --device-size SIZE or --device PATH ...")
    if not req.device_paths and (req.devices < 1 or req.device_size < 1):
        raise WarehouseError("give --devices N and --device-size SIZE, or --device PATH ...")
    made_dir = not os.path.exists(directory)
    os.makedirs(directory, exist_ok=True)
    created: list[str] = []
    members: list[Member] = []
    try:
        if req.device_paths:
            rel = [os.path.abspath(p) for p in req.device_paths]
            _refuse_repeats(rel)
            for p in rel:
                if not os.path.exists(p):
                    raise WarehouseError(f"--device {p} does not exist", errno.ENOENT)
                _refuse_kind(p)
                members.append(open_member(p))
                _refuse_in_use(p, members[-1], None, req.force, "mkfs")
        else:
            os.makedirs(os.path.join(directory, "members"), exist_ok=True)
            ext = "img" if req.backend == "file" else "sqlite"
            rel = [os.path.join("members", f"member-{i}.{ext}") for i in range(req.devices)]
            for r in rel:
                p = os.path.join(directory, r)
                members.append(create_member(req.backend, p, req.device_size))
                created.append(p)
        uuid, geometry = create_array(members, req.level, req.chunk_size, progress=progress)
        cfg = WarehouseConfig(
            directory=directory,
            array_uuid=uuid,
            level=req.level,
            chunk_size=req.chunk_size,
            backend=req.backend,
            members=rel,
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )
        cfg.save()
        _close_all(members)  # (a block device is claimed while open: the volume reopens it)
        if not req.raw:
            format_filesystem(cfg)
        return cfg, geometry
    except (RaidError, ValueError, OSError) as exc:
        for p in [*created, os.path.join(directory, CONFIG_NAME),
                  os.path.join(directory, META_NAME)]:
            _remove_quietly(p)
        if made_dir:
            _remove_tree_quietly(directory)
        if isinstance(exc, RaidError):
            raise
        raise ArrayCreateError(str(exc)) from exc
    finally:
        _close_all(members)


def _close_all(members: list[Member]) -> None:
    """Close every member of the list and empty it (logging what fails)."""
    for m in members:
        try:
            m.close()
        except MemberIOError as exc:
            log.warning("closing new member %s failed: %s", m.path, exc)
    members.clear()


def _remove_quietly(path: str) -> None:
    for p in (path, path + "-wal", path + "-shm"):
        try:
            os.unlink(p)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cleanup: cannot remove %s: %s", p, exc)


def _remove_tree_quietly(directory: str) -> None:
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            _remove_quietly(os.path.join(root, name))
        for name in dirs:
            try:
                os.rmdir(os.path.join(root, name))
            except OSError as exc:
                log.warning("cleanup: cannot remove %s: %s", name, exc)
    try:
        os.rmdir(directory)
    except OSError as exc:
        log.warning("cleanup: cannot remove %s: %s", directory, exc)


def open_volume(cfg: WarehouseConfig, allow_failed: bool = False, resync: bool = True,
                read_only: bool = False) -> Volume:
    """Assemble the warehouse's array from the members listed in its config (with
    `read_only`, nothing is ever written to them)."""
    from backends import open_member
    from backends.devices import block_devices, is_block_device
    from raid.assemble import assemble

    listed = cfg.member_paths()
    # Disks are named in the order the kernel finds them, which can change from one boot to
    # the next: a slot whose member is not at its /dev path is looked for on every disk.
    on_devices = any(p.startswith("/dev/") or is_block_device(p) for p in listed)
    volume = assemble(listed, cfg.array_uuid, open_member, allow_failed=allow_failed,
                      resync=resync, read_only=read_only,
                      search=block_devices if on_devices else None)
    _record_members(cfg, volume, listed, read_only)
    return volume


def _record_members(cfg: WarehouseConfig, volume: Volume, listed: list[str],
                    read_only: bool) -> None:
    """Make dwfs.toml list each member where assembly found it, and what disk each present
    member is (unless `read_only`: then only the notes say what would change)."""
    from backends.devices import describe

    was_members, was_disks = list(cfg.members), list(cfg.disks)
    moved = [s.path for s in volume.slots] != listed
    for s in volume.slots:
        if moved:  # a path dwfs.toml already had keeps its spelling
            cfg.members[s.index] = (was_members[listed.index(s.path)] if s.path in listed
                                    else s.path)
        if s.member is not None:
            cfg.disks[s.index] = describe(s.path)
    if cfg.members == was_members and cfg.disks == was_disks:
        return
    if read_only:
        cfg.members, cfg.disks = was_members, was_disks
        if moved:
            volume.assembly_notes.append(f"{CONFIG_NAME} left as it is (opened read-only)")
        return
    try:
        cfg.save()
    except OSError as exc:
        cfg.members, cfg.disks = was_members, was_disks
        log.error("%s: cannot record where the members were found: %s", cfg.path, exc)
        if moved:
            volume.assembly_notes.append(f"{CONFIG_NAME} could not be updated: {exc.strerror}")
        return
    if moved:
        log.warning("%s now lists the members where they were found", cfg.path)
        volume.assembly_notes.append(f"{CONFIG_NAME} updated")


def unused_space(cfg: WarehouseConfig, geometry: Geometry) -> list[tuple[str, int]]:
    """(path, bytes) of each member that holds more than 1% more than the array uses of it:
    members of different sizes are each used only up to the smallest."""
    from backends.devices import size_of

    unused = []
    for path in cfg.member_paths():
        try:
            extra = size_of(path) - geometry.member_bytes_needed
        except OSError as exc:
            log.warning("cannot tell the size of member %s: %s", path, exc)
            continue
        if extra > max(geometry.member_bytes_needed // 100, geometry.chunk):
            unused.append((path, extra))
    return unused


def meta_path(cfg: WarehouseConfig) -> str:
    """Where the warehouse's metadata database lives."""
    return os.path.join(cfg.directory, META_NAME)


def require_filesystem(cfg: WarehouseConfig) -> None:
    """Raise WarehouseError, saying what to do, unless the warehouse has its metadata
    database; nothing is written (the volume is looked at read-only)."""
    if not os.path.exists(meta_path(cfg)):
        raise _no_database(cfg, holds_filesystem(cfg))


def _no_database(cfg: WarehouseConfig, has_copy: bool) -> WarehouseError:
    if not has_copy:
        return WarehouseError(
            f"{cfg.directory} holds no filesystem (no metadata database, no copy of one on "
            "the volume): it holds a raw volume only (made by `dwfs mkfs --raw`, or by an "
            "earlier dwfs); `dwfs mount --raw` mounts it", errno.ENOENT)
    return WarehouseError(
        f"the metadata database {meta_path(cfg)} is missing; `dwfs fsck --repair "
        f"{cfg.directory}` restores it from the copy on the volume", errno.ENOENT)


def holds_filesystem(cfg: WarehouseConfig) -> bool:
    """Whether the warehouse holds a dwfs filesystem: a metadata database, or a copy of one on
    its volume (looked for through the volume opened read-only). Without either it holds a raw
    volume only (`dwfs mkfs --raw`, or a warehouse of an earlier dwfs)."""
    from vfs.metacopy import latest_copy

    if os.path.exists(meta_path(cfg)):
        return True
    volume = open_volume(cfg, allow_failed=True, read_only=True)
    try:
        return latest_copy(volume) is not None
    finally:
        volume.close(write=False)


def format_filesystem(cfg: WarehouseConfig) -> None:
    """Write an empty filesystem (root directory and a first metadata copy) onto a new array."""
    from vfs.fs import Filesystem

    volume = open_volume(cfg)
    try:
        db = MetaDB(meta_path(cfg), create=True)
        try:
            Filesystem.format(db, os.getuid(), os.getgid())
            refresh_metadata_copy(db, volume)
        finally:
            db.close()
    finally:
        volume.close()


def refresh_metadata_copy(db: MetaDB, volume) -> None:
    """Write a new copy of the metadata database onto the volume (offline)."""
    from vfs.fs import Filesystem
    from vfs.metacopy import write_copy

    fs = Filesystem(db, volume)
    write_copy(fs)
    fs.close()


def open_filesystem(cfg: WarehouseConfig, volume: Volume, read_only: bool = False) -> Filesystem:
    """The filesystem stored in an assembled warehouse volume (with `read_only`, its metadata
    database is opened read-only)."""
    from vfs.fs import Filesystem
    from vfs.metacopy import latest_copy

    path = meta_path(cfg)
    if not os.path.exists(path):
        raise _no_database(cfg, latest_copy(volume) is not None)
    db = None
    try:
        db = MetaDB(path, read_only=read_only)
        return Filesystem(db, volume)  # reads the whole block map: finds most damage
    except (FSError, apsw.Error) as exc:
        if db is not None:
            db.close()
        if isinstance(exc, FSError) and exc.errno == errno.EROFS:
            raise WarehouseError(exc.message, errno.EROFS) from exc  # intact, but too old
        raise WarehouseError(
            f"the metadata database {path} is damaged ({exc}); `dwfs fsck --repair "
            f"{cfg.directory}` restores it from the copy on the volume", errno.EIO) from exc


def _refuse_repeats(paths: list[str]) -> None:
    """Raise WarehouseError if two of `paths` are the same file or disk (also through a link)."""
    from backends.devices import identity

    seen: dict[tuple[object, ...], str] = {}
    for p in paths:
        key = identity(p)
        if key in seen:
            same = "given twice" if seen[key] == p else f"the same as --device {seen[key]}"
            raise WarehouseError(f"--device {p} is {same}", errno.EINVAL)
        seen[key] = p


def _refuse_kind(path: str) -> None:
    """Raise WarehouseError unless `path` is a regular file or a block device."""
    from backends.devices import kind_problem

    problem = kind_problem(path)
    if problem is not None:
        raise WarehouseError(f"--device {path} cannot be a member: {problem}", errno.EINVAL)


def _refuse_in_use(path: str, member: Member, array_uuid: str | None, force: bool,
                   command: str, spare: bool = False) -> None:
    """Raise WarehouseError if `path` (open as `member`) holds a filesystem, a partition table
    or a member of a dwfs array other than `array_uuid`, unless `force`. A `spare` (checked
    when it was added) is overwritten unless it now holds another array's member."""
    from dwfs.devicecheck import contents

    found = contents(path, member)
    if found is None or (array_uuid is not None and found.array_uuid == array_uuid):
        return
    if force or (spare and found.array_uuid is None):
        log.warning("%s: overwriting %s, which holds %s (%s)", command, path, found.what,
                    "--force" if force else "a spare")
        return
    raise WarehouseError(f"--device {path} holds {found.what}; {command} would destroy it "
                         "(--force overwrites it)", errno.EBUSY)


def replacement_member(cfg: WarehouseConfig, slot: int, device: str | None,
                       capacity: int, force: bool = False,
                       spare: bool = False) -> tuple[Member, str, str]:
    """A member for `slot`: the given device, or a fresh one where the old member was.

    Returns (member, absolute path, path as written in the config). An old member file at the
    configured place is moved aside as `<name>.replaced` rather than deleted. A device that
    holds something other than this array's own member is refused unless `force` (or, for
    a `spare`, unless it is another array's member).
    """
    from backends import create_member, open_member
    from backends.devices import identity

    if device:
        path = os.path.abspath(device)
        if not os.path.exists(path):
            raise WarehouseError(f"--device {path} does not exist", errno.ENOENT)
        listed = {identity(p): i for i, p in enumerate(cfg.member_paths())}
        other = listed.get(identity(path))
        if other is not None and other != slot:
            raise WarehouseError(f"--device {path} is the member in slot {other} of this array",
                                 errno.EBUSY)
        _refuse_kind(path)
        member = open_member(path)
        try:
            _refuse_in_use(path, member, cfg.array_uuid, force, "replace", spare)
        except WarehouseError:
            member.close()
            raise
        return member, path, path
    path = cfg.member_path(slot)
    if os.path.exists(path):
        aside = path + ".replaced"
        os.replace(path, aside)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.replace(path + suffix, aside + suffix)
        log.warning("slot %d: old member moved aside to %s", slot, aside)
    member = create_member(cfg.backend, path, capacity)
    return member, path, cfg.members[slot]
