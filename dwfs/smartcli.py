"""`dwfs smart add|list|show|rm`: smart folders from the command line."""

from __future__ import annotations

import argparse
import errno
import json
import os

from dwfs import control
from dwfs.cliutil import CommandError, daemon_socket, dwfs_mount_of, out
from vfs.xattrnames import QUERY_XATTR

QUERY_ATTR = QUERY_XATTR.decode()


def _query_of(path: str) -> str | None:
    try:
        return os.getxattr(path, QUERY_ATTR).decode()
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise CommandError(f"{path}: {exc.strerror}") from exc


def cmd_add(args: argparse.Namespace) -> int:
    from vfs.query import QueryError, parse

    try:
        parse(args.query)
    except QueryError as exc:
        raise CommandError(str(exc)) from exc
    dwfs_mount_of(args.path)
    created = False
    if not os.path.lexists(args.path):
        os.mkdir(args.path)
        created = True
    try:
        os.setxattr(args.path, QUERY_ATTR, args.query.encode())
    except OSError as exc:
        if created:
            os.rmdir(args.path)
        reason = {errno.ENOTEMPTY: "the directory is not empty (a smart folder starts empty)",
                  errno.ENOTDIR: "not a directory"}.get(exc.errno or 0, exc.strerror)
        raise CommandError(f"{args.path}: cannot make a smart folder: {reason}") from exc
    count = len(os.listdir(args.path))
    out.print(f"smart folder {args.path}: {args.query} ({count} entries)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    query = _query_of(args.path)
    if query is None:
        raise CommandError(f"{args.path} is not a smart folder")
    out.print(query, markup=False, highlight=False)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    if _query_of(args.path) is None:
        raise CommandError(f"{args.path} is not a smart folder; not removing it")
    os.rmdir(args.path)
    out.print(f"removed smart folder {args.path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    entry, _inside = dwfs_mount_of(args.mountpoint)
    folders = control.request(daemon_socket(entry), {"op": "smart-list"})
    for f in folders:
        f["path"] = os.path.join(entry.mountpoint, f["path"].lstrip("/"))
    if args.json:
        print(json.dumps(folders, indent=2))
        return 0
    if not folders:
        out.print(f"no smart folders in {entry.mountpoint}")
        return 0
    from rich.table import Table

    table = Table("path", "query", "entries")
    for f in folders:
        table.add_row(f["path"], f["query"], str(f["entries"]))
    out.print(table)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `dwfs smart ...`."""
    smart = sub.add_parser("smart", help="smart folders: directories that are saved queries")
    ssub = smart.add_subparsers(dest="smart_command", required=True)
    m = ssub.add_parser("add", help="make PATH a smart folder showing what QUERY matches")
    m.add_argument("path")
    m.add_argument("query", help="e.g. 'ext:pdf AND size>1M AND mtime<30d'")
    m.set_defaults(func=cmd_add)
    m = ssub.add_parser("list", help="every smart folder of a mount")
    m.add_argument("mountpoint")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_list)
    m = ssub.add_parser("show", help="the query of a smart folder")
    m.add_argument("path")
    m.set_defaults(func=cmd_show)
    m = ssub.add_parser("rm", help="remove a smart folder (the files it shows stay)")
    m.add_argument("path")
    m.set_defaults(func=cmd_rm)
