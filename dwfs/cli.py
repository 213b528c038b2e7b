"""The `dwfs` command line: its parser, and the dispatch to the module of each command.

The modules of the warehouse's own commands (`dwfs.arraycli`: the array, numpy, SQLite) are
imported only when one of those commands runs, so `dwfs ghost ...` and `dwfs smart ...` start
quickly.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable

from dwfs import control, ghostcli, smartcli
from dwfs.cliutil import CommandError, err, warehouse_of


def _array(name: str) -> Callable[[argparse.Namespace], int]:
    """The command `name` of dwfs.arraycli, imported when it runs."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module("dwfs.arraycli"), name)(args)

    return run


def _is_array_error(exc: OSError) -> bool:
    """True for the array's and the warehouse's errors (WarehouseError is a RaidError), which
    a command reports as a one-line message rather than a traceback."""
    from raid.errors import RaidError

    return isinstance(exc, RaidError)


WAREHOUSE_OR_MOUNT = "the warehouse directory, or the mount point where it is mounted"


# --- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dwfs", description="data-warehouse filesystem")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mkfs", help="create a warehouse and its redundant array")
    m.add_argument("warehouse")
    m.add_argument("--level", required=True,
                   help="raid0 raid1 raid5 raid6 raid10 raid50 raid60 raidz1 raidz2 raidz3 auto")
    m.add_argument("--devices", type=int, default=0, help="number of new members to create")
    m.add_argument("--device-size", help="size of each new member, e.g. 1G")
    m.add_argument("--backend", default="file", help="file (default) or sqlite")
    m.add_argument("--device", action="append", help="an existing member file (repeat)")
    m.add_argument("--chunk-size", default="256K", help="chunk size (default 256K)")
    m.add_argument("--survive", type=int, help="with --level auto: failed members to survive")
    m.add_argument("--raw", action="store_true",
                   help="no filesystem: the raw volume only, for `dwfs mount --raw`")
    m.add_argument("--force", action="store_true",
                   help="overwrite --device paths that hold a filesystem or a dwfs member")
    m.set_defaults(func=_array("cmd_mkfs"))

    m = sub.add_parser("mount", help="mount a warehouse")
    m.add_argument("warehouse")
    m.add_argument("mountpoint")
    m.add_argument("--raw", action="store_true",
                   help="mount the raw volume as one file (read-only if it holds a filesystem)")
    m.add_argument("-f", "--foreground", action="store_true")
    m.add_argument("-o", dest="options", default="", help="mount options")
    m.add_argument("--debug", action="store_true")
    m.set_defaults(func=_array("cmd_mount"))

    m = sub.add_parser("umount", help="flush, unmount and wait for the daemon to exit")
    m.add_argument("mountpoint", help="the mount point, or the warehouse mounted there")
    m.set_defaults(func=_array("cmd_umount"))

    m = sub.add_parser("fsck", help="check (and repair) the filesystem's metadata")
    m.add_argument("warehouse", type=warehouse_of, help=WAREHOUSE_OR_MOUNT)
    m.add_argument("--repair", action="store_true",
                   help="fix what is found; restore a lost metadata database from its copy")
    m.add_argument("--verify-data", action="store_true",
                   help="also read every stored block and check its checksum")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_array("cmd_fsck"))

    m = sub.add_parser("status", help="array state and member health")
    m.add_argument("warehouse", type=warehouse_of, nargs="?",
                   help=WAREHOUSE_OR_MOUNT + " (default: every mounted one)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_array("cmd_status"))

    m = sub.add_parser("clear", help="forget the members' error counts (status shows them "
                       "from one mount to the next until cleared or replaced)")
    m.add_argument("warehouse", type=warehouse_of, help=WAREHOUSE_OR_MOUNT)
    m.set_defaults(func=_array("cmd_clear"))

    m = sub.add_parser("spare", help="spares: free disks or member files made ahead, rebuilt "
                       "onto when a member fails while mounted")
    ssub = m.add_subparsers(dest="spare_command", required=True)
    for verb, what in (("add", "a free disk at PATH, or a spare member file made at PATH (the "
                               "size a member needs)"),
                       ("rm", "take PATH off the spares (the disk or file stays)")):
        v = ssub.add_parser(verb, help=what)
        v.add_argument("warehouse", type=warehouse_of, help=WAREHOUSE_OR_MOUNT)
        v.add_argument("path")
        if verb == "add":
            v.add_argument("--force", action="store_true",
                           help="add a disk that holds a filesystem or a dwfs member")
        v.set_defaults(func=_array("cmd_spare"))

    m = sub.add_parser("notify", help="send a test message as dwfs.toml's [notify] says "
                       "(the mount daemon sends real ones when members fail)")
    m.add_argument("warehouse", type=warehouse_of, help=WAREHOUSE_OR_MOUNT)
    m.set_defaults(func=_array("cmd_notify"))

    m = sub.add_parser("scrub", help="verify all data and parity")
    m.add_argument("warehouse", type=warehouse_of, help=WAREHOUSE_OR_MOUNT)
    m.add_argument("--repair", action="store_true")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_array("cmd_scrub"))

    m = sub.add_parser("replace", help="rebuild a member onto a replacement")
    m.add_argument("warehouse", type=warehouse_of, help=WAREHOUSE_OR_MOUNT)
    m.add_argument("slot", type=int)
    m.add_argument("--device", help="replacement member file (default: a new one in place)")
    m.add_argument("--max-rate", help="rebuild at most this many bytes per second, e.g. 50M")
    m.add_argument("--force", action="store_true",
                   help="overwrite a --device that holds a filesystem or another array's member")
    m.set_defaults(func=_array("cmd_replace"))
    smartcli.add_parsers(sub)
    ghostcli.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dwfs` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="dwfs: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except (CommandError, control.ControlError, ValueError) as exc:
        # (raid.levels.LevelError, ConfigError and MountOptionError are ValueErrors)
        print(f"dwfs: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if not _is_array_error(exc):
            raise
        print(f"dwfs: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        err.print("dwfs: interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`dwfs status --json | head`): stop quietly, as Unix tools do;
        # point stdout at /dev/null so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
