"""`dwfs ghost import|hydrate|dehydrate|pin|unpin`: ghost files from the command line.

Imports and watcher changes go to the mount's daemon over its control socket. Hydrating reads
the files through the mount (the first read fetches them), so progress is shown in bytes as
they arrive; the other state changes set the `user.dwfs.state` attribute, as any tool can.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
import time

from dwfs import control
from dwfs.cliutil import CommandError, daemon_socket, dwfs_mount_of, err, out, progress_bar
from vfs.xattrnames import STATE_XATTR

log = logging.getLogger("dwfs.ghost")

STATE = STATE_XATTR.decode()
READ_SIZE = 1 << 20


def state_of(path: str) -> str | None:
    """A file's ghost state, or None for an ordinary file."""
    try:
        return os.getxattr(path, STATE, follow_symlinks=False).decode()
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.EPERM):
            return None
        raise CommandError(f"{path}: {exc.strerror}") from exc


def files_under(paths: list[str]) -> list[str]:
    """The regular files named, and those under the directories named."""
    found: list[str] = []
    for p in paths:
        try:
            st = os.lstat(p)
        except OSError as exc:
            raise CommandError(f"{p}: {exc.strerror}") from exc
        if stat.S_ISDIR(st.st_mode):
            for top, _dirs, names in os.walk(p):
                found += [os.path.join(top, n) for n in sorted(names)
                          if stat.S_ISREG(os.lstat(os.path.join(top, n)).st_mode)]
        elif stat.S_ISREG(st.st_mode):
            found.append(p)
    return found


# --- import and watch ---------------------------------------------------------------------------


def _make_dest(dest: str) -> None:
    """Make sure the import's destination is a directory: made (as `cp -r` makes its
    target) when it does not exist but its parent does."""
    if os.path.isdir(dest):
        return
    if os.path.lexists(dest):
        raise CommandError(f"{dest} is not a directory")
    try:
        os.mkdir(dest)
    except FileNotFoundError as exc:
        raise CommandError(f"{dest}: its parent directory does not exist") from exc
    except OSError as exc:
        raise CommandError(f"cannot make {dest}: {exc.strerror}") from exc


def cmd_import(args: argparse.Namespace) -> int:
    source = os.path.realpath(args.source)
    if args.rescan < 0:
        raise CommandError(f"--rescan {args.rescan:g}: give 0 or more seconds")
    if not os.path.isdir(source):
        raise CommandError(f"{args.source} is not a directory")
    entry, inside = dwfs_mount_of(args.dest)
    mp = entry.mountpoint.rstrip("/") + "/"
    if source == entry.mountpoint or source.startswith(mp):
        raise CommandError(f"{args.source} is inside the mount {entry.mountpoint}; a ghost's "
                           "source must be outside it")
    _make_dest(args.dest)
    sock = daemon_socket(entry)
    op = {"op": "ghost-import", "source": source, "dest": inside, "uid": os.getuid(),
          "gid": os.getgid()}
    t0 = time.monotonic()
    with progress_bar("importing", in_bytes=False) as update:
        result = control.request(sock, op, update)
    took = time.monotonic() - t0
    out.say(f"imported {source} into {args.dest}: {result['ghosts']} ghosts, "
              f"{result['directories']} directories, {result['links']} links"
              + (f", {result['refreshed']} refreshed" if result["refreshed"] else "")
              + (f", {result['unchanged']} unchanged" if result["unchanged"] else "")
              + f" in {took:.2f} s")
    for line in result["skipped"]:
        err.say(f"dwfs: skipped {line}")
    if result["skipped_count"] > len(result["skipped"]):
        err.say(f"dwfs: ... {result['skipped_count'] - len(result['skipped'])} more skipped")
    if args.watch:
        from dwfs.ghostwatch import watch  # watchdog only when watching

        watch(source, sock, inside, args.rescan)
    return 0


# --- states -------------------------------------------------------------------------------------


def _hydrate(paths: list[str]) -> list[str]:
    """Read every ghost among `paths` through the mount; returns the files that failed."""
    ghosts = [p for p in paths if state_of(p) == "ghost"]
    total = sum(os.stat(p).st_size for p in ghosts)
    failed: list[str] = []
    done = 0
    buf = bytearray(READ_SIZE)
    with progress_bar(f"fetching {len(ghosts)} files") as update:
        update(0, total)
        for p in ghosts:
            size = os.stat(p).st_size
            try:
                with open(p, "rb", buffering=0) as f:
                    while n := f.readinto(buf):
                        done += n
                        update(done, total)
                # the reads may finish before every piece is stored: wait for that
                os.setxattr(p, STATE, b"hydrated", follow_symlinks=False)
            except OSError as exc:
                err.print(f"dwfs: cannot fetch {p}: {exc.strerror} (see the mount's log)")
                failed.append(p)
                done += size
                update(done, total)
    return failed


def _set_states(paths: list[str], want: str, only: tuple[str, ...]) -> list[str]:
    failed = []
    for p in paths:
        if state_of(p) not in only:
            continue
        try:
            os.setxattr(p, STATE, want.encode(), follow_symlinks=False)
        except OSError as exc:
            why = {errno.EPERM: "it is pinned",
                   errno.EIO: "its source is gone or changed (see the mount's log)"}.get(
                       exc.errno or 0, exc.strerror)
            err.print(f"dwfs: {p}: cannot make it {want}: {why}")
            failed.append(p)
    return failed


def cmd_state(args: argparse.Namespace) -> int:
    paths = files_under(args.paths)
    for p in args.paths:
        dwfs_mount_of(p)
    if not any(state_of(p) for p in paths):
        raise CommandError("no ghost files among the paths given")
    failed: list[str] = []
    if args.ghost_command in ("hydrate", "pin"):
        failed += _hydrate(paths)
    if args.ghost_command == "pin":
        failed += _set_states([p for p in paths if p not in failed], "pinned", ("hydrated",))
    elif args.ghost_command == "unpin":
        failed += _set_states(paths, "hydrated", ("pinned",))
    elif args.ghost_command == "dehydrate":
        failed += _set_states(paths, "ghost", ("hydrated", "pinned"))
    counts: dict[str, int] = {}
    for p in paths:
        s = state_of(p)
        if s:
            counts[s] = counts.get(s, 0) + 1
    out.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no ghosts")
    return 1 if failed else 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `dwfs ghost ...`."""
    ghost = sub.add_parser("ghost", help="ghost files: placeholders fetched on first read")
    gsub = ghost.add_subparsers(dest="ghost_command", required=True)
    m = gsub.add_parser("import", help="a ghost in DEST for every file under SOURCE")
    m.add_argument("source")
    m.add_argument("dest", help="a directory in a dwfs mount (made if only its parent exists)")
    m.add_argument("--watch", action="store_true",
                   help="keep following the source's changes until interrupted")
    m.add_argument("--rescan", type=float, default=600.0, metavar="SECONDS",
                   help="with --watch: compare the whole source this often, besides after "
                        "every burst of changes (default 600; 0: only after changes)")
    m.set_defaults(func=cmd_import)
    for name, text in (("hydrate", "fetch ghosts' content now"),
                       ("dehydrate", "drop fetched content whose source is unchanged"),
                       ("pin", "fetch and keep: never dehydrated"),
                       ("unpin", "allow dehydration again")):
        m = gsub.add_parser(name, help=text)
        m.add_argument("paths", nargs="+")
        m.set_defaults(func=cmd_state)
