"""What every `dwfs` subcommand shares: the error it raises, its consoles, progress bars, and
finding the mount daemon that serves a path."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from rich.console import Console

from dwfs.mounts import MountEntry, mounts
from dwfs.warehouse import control_socket_path

out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)


class CommandError(Exception):
    """A command that cannot do what it was asked; the message says why."""


@contextmanager
def progress_bar(description: str, in_bytes: bool = True):
    """A rich progress bar whose update callback takes (done, total)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    columns = [
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True) if in_bytes else "{task.completed}/{task.total}",
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err, transient=False, disable=not err.is_terminal) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def dwfs_mount_of(path: str) -> tuple[MountEntry, str]:
    """The dwfs mount holding `path` and the path inside it ('/' for the mount point).

    The path's parent is resolved (symbolic links outside the mount followed); the last
    component is kept as given, so a name that does not exist yet can be asked about.
    """
    absolute = os.path.abspath(path)
    parent, name = os.path.split(absolute)
    full = os.path.join(os.path.realpath(parent), name) if name else absolute
    best: MountEntry | None = None
    for m in mounts():
        inside = full == m.mountpoint or full.startswith(m.mountpoint.rstrip("/") + "/")
        if inside and (best is None or len(m.mountpoint) >= len(best.mountpoint)):
            best = m
    if best is None or best.fstype != "fuse.dwfs":
        raise CommandError(f"{path} is not inside a mounted dwfs filesystem")
    rest = full[len(best.mountpoint):] or "/"
    return best, "/" + rest.lstrip("/")


def daemon_socket(entry: MountEntry) -> str:
    """The control socket of the daemon serving a dwfs mount."""
    return control_socket_path(entry.source)
