"""The mount daemon: assembles the warehouse's volume, serves FUSE and the control socket.

Started by `dwfs mount` as `python -m dwfs.daemon ... --ready-fd N`: it writes one line to that
pipe when the mount is ready ("ready") or has failed ("error: ..."), so the command returns only
once the mount can be used.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import gc
import logging
import logging.handlers
import os
import signal
import sys
import threading
import time

import numpy as np
import trio

from dwfs import control_server, service
from dwfs.config import ConfigError, WarehouseConfig, load_config
from dwfs.control import control_socket_path
from dwfs.fusefs import FuseOperations
from dwfs.fusesession import Session
from dwfs.mountopts import MountOptions, parse_options
from dwfs.mounts import is_mounted
from dwfs.notify import Event, HealthWatch, Notifier
from dwfs.rawfs import RawOperations
from dwfs.warehouse import (
    WarehouseError,
    holds_filesystem,
    open_filesystem,
    open_volume,
    require_filesystem,
)
from dwfs.whlock import WarehouseLock
from dwfs.writebehind import WriteBehind
from raid.errors import RaidError
from raid.rebuild import RebuildStopped
from vfs.attrs import Caller
from vfs.fs import Filesystem
from vfs.metacopy import write_copy
from vfs.view import View

log = logging.getLogger("dwfs.daemon")


class Daemon:
    """One mounted warehouse: its volume, FUSE session and control server."""

    def __init__(self, cfg: WarehouseConfig, session: Session, volume, mountpoint: str,
                 fs: Filesystem | None = None) -> None:
        self.cfg = cfg
        self.session = session
        ops = session.handlers
        self.ops = ops
        self.volume = volume
        self.fs = fs
        self.last_copy = time.monotonic()
        self.commits_since_copy = 0
        self.mountpoint = mountpoint
        self.sock_path = control_socket_path(cfg.directory)
        self.rebuilding: set[int] = set()
        self.refused_spares: set[str] = set()  # spares a rebuild could not use: not retried
        self.stopping = threading.Event()
        self.notifier = Notifier(cfg.notify, cfg.directory, mountpoint)
        self.health = HealthWatch()
        self.view: View | None = ops.fs if isinstance(ops, FuseOperations) else None
        self.read_only = volume.read_only
        if self.view is not None:
            self.view.ghosts.dropped_hooks.append(
                lambda ino: _invalidate(session.invalidate_inode, ino))

    def handle(self, op: dict, progress) -> object:
        """Carry out one control request (in a worker thread)."""
        name = op.get("op")
        if self.read_only and (name in WRITING_REQUESTS or (name == "scrub" and op.get("repair"))):
            raise WarehouseError(f"{self.mountpoint} is mounted read-only: no {name}"
                                 f"{' --repair' if name == 'scrub' else ''}", errno.EROFS)
        if name == "ping":
            return {"pid": os.getpid(), "mountpoint": self.mountpoint,
                    "warehouse": self.cfg.directory}
        if name == "status":
            doc = service.status(self.volume, self.cfg)
            doc["mountpoint"] = self.mountpoint
            doc["pid"] = os.getpid()
            doc["mode"] = "filesystem" if self.fs is not None else "raw"
            doc.update(self._filesystem_health())
            return doc
        if name == "clear":
            return service.clear(self.volume, self.cfg)
        if name == "spare-add":
            return service.add_spare(self.volume, self.cfg, str(op["path"]),
                                     bool(op.get("force")))
        if name == "spare-rm":
            return service.remove_spare(self.cfg, str(op["path"]))
        if name == "flush":
            self.ops.sync()
            return {"pid": os.getpid()}
        if name == "scrub":
            space = self.fs.free_space() if self.fs is not None else None
            return service.run_scrub(self.volume, self.cfg, bool(op.get("repair")), progress,
                                     space)
        if name == "replace":
            slot = int(op["slot"])
            if slot in self.rebuilding:
                raise WarehouseError(f"slot {slot} is already being rebuilt; see dwfs status",
                                     errno.EBUSY)
            self.rebuilding.add(slot)
            try:
                return service.replace(self.volume, self.cfg, slot, op.get("device"), progress,
                                       self.stopping, op.get("max_rate"),
                                       bool(op.get("force")), bool(op.get("spare")))
            finally:
                self.rebuilding.discard(slot)
        if name in ("smart-list", "ghost-import", "ghost-sync") and self.view is None:
            raise WarehouseError(f"{self.mountpoint} is a raw volume mount: no {name}",
                                 errno.EINVAL)
        if name == "smart-list":
            return self.view.smart_folders()
        if name in ("ghost-import", "ghost-sync"):
            return self._ghost_request(name, op, progress)
        raise ValueError(f"unknown control request {name!r}")

    def _ghost_request(self, name: str, op: dict, progress) -> dict:
        """Import a source tree as ghosts, or apply a watcher's changes, durably (committed
        before the answer), then make the kernel forget what it cached of the names and files
        that changed."""
        view = self.view
        dest = view.fs.resolve_dir(str(op["dest"]))
        if dest is None:
            raise WarehouseError(f"{op['dest']} is not a directory in the mount", errno.ENOTDIR)
        caller = Caller(int(op.get("uid", os.getuid())), int(op.get("gid", os.getgid())))
        if name == "ghost-import":
            report = view.import_ghosts(dest, str(op["source"]), caller, progress)
        else:
            report = view.sync_ghosts(dest, str(op["source"]), caller, list(op["changes"]))
        view.commit()  # the command's success means the ghosts survive a crash
        for parent, entry in report.touched_names:
            _invalidate(self.session.invalidate_entry, parent, entry)
        for ino in report.touched_inodes:
            _invalidate(self.session.invalidate_inode, ino)
        return report.summary()

    async def run(self, ready) -> None:
        # Long requests (a rebuild, a scrub, an import) run one at a time; quick ones (status,
        # flush, ping, smart-list) are answered meanwhile, so `dwfs status` follows a rebuild.
        long, quick = trio.CapacityLimiter(1), trio.CapacityLimiter(QUICK_REQUESTS_AT_ONCE)

        def limiter_for(op: dict) -> trio.CapacityLimiter:
            return long if op.get("op") in LONG_REQUESTS else quick

        async with trio.open_nursery() as nursery:
            await nursery.start(control_server.serve, self.sock_path, self.handle, limiter_for)
            nursery.start_soon(self._signals, nursery)
            nursery.start_soon(self._watch_members, nursery)
            if self.fs is not None and not self.read_only:
                nursery.start_soon(self._commit_periodically)
            if self.view is not None and not self.read_only:
                nursery.start_soon(self._seal_ghosts)
            for s in self.volume.slots:
                if s.state == "rebuilding" and not self.read_only:
                    nursery.start_soon(self._resume_rebuild, s.index)
            ready()
            nursery.start_soon(trio.to_thread.run_sync, self._warm_codec)
            try:
                await trio.to_thread.run_sync(self.session.serve)
            finally:
                self.stopping.set()  # background work checkpoints and returns
                nursery.cancel_scope.cancel()
                self.notifier.close(NOTIFY_CLOSE_SECONDS)

    async def _resume_rebuild(self, slot: int) -> None:
        """Finish a rebuild that an earlier run left part way, in the background."""
        log.info("slot %d: resuming its interrupted rebuild in the background", slot)
        try:
            await trio.to_thread.run_sync(self.handle, {"op": "replace", "slot": slot},
                                          lambda done, total: None)
        except RebuildStopped as exc:
            log.info("%s; it resumes at the next mount", exc)
        except OSError as exc:
            log.error("slot %d: background rebuild failed: %s", slot, exc)

    def _warm_codec(self) -> None:
        """Load the compiled parity kernels now rather than on the first write (~2 s), then
        leave every object made so far out of garbage collection (`_freeze_startup_objects`).

        Without the volume's lock: the kernels keep no state between calls (their loading has
        its own lock), and holding it kept the first read after a mount waiting 0.45-0.7 s."""
        codec = self.volume.codec
        codec.encode(np.zeros((codec.k, 64), dtype=np.uint8))
        _freeze_startup_objects()  # (the kernels' objects are among them now)

    async def _commit_periodically(self) -> None:
        """Make changes durable every few seconds; refresh the metadata copy now and then."""
        assert self.fs is not None
        while True:
            await trio.sleep(COMMIT_SECONDS)
            try:
                if self.fs.needs_commit():
                    await trio.to_thread.run_sync(self.fs.commit, True)  # with a head start
                    self.commits_since_copy += 1
                if (self.commits_since_copy
                        and time.monotonic() - self.last_copy > METACOPY_SECONDS):
                    await trio.to_thread.run_sync(write_copy, self.fs)
                    self.commits_since_copy = 0
                    self.last_copy = time.monotonic()
            except OSError as exc:
                log.error("background commit of %s failed: %s", self.cfg.directory, exc)

    async def _seal_ghosts(self) -> None:
        """Take the content hashes of newly imported ghosts in the background."""
        assert self.view is not None
        while True:
            try:
                looked_at = await trio.to_thread.run_sync(self.view.ghosts.seal_some)
            except OSError as exc:
                log.error("taking ghost content hashes failed: %s", exc)
                looked_at = 0
            if not looked_at:
                await trio.sleep(SEAL_IDLE_SECONDS)

    async def _watch_members(self, nursery: trio.Nursery) -> None:
        """Notice members that vanish (deleted, detached) even while nobody asks for status,
        tell what changed, and rebuild each slot out of service onto a spare while there is
        one: a member that fails, one already missing at mount, or a slot that was waiting
        when a spare is added (as md starts recovery onto a spare)."""
        while True:
            await trio.sleep(MEMBER_CHECK_SECONDS)
            await trio.to_thread.run_sync(self._check_members)
            for slot, spare in self._spares_to_take():
                nursery.start_soon(self._take_spare, slot, spare)

    def _spares_to_take(self) -> list[tuple[int, str]]:
        """(slot, spare) for each slot out of service that a spare can stand in for now; the
        spares are taken off the list."""
        if self.read_only or self.volume.state() == "failed":
            return []
        taken = []
        for s in self.volume.slots:
            if s.state in ("active", "rebuilding") or s.index in self.rebuilding:
                continue
            spare = next((x for x in self.cfg.spares
                          if self.cfg.resolve(x) not in self.refused_spares), None)
            if spare is None:
                break
            self.cfg.spares.remove(spare)
            taken.append((s.index, self.cfg.resolve(spare)))
        return taken

    def _filesystem_health(self) -> dict:
        """Whether the filesystem stopped, and why it has no room for new files, if so."""
        if self.fs is None:
            return {}
        with self.fs.lock:
            return {"stopped": self.fs.stopped,
                    "metadata_room": None if self.fs.stopped else self.fs.metadata_shortage()}

    def _check_members(self) -> None:
        """Look at the array's health and send what changed since the last look."""
        try:
            # (the volume's status looks for vanished members first)
            doc = self.volume.status() | self._filesystem_health()
            events = self.health.observe(doc, time.monotonic())
        except Exception:  # noqa: BLE001 - a fault in watching must not end the mount
            log.exception("looking at the health of %s for notifications failed",
                          self.cfg.directory)
            return
        for event in events:
            self.notifier.send(event)

    async def _take_spare(self, slot: int, spare: str) -> None:
        """Rebuild failed `slot` onto `spare` (already taken off the list) in the background,
        as md does with a spare disk; a spare that could not be attached goes back."""
        log.warning("slot %d failed: rebuilding it onto spare %s", slot, spare)
        try:
            await trio.to_thread.run_sync(self.handle, {"op": "replace", "slot": slot,
                                                        "device": spare, "spare": True},
                                          lambda done, total: None)
        except RebuildStopped as exc:
            log.info("%s; it resumes at the next mount", exc)
        except OSError as exc:
            attached = self.cfg.member_path(slot) == spare
            if not attached:
                self.cfg.spares.insert(0, spare)
                self.refused_spares.add(spare)
            self.notifier.send(Event(
                "spare-failed", "critical", f"rebuilding slot {slot} onto spare {spare} failed",
                f"{exc}\n" + ("The spare is now the slot's member; `dwfs replace` retries."
                               if attached else "The spare stays on the list.")))
        else:
            self.notifier.send(Event("spare-used", "warning",
                                     f"slot {slot} was rebuilt onto spare {spare}",
                                     f"{len(self.cfg.spares)} spare(s) left.", slot, spare))

    async def _signals(self, nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            sig = await self._next_stop(sigs)
            log.info("signal %d: unmounting %s", sig, self.mountpoint)
            await trio.to_thread.run_sync(self.session.unmount)
            await trio.to_thread.run_sync(self.ops.sync)
            # Files still open keep the detached mount, and are served until they close (the
            # session then ends by itself), for up to OPEN_FILES_GRACE_SECONDS or until the
            # next SIGTERM or SIGINT.
            with trio.move_on_after(OPEN_FILES_GRACE_SECONDS):
                await self._next_stop(sigs)
            log.warning("%s is still in use after signal %d: ending its connection; files "
                        "still open on it see ENOTCONN", self.mountpoint, sig)
            await trio.to_thread.run_sync(self.session.terminate)

    async def _next_stop(self, sigs) -> int:
        """Wait for SIGTERM or SIGINT (returned), flushing at every SIGHUP meanwhile."""
        async for sig in sigs:
            if sig != signal.SIGHUP:
                return sig
            log.info("SIGHUP: flushing")
            await trio.to_thread.run_sync(self.ops.sync)
        raise AssertionError("the signal receiver ended")


def serve(warehouse: str, mountpoint: str, ready_fd: int | None, debug: bool = False,
          raw: bool = False, options: str = "") -> int:
    """Mount and serve until unmounted; returns the exit status."""
    def report(line: str) -> None:
        if ready_fd is not None:
            os.write(ready_fd, (line + "\n").encode())
            os.close(ready_fd)

    lock = None
    volume = None
    queued: WriteBehind | None = None
    fs = None
    ops: RawOperations | FuseOperations | None = None
    session: Session | None = None
    try:
        opts: MountOptions = parse_options(options)
        cfg = load_config(warehouse)
        mountpoint = os.path.abspath(mountpoint)
        if not os.path.isdir(mountpoint):
            raise WarehouseError(f"mount point {mountpoint} is not a directory", errno.ENOTDIR)
        if is_mounted(mountpoint):
            raise WarehouseError(f"{mountpoint} is already a mount point", errno.EBUSY)
        lock = WarehouseLock(cfg.directory)
        if not lock.try_acquire():
            raise WarehouseError(
                f"warehouse {cfg.directory} is in use by process {lock.holder()}", errno.EBUSY
            )
        _log_to_file(cfg.directory, debug)
        _tune_malloc()
        note = ""
        if raw and "ro" not in opts.fuse and holds_filesystem(cfg):
            # Writes through the raw volume would bypass the filesystem and damage it.
            opts.fuse.add("ro")
            note = (f"{cfg.directory} holds a dwfs filesystem: its raw volume is mounted "
                    "read-only (writes to it would damage the filesystem)")
            log.warning("%s", note)
        read_only = "ro" in opts.fuse
        if not raw:
            require_filesystem(cfg)  # before the volume is opened for writing
        volume = open_volume(cfg, read_only=read_only)
        note = "; ".join(n for n in (note, *volume.assembly_notes, _degraded_note(cfg, volume))
                         if n)
        if raw:
            ops = RawOperations(volume)
        else:
            queued = WriteBehind(volume)
            fs = open_filesystem(cfg, queued, read_only=read_only)
            fs.noatime = "noatime" in opts.fuse
            fs.nodiratime = "nodiratime" in opts.fuse
            ops = FuseOperations(View(fs, cfg.ghost_cache_limit))
        fuse_options = {"default_permissions"} | opts.fuse
        if os.getuid() == 0:
            fuse_options.add("allow_other")
        session = Session(ops, mountpoint, cfg.directory, fuse_options)
        log.info("mounted %s (%s, %s) at %s", cfg.directory, "raw volume" if raw else "filesystem",
                 volume.geometry.level, mountpoint)
        daemon = Daemon(cfg, session, volume, mountpoint, fs)
        # While mounted, trio's signal receiver handles these; when it stops (after the
        # unmount) they fall back to "ignore", so nothing cuts the close short. systemd stops
        # a .mount unit with umount(8), then SIGTERMs the processes left in the unit.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        trio.run(daemon.run, lambda: report(f"ready {note}".strip()))
        return 0
    except (ConfigError, RaidError, OSError, ValueError) as exc:
        log.error("mount of %s failed: %s", warehouse, exc)
        report(f"error: {exc}")
        return 1
    finally:
        # Closing commits and writes the metadata copy: let no signal cut that short.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if session is not None:
            if is_mounted(mountpoint):
                session.unmount()
            session.close()
        if ops is not None:
            ops.close()
        if isinstance(ops, RawOperations):
            try:
                ops.writes.close()
            except OSError as exc:
                log.error("queued writes to %s failed: %s", warehouse, exc)
        if isinstance(ops, FuseOperations):
            ops.fs.ghosts.close()  # fetches in progress stop; their files stay ghosts
        clean = True
        if fs is not None and queued is not None:
            clean = _close_filesystem(fs, queued, warehouse)
        if volume is not None:
            try:
                volume.close()
            except RaidError as exc:
                log.error("closing the volume of %s failed: %s", warehouse, exc)
                clean = False
            if clean:
                log.info("closed %s cleanly", warehouse)
        if lock is not None:
            lock.release()


def _close_filesystem(fs: Filesystem, queued: WriteBehind, warehouse: str) -> bool:
    """Commit, refresh the metadata copy on the volume and close the database (read-only:
    only close); False if something failed (and was logged)."""
    clean = True
    try:
        if not fs.db.read_only:
            fs.commit()
            write_copy(fs)
        fs.close()
    except OSError as exc:
        log.error("closing the filesystem of %s failed: %s", warehouse, exc)
        clean = False
    finally:
        fs.db.close()
        try:
            queued.close()  # drain and stop its worker
        except OSError as exc:
            log.error("queued writes to %s failed: %s", warehouse, exc)
            clean = False
    return clean


WRITING_REQUESTS = ("replace", "clear", "spare-add", "spare-rm", "ghost-import", "ghost-sync")
LONG_REQUESTS = ("replace", "scrub", "ghost-import", "ghost-sync")
QUICK_REQUESTS_AT_ONCE = 4
COMMIT_SECONDS = 5.0
SEAL_IDLE_SECONDS = 2.0
METACOPY_SECONDS = 600.0
MEMBER_CHECK_SECONDS = 5.0  # also how often the array's health is looked at for notify
NOTIFY_CLOSE_SECONDS = 10.0  # at unmount, how long messages still queued may take
OPEN_FILES_GRACE_SECONDS = 30.0
LOG_BYTES = 16 << 20  # dwfs.log is rotated at this size
LOG_KEPT = 4


def _invalidate(fn, *args) -> None:
    """Tell the kernel to forget a cached entry or inode (it may not know it: fine)."""
    try:
        fn(*args)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("invalidating %r in the kernel's cache failed: %s", args, exc)


def _degraded_note(cfg: WarehouseConfig, volume) -> str:
    """What `dwfs mount` says when the array starts short of members (empty if it is not)."""
    state = volume.state()
    if state not in ("degraded", "rebuilding"):
        return ""
    down = [s for s in volume.slots if s.state != "active"]
    what = ", ".join(f"slot {s.index} ({s.path}) {s.state}" for s in down)
    remedy = "" if state == "rebuilding" else (
        f" (`dwfs replace {cfg.directory} {down[0].index}` rebuilds it)" if len(down) == 1
        else " (`dwfs replace` rebuilds them)")
    note = f"the array is {state}: {what}{remedy}"
    log.warning("%s", note)
    return note


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def _tune_malloc() -> None:
    """Keep megabyte-sized buffers on the heap instead of fresh mmaps.

    glibc maps every large allocation anew and unmaps it when freed; each request of 1 MiB then
    costs hundreds of page faults, which on a virtual machine took ~3 ms of the ~4 ms per
    request. With a high mmap threshold the same memory is reused.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError) as exc:
        log.info("malloc tuning not available: %s", exc)


def _freeze_startup_objects() -> None:
    """Leave the objects made while starting out of every later garbage collection.

    They are mostly the libraries' and the parity kernels' modules, functions and classes
    (about 115,000 objects), which live as long as the daemon. Walking them made each full
    collection take 30-58 ms, a pause for every request in flight. Objects are still freed when
    their last reference goes; only cycles among these would no longer be collected.
    """
    gc.collect()
    gc.freeze()
    log.info("%d start-up objects left out of garbage collection", gc.get_freeze_count())


class _DaemonLog(logging.handlers.RotatingFileHandler):
    """dwfs.log, rotated at LOG_BYTES with LOG_KEPT older files beside it (dwfs.log.1 the
    newest of them). Standard output and error, when `dwfs mount` opened them on dwfs.log
    (not with -f), follow it to each new file: what is written there without logging (a
    thread's uncaught exception) would otherwise go to an old or deleted file."""

    def __init__(self, path: str) -> None:
        super().__init__(path, maxBytes=LOG_BYTES, backupCount=LOG_KEPT)
        log_file = os.stat(path)
        self._std = [fd for fd in (1, 2) if _same_file(fd, log_file)]

    def doRollover(self) -> None:
        """Start a new dwfs.log; standard output and error move to it."""
        super().doRollover()
        if self.stream is not None:
            for fd in self._std:
                os.dup2(self.stream.fileno(), fd)


def _same_file(fd: int, st: os.stat_result) -> bool:
    try:
        mine = os.fstat(fd)
    except OSError:  # closed
        return False
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def _log_to_file(directory: str, debug: bool) -> None:
    """Log to the warehouse's dwfs.log (see `_DaemonLog`)."""
    handler = _DaemonLog(os.path.join(directory, "dwfs.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s "
                                           "%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m dwfs.daemon`."""
    p = argparse.ArgumentParser(prog="dwfs-daemon")
    p.add_argument("warehouse")
    p.add_argument("mountpoint")
    p.add_argument("--raw", action="store_true")
    p.add_argument("-o", dest="options", default="")
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    return serve(args.warehouse, args.mountpoint, args.ready_fd, args.debug, args.raw,
                 args.options)


if __name__ == "__main__":
    sys.exit(main())
