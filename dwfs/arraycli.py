"""`dwfs mkfs|mount|umount|fsck|status|scrub|replace`: the warehouse and its array from the
command line."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from dwfs import control
from dwfs.cliutil import CommandError, err, out, progress_bar
from dwfs.config import ConfigError, WarehouseConfig, load_config
from dwfs.control import control_socket_path
from dwfs.mountopts import parse_options
from dwfs.mounts import canonical, dwfs_mounts, find_mount, fusermount_unmount, pid_alive
from dwfs.sizes import format_size, parse_size
from dwfs.whlock import WarehouseLock
from raid.errors import RaidError

# dwfs.warehouse and dwfs.service (numpy, the array, SQLite) are imported by the commands that
# open the array in this process: `status`, `scrub` and `replace` of a mounted warehouse ask
# its daemon and start in a third of the time without them.

log = logging.getLogger("dwfs")

MOUNT_TIMEOUT = 120.0
UMOUNT_TIMEOUT = 300.0


# --- helpers ------------------------------------------------------------------------------------


def with_volume(
    warehouse: str,
    local: Callable[[Any, WarehouseConfig], Any],
    remote: dict,
    progress: Callable[[int, int], None] | None = None,
    read_only: bool = False,
) -> Any:
    """Run an operation on the warehouse's volume: in this process, or by its mount daemon."""
    cfg = load_config(warehouse)
    lock = WarehouseLock(cfg.directory)
    if lock.try_acquire():
        from dwfs.warehouse import open_volume

        try:
            volume = open_volume(cfg, allow_failed=read_only, read_only=read_only)
            try:
                return local(volume, cfg)
            finally:
                volume.close(write=not read_only)
        finally:
            lock.release()
    sock = control_socket_path(cfg.directory)
    try:
        return control.request(sock, remote, progress)
    except control.ControlError as exc:
        if exc.errno == errno.ECONNREFUSED:  # no daemon answers
            raise CommandError(
                f"warehouse {cfg.directory} is in use by process {lock.holder()}, "
                "which does not answer control requests"
            ) from exc
        raise


def _service() -> Any:
    """dwfs.service, imported only when the array is opened in this process."""
    from dwfs import service

    return service


# --- commands -----------------------------------------------------------------------------------


def cmd_mkfs(args: argparse.Namespace) -> int:
    from dwfs.warehouse import MkfsRequest, mkfs, unused_space
    from raid import levels

    members = len(args.device) if args.device else args.devices
    if not members:
        raise CommandError("give --devices N --device-size SIZE, or --device PATH (repeated)")
    level = args.level
    reason = ""
    if level == "auto":
        survive = args.survive if args.survive is not None else (1 if members < 6 else 2)
        choice = levels.choose_level(members, survive)
        level, reason = choice.level, choice.reason
    elif args.survive is not None and levels.tolerance(level, members) < args.survive:
        raise CommandError(
            f"{level} on {members} members survives {levels.tolerance(level, members)} "
            f"failed members, not {args.survive}"
        )
    req = MkfsRequest(
        directory=args.warehouse,
        level=level,
        chunk_size=parse_size(args.chunk_size),
        backend=args.backend,
        devices=0 if args.device else args.devices,
        device_size=parse_size(args.device_size) if args.device_size else 0,
        device_paths=tuple(args.device or ()),
        raw=args.raw,
        force=args.force,
    )
    with progress_bar("writing member metadata", in_bytes=False) as update:
        cfg, geometry = mkfs(req, progress=update)
    out.print(f"created warehouse [bold]{cfg.directory}[/bold]")
    out.print(f"  level      {geometry.level}" + (f"  (auto: {reason})" if reason else ""))
    out.print(f"  members    {geometry.members} x {cfg.backend}")
    out.print(f"  tolerance  {geometry.tolerance} failed member(s)")
    out.print(f"  chunk      {format_size(geometry.chunk)}")
    out.print(f"  capacity   {format_size(geometry.capacity)} ({geometry.capacity} bytes)")
    for path, extra in unused_space(cfg, geometry) if req.device_paths else []:
        out.print(f"  unused     {format_size(extra)} of {path}: members are used up to the "
                  f"size of the smallest, {format_size(geometry.member_bytes_needed)}",
                  markup=False, highlight=False)
    if req.raw:
        out.print(f"  no filesystem: `dwfs mount --raw {cfg.directory} MOUNTPOINT` mounts the raw "
                  "volume")
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    return mount_warehouse(args.warehouse, args.mountpoint, args.options, raw=args.raw,
                           foreground=args.foreground, debug=args.debug)


def mount_warehouse(warehouse: str, mountpoint: str, options: str = "", raw: bool = False,
                    foreground: bool = False, debug: bool = False) -> int:
    """Mount a warehouse; returns once the mount is ready (or, in the foreground, unmounted)."""
    opts = parse_options(options)
    foreground = foreground or opts.foreground
    debug = debug or opts.debug
    cfg = load_config(warehouse)
    mountpoint = os.path.abspath(mountpoint)
    what = "raw volume" if raw else "filesystem"
    if foreground:
        from dwfs import daemon

        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        return daemon.serve(cfg.directory, mountpoint, None, debug, raw, options)
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "dwfs.daemon", cfg.directory, mountpoint,
           "--ready-fd", str(write_fd), "-o", options]
    if raw:
        cmd.append("--raw")
    if debug:
        cmd.append("--debug")
    with open(os.path.join(cfg.directory, "dwfs.log"), "ab") as logf:
        proc = subprocess.Popen(cmd, pass_fds=(write_fd,), stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=logf, start_new_session=True)
    os.close(write_fd)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    line = b""
    with os.fdopen(read_fd, "rb") as pipe:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 0.5)
            if ready:
                line = pipe.readline()
                break
            if proc.poll() is not None:
                line = pipe.readline()
                break
    text = line.decode(errors="replace").strip()
    if text == "ready" or text.startswith("ready "):
        note = text.removeprefix("ready").strip()
        if note:
            err.print(f"dwfs: {note}")
        out.print(f"mounted {cfg.directory} at {mountpoint} ({what}, pid {proc.pid})")
        return 0
    if not text:
        if proc.poll() is None:
            proc.terminate()
            raise CommandError(f"the mount did not become ready in {MOUNT_TIMEOUT:.0f} s; "
                               f"see {cfg.directory}/dwfs.log")
        text = (f"the mount daemon exited with status {proc.returncode}; "
                f"see {cfg.directory}/dwfs.log")
    proc.wait()
    raise CommandError(text.removeprefix("error: "))


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = canonical(args.mountpoint)
    entry = find_mount(mountpoint)
    if entry is None:  # a warehouse may be named instead, as umount(8) takes a device
        entry = next((m for m in dwfs_mounts()
                      if os.path.realpath(m.source) == os.path.realpath(args.mountpoint)), None)
        if entry is None:
            raise CommandError(f"{mountpoint} is not mounted")
        mountpoint = entry.mountpoint
    if entry.fstype != "fuse.dwfs":
        raise CommandError(f"{mountpoint} is a {entry.fstype} mount, not dwfs")
    sock = control_socket_path(entry.source)
    pid = None
    try:
        pid = control.request(sock, {"op": "ping"}, timeout=UMOUNT_TIMEOUT)["pid"]
        control.request(sock, {"op": "flush"}, timeout=UMOUNT_TIMEOUT)
    except control.ControlError as exc:
        what = "does not answer" if pid is None else "could not flush"
        err.print(f"dwfs: the daemon of {mountpoint} {what} ({exc}); unmounting anyway")
    result = fusermount_unmount(mountpoint)
    if result.returncode != 0:
        if pid is not None:
            raise CommandError(f"cannot unmount {mountpoint}: {result.stderr.strip()}")
        fusermount_unmount(mountpoint, lazy=True)
    if pid is not None:
        deadline = time.monotonic() + UMOUNT_TIMEOUT
        while pid_alive(pid):
            if time.monotonic() > deadline:
                raise CommandError(f"the daemon (pid {pid}) did not exit after unmounting")
            time.sleep(0.05)
    out.print(f"unmounted {mountpoint}")
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    """Exit status as e2fsck: 0 clean, 1 errors corrected, 4 errors left, 8 cannot check."""
    try:
        return _fsck(args)
    except (CommandError, ConfigError, RaidError, OSError) as exc:
        print(f"dwfs: error: {exc}", file=sys.stderr)
        return 8


def _fsck(args: argparse.Namespace) -> int:
    from dwfs.warehouse import holds_filesystem, meta_path, open_volume, refresh_metadata_copy
    from vfs import fsck as vfsck
    from vfs.errors import FSError
    from vfs.intentlog import IntentLog
    from vfs.metacopy import latest_copy, restore_copy
    from vfs.metadb import MetaDB

    cfg = load_config(args.warehouse)
    lock = WarehouseLock(cfg.directory)
    if not lock.try_acquire():
        raise CommandError(f"warehouse {cfg.directory} is in use by process {lock.holder()} "
                           "(mounted?); unmount it before fsck")
    try:
        if not holds_filesystem(cfg):
            raise CommandError(
                f"{cfg.directory} holds a raw volume only, not a filesystem (no metadata "
                "database, no copy of one on the volume): nothing for fsck to check; "
                "`dwfs scrub` checks the volume")
        volume = open_volume(cfg, allow_failed=not args.repair, read_only=not args.repair)
        try:
            counts_before = volume.status()["members"]  # (kept from earlier mounts)
            path = meta_path(cfg)
            restored = None
            db = None
            why = None
            try:
                db = MetaDB(path)
                errors = db.integrity_errors()
                if errors:
                    why = f"the metadata database is corrupt ({errors[0]})"
                    db.close()
                    db = None
            except FSError as exc:
                why = str(exc.message)
            if db is None:
                copy = latest_copy(volume)
                when = f"copy {copy[0].generation} taken {copy[0].age_text()}" if copy else None
                if not args.repair:
                    err.print(f"dwfs fsck: {why}")
                    if when:
                        err.print(f"  the volume holds a metadata {when}; "
                                  "`dwfs fsck --repair` restores it")
                    return 4
                if copy is None:
                    raise CommandError(f"{why}, and the volume holds no intact metadata copy")
                if os.path.exists(path):
                    aside = path + ".damaged"
                    os.replace(path, aside)
                    err.print(f"dwfs fsck: moved the damaged database aside to {aside}")
                restored = restore_copy(volume, path)
                out.print(f"restored the metadata from the {when}; changes made after it are "
                          "lost")
                db = MetaDB(path)
            try:
                # Writes an fsync committed to the intent log but the volume never got: a
                # repair writes them, a check reads through them.
                logged = IntentLog.opened(volume, db, write=args.repair)
                with progress_bar("verifying file data") as update:
                    report = vfsck.check(db, logged, repair=args.repair,
                                         verify_data=args.verify_data or restored is not None,
                                         progress=update)
                report.problems += _member_faults(volume, args.repair, counts_before)
                doc = report.to_dict()
                doc["restored_from_copy"] = (
                    {"generation": restored.generation, "time_ns": restored.time_ns,
                     "taken": restored.age_text()} if restored else None)
                doc["damaged_paths"] = {str(i): vfsck.paths_of(db, i)
                                        for i in report.damaged_files}
                if args.repair and (not report.clean or restored is not None):
                    refresh_metadata_copy(db, volume)
            finally:
                db.close()
        finally:
            volume.close(write=args.repair)
    finally:
        lock.release()
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        out.print(f"{doc['inodes']} inodes, {doc['extents']} extents"
                  + (f", {doc['extents_verified']} verified" if doc["extents_verified"] else ""))
        for line in doc["problems"]:
            out.print(f"  {'fixed' if args.repair else 'found'}: {line}")
        if doc["orphans"]:
            out.print(f"  {len(doc['orphans'])} orphan inode(s), unlinked while open when the "
                      "filesystem last stopped: "
                      + ("freed" if args.repair else "the next mount frees them"))
        for ino, paths in doc["damaged_paths"].items():
            out.print(f"  damaged: inode {ino} {' '.join(paths)}")
        out.print("clean" if report.clean and not restored else
                  "errors corrected" if args.repair else "errors found; run with --repair")
    if report.clean and restored is None:
        return 0
    return 1 if args.repair else 4


def _member_faults(volume: Any, repair: bool, before: list[dict]) -> list[str]:
    """What fsck's reads met on the members (their error counts grew from `before`): chunks
    that failed their checksums or could not be read. Redundancy covered them (the files read
    correctly), but a member still holds them unless fsck repaired them; fsck reads file
    data only, parity is scrub's."""
    lines = []
    for m, b in zip(volume.status()["members"], before, strict=True):
        bad, unread, fixed = (m[k] - b[k] for k in ("checksum_errors", "read_errors",
                                                     "repaired"))
        if not (bad or unread):
            continue
        if repair:
            what = (f"{bad} chunk(s) failed their checksums, {unread} read error(s); {fixed} "
                    "chunk(s) rewritten from redundancy (fsck reads file data only: "
                    "`dwfs scrub` checks parity too)")
        else:
            what = (f"{bad} read(s) of its chunks failed their checksums, {unread} read "
                    "error(s); the files read correctly from redundancy. `dwfs fsck --repair` "
                    "rewrites the file data, `dwfs scrub --repair` parity too")
        lines.append(f"member slot {m['slot']} ({m['path']}): {what}")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    if args.warehouse is not None:
        docs = [_status_of(args.warehouse)]
    else:  # every mounted warehouse, as `zpool status` shows every pool
        sources = [m.source for m in dwfs_mounts()]
        if not sources:
            raise CommandError("no dwfs warehouse is mounted; name one: dwfs status WAREHOUSE")
        docs, failed = [], 0
        for source in sources:  # one that cannot answer does not hide the others
            try:
                docs.append(_status_of(source))
            except (CommandError, ConfigError, control.ControlError, RaidError) as exc:
                err.say(f"dwfs: error: {source}: {exc}")
                failed = 1
    if args.json:
        print(json.dumps(docs[0] if args.warehouse is not None else docs, indent=2))
    else:
        for i, doc in enumerate(docs):
            if i:
                out.print()
            _print_status(doc)
    worst = max((0 if d["state"] != "failed" and not d.get("stopped") else 2 for d in docs),
                default=0)
    return max(worst, failed if args.warehouse is None else 0)


def _status_of(warehouse: str) -> dict:
    return with_volume(warehouse, lambda v, c: _service().status(v, c), {"op": "status"},
                       read_only=True)


def _print_status(doc: dict) -> None:
    from rich.table import Table

    style = {"clean": "green", "degraded": "yellow", "rebuilding": "yellow", "failed": "red"}
    out.print(f"warehouse  {doc['warehouse']}" + (
        f"  (mounted at {doc['mountpoint']})" if doc.get("mountpoint") else ""))
    out.print(f"level      {doc['level']}, tolerates {doc['tolerance']} failed member(s)")
    out.print(f"capacity   {format_size(doc['capacity_bytes'])} ({doc['capacity_bytes']} bytes)")
    out.print(f"state      [{style[doc['state']]}]{doc['state']}[/]")
    out.print(f"scrubbed   {_scrub_line(doc.get('last_scrub'))}")
    out.print(f"spares     {', '.join(doc.get('spares') or []) or 'none'}", markup=False,
              highlight=False)
    if doc.get("stopped"):
        out.print(f"filesystem [red]stopped[/]: {doc['stopped']}; unmount and mount it again")
    if doc.get("metadata_room"):
        out.print(f"metadata   [yellow]no room for new files[/]: {doc['metadata_room']}")
    disks = any(m.get("disk") for m in doc["members"])
    table = Table("slot", "state", "path", *(["disk"] if disks else []), "read err",
                  "checksum err", "repaired", "note")
    table.columns[2].overflow = "fold"
    for m in doc["members"]:
        note = m["reason"]
        if m["state"] == "rebuilding":
            note = f"rebuilt {format_size(m['rebuilt_bytes'])}"
        table.add_row(str(m["slot"]), m["state"], _short(m["path"], doc["warehouse"]),
                      *([m.get("disk") or ""] if disks else []), str(m["read_errors"]),
                      str(m["checksum_errors"]), str(m["repaired"]), note)
    out.print(table)
    for note in doc.get("assembly_notes") or []:
        out.print(f"assembled: {note}", markup=False, highlight=False)
    if any(m["read_errors"] or m["checksum_errors"] or m["repaired"] for m in doc["members"]):
        out.print("error counts are kept from one mount to the next, since each member was "
                  "added or last cleared (`dwfs clear`)")


def _scrub_line(last: dict | None) -> str:
    """When the last scrub ran and what it found, for `dwfs status`."""
    if not last:
        return "never (`dwfs scrub` reads every chunk and parity and checks them)"
    from vfs.attrs import moment_text

    found = "no errors" if not last["errors"] else (
        f"{last['errors']} error(s), {last['fixed']} fixed, {last['unrecoverable']} "
        "unrecoverable")
    return (f"{moment_text(last['started'])}, {format_size(last['bytes_checked'])} in "
            f"{last['seconds']:.0f} s: {found}")


def _short(path: str, warehouse: str) -> str:
    """A member path relative to its warehouse when it lies inside it."""
    rel = os.path.relpath(path, warehouse)
    return path if rel.startswith("..") else rel


def cmd_clear(args: argparse.Namespace) -> int:
    doc = with_volume(args.warehouse, lambda v, c: _service().clear(v, c), {"op": "clear"})
    out.print(f"cleared the error counts of {len(doc['members'])} members of "
              f"{doc['warehouse']}")
    return 0


def cmd_spare(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.path)
    if args.spare_command == "add":
        doc = with_volume(args.warehouse,
                          lambda v, c: _service().add_spare(v, c, path, args.force),
                          {"op": "spare-add", "path": path, "force": args.force},
                          read_only=True)
        out.say(f"spare {path} added; spares: {', '.join(doc['spares'])}")
    else:
        doc = with_volume(args.warehouse, lambda v, c: _service().remove_spare(c, path),
                          {"op": "spare-rm", "path": path}, read_only=True)
        out.say(f"spare {path} removed (the disk or file stays as it is); spares: "
                f"{', '.join(doc['spares']) or 'none'}")
    return 0


def cmd_notify(args: argparse.Namespace) -> int:
    from dwfs.notify import Notifier, trial_event

    cfg = load_config(args.warehouse)
    n = cfg.notify
    if not n.enabled:
        raise CommandError(f"{cfg.path} has no [notify] settings (mail_to, command): "
                           "nothing to send")
    problems = Notifier(n, cfg.directory).deliver(trial_event(cfg.directory))
    for line in problems:
        err.say(f"dwfs: {line}")
    if problems:
        return 1
    done = ([f"sent a test message to {', '.join(n.mail_to)}"] if n.mail_to else []) + \
        ([f"ran {n.command}"] if n.command else [])
    out.say(" and ".join(done))
    return 0


def cmd_scrub(args: argparse.Namespace) -> int:
    with progress_bar("scrubbing" + (" and repairing" if args.repair else ""),
                      in_bytes=False) as update:
        report = with_volume(
            args.warehouse,
            lambda v, c: _service().scrub_unmounted(v, c, args.repair, update),
            {"op": "scrub", "repair": args.repair},
            progress=update,
        )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_scrub(report)
    if report["unrecoverable"]:
        return 3
    return 0 if report["errors"] == 0 or args.repair else 1


def _print_scrub(report: dict) -> None:
    from rich.table import Table

    table = Table("slot", "path", "checksum", "read", "parity", "table", "fixed",
                  "unrecoverable")
    table.columns[1].overflow = "fold"
    for m in report["members"]:
        table.add_row(str(m["slot"]), m["path"], str(m["checksum_errors"]), str(m["read_errors"]),
                      str(m["parity_mismatches"]), str(m["table_errors"]), str(m["fixed"]),
                      str(m["unrecoverable"]))
    out.print(table)
    for p in report["problems"]:
        where = f"row {p['row']}" if p["row"] is not None else "metadata"
        out.print(f"  slot {p['slot']} {where}: {p['kind']}" + (" - fixed" if p["fixed"] else ""))
    verdict = "no errors" if report["errors"] == 0 else (
        f"{report['errors']} error(s), {report['fixed']} fixed, "
        f"{report['unrecoverable']} unrecoverable")
    out.print(f"scrub checked {report['rows_checked']} rows "
              f"({format_size(report['bytes_checked'])} of chunks): {verdict}")


def cmd_replace(args: argparse.Namespace) -> int:
    rate = parse_size(args.max_rate) if args.max_rate else None
    with progress_bar(f"rebuilding slot {args.slot}") as update:
        result = with_volume(
            args.warehouse,
            lambda v, c: _service().replace(v, c, args.slot, args.device, update, None, rate,
                                            args.force),
            {"op": "replace", "slot": args.slot, "device": args.device, "max_rate": rate,
             "force": args.force},
            progress=update,
        )
    if result["resumed_at_bytes"]:
        out.print(f"resumed the interrupted rebuild at {format_size(result['resumed_at_bytes'])}")
    out.print(f"slot {result['slot']} rebuilt onto {result['path']}; array {result['state']}")
    return 0
