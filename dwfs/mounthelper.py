"""`mount.dwfs` / `mount.fuse.dwfs`: the helper mount(8) runs for `-t fuse.dwfs` (or `-t dwfs`).

mount(8), an `/etc/fstab` line and a systemd `.mount` unit all end up calling

    /sbin/mount.fuse.dwfs WAREHOUSE MOUNTPOINT [-sfnv] [-o OPTIONS] [-t TYPE]

The helper mounts the warehouse's filesystem and returns only once the mount is ready (the
daemon keeps running in its own session). Options meant for mount(8), fstab or systemd
(`defaults`, `noauto`, `nofail`, `_netdev`, `x-systemd.*`, ...) are accepted and ignored; an
unknown option is refused with a clear message, unless `-s` (sloppy) asks to ignore it.
Flags as mount(8) passes them: `-f` fake (check everything, mount nothing), `-n` no mtab
(there is none to write), `-s` sloppy, `-v` verbose.

Exit status as mount(8) expects from helpers: 0 mounted, 1 bad usage, 32 mount failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dwfs import arraycli
from dwfs.cliutil import CommandError
from dwfs.config import ConfigError, load_config
from dwfs.mountopts import MountOptionError, parse_options
from raid.errors import RaidError

EXIT_USAGE = 1
EXIT_FAILURE = 32
FSTYPES = ("fuse.dwfs", "dwfs", "fuse")


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The helper's command line, as mount(8) passes it."""
    p = argparse.ArgumentParser(prog=prog, description="mount a dwfs warehouse (mount(8) helper)")
    p.add_argument("warehouse", help="the warehouse directory (absolute path)")
    p.add_argument("mountpoint", help="where to mount it (absolute path)")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="comma-separated mount options (may be repeated)")
    p.add_argument("-f", dest="fake", action="store_true",
                   help="fake: check the warehouse and options, do not mount")
    p.add_argument("-n", dest="no_mtab", action="store_true", help="no mtab (accepted)")
    p.add_argument("-s", dest="sloppy", action="store_true", help="ignore unknown options")
    p.add_argument("-v", dest="verbose", action="store_true", help="say what is done")
    p.add_argument("-t", dest="fstype", default="fuse.dwfs", help="fuse.dwfs (as mount passes)")
    return p


def sloppy_filter(options: str) -> tuple[str, list[str]]:
    """The options dwfs knows, and the ones it does not (dropped under `-s`)."""
    kept: list[str] = []
    dropped: list[str] = []
    for opt in filter(None, (o.strip() for o in options.split(","))):
        try:
            parse_options(opt)
        except MountOptionError:
            dropped.append(opt)
        else:
            kept.append(opt)
    return ",".join(kept), dropped


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mount.dwfs` and `mount.fuse.dwfs`."""
    prog = os.path.basename(sys.argv[0]) if argv is None else "mount.dwfs"
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error
        return 0 if exc.code == 0 else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format=f"{prog}: %(message)s")
    if args.fstype not in FSTYPES:
        print(f"{prog}: error: type {args.fstype!r} is not dwfs (use -t fuse.dwfs)",
              file=sys.stderr)
        return EXIT_USAGE
    options = ",".join(o for o in args.options if o)
    warehouse = os.path.abspath(args.warehouse)
    mountpoint = os.path.abspath(args.mountpoint)
    try:
        if args.sloppy:
            options, dropped = sloppy_filter(options)
            if dropped and args.verbose:
                print(f"{prog}: ignoring unknown options {','.join(dropped)}", file=sys.stderr)
        parse_options(options)
        cfg = load_config(warehouse)
        if not os.path.isdir(mountpoint):
            print(f"{prog}: error: mount point {mountpoint} is not a directory",
                  file=sys.stderr)
            return EXIT_FAILURE
        if args.verbose or args.fake:
            print(f"{prog}: {'would mount' if args.fake else 'mounting'} {cfg.directory} at "
                  f"{mountpoint}" + (f" with options {options}" if options else ""),
                  file=sys.stderr)
        if args.fake:
            return 0
        return arraycli.mount_warehouse(cfg.directory, mountpoint, options)
    except MountOptionError as exc:
        print(f"{prog}: error: {exc} (known options: README, mount options; -s ignores "
              "unknown ones)", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, CommandError, RaidError, OSError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
