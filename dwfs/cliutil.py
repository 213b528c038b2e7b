"""What every `dwfs` subcommand shares: the error it raises, its consoles, progress bars, and
finding the mount daemon that serves a path."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from dwfs.control import control_socket_path
from dwfs.mounts import MountEntry, find_mount, mounts

if TYPE_CHECKING:
    from rich.console import Console


class LazyConsole:
    """A rich Console made on first use: importing rich takes longer than many commands take,
    and a command that only prints plain lines (`say`) need not pay for it."""

    def __init__(self, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        """The Console itself."""
        if self._console is None:
            from rich.console import Console

            if self._stderr:
                self._console = Console(stderr=True, soft_wrap=True)
            else:
                self._console = Console(soft_wrap=True, width=None if self.is_terminal else 160)
        return self._console

    @property
    def stream(self) -> TextIO:
        """The stream printed to (standard error or output, as they are now)."""
        return sys.stderr if self._stderr else sys.stdout

    @property
    def is_terminal(self) -> bool:
        """True if the stream is a terminal (asked without making the Console)."""
        return self.stream.isatty()

    def say(self, line: str) -> None:
        """Print one line as it is (no markup, no highlighting)."""
        self.stream.write(line + "\n")
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


out = LazyConsole(stderr=False)
err = LazyConsole(stderr=True)


class CommandError(Exception):
    """A command that cannot do what it was asked; the message says why."""


@contextmanager
def progress_bar(description: str, in_bytes: bool = True):
    """A rich progress bar whose update callback takes (done, total); nothing when standard
    error is not a terminal."""
    if not err.is_terminal:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    columns = [
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True) if in_bytes else "{task.completed}/{task.total}",
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err.console, transient=False) as bar:
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


def warehouse_of(path: str) -> str:
    """The warehouse a command names: `path` itself, or, when `path` is where a warehouse
    is mounted, that warehouse (`dwfs status /mnt/data` as `zpool status` or `btrfs scrub`
    take what the user sees). Only /proc/mounts is read: the mount point is not touched."""
    entry = find_mount(path)
    if entry is not None and entry.fstype == "fuse.dwfs":
        return entry.source
    return path


def daemon_socket(entry: MountEntry) -> str:
    """The control socket of the daemon serving a dwfs mount."""
    return control_socket_path(entry.source)
