"""Helpers shared by the benchmark scripts (scripts/bench-fs; scripts/bench-raid to follow).

Measurements, mount-table queries, page-cache dropping, subprocesses with timeouts, dd timing
and unmounting. Nothing here imports numpy or the dwfs packages, so it loads fast and works
before the virtualenv has everything.
"""

from __future__ import annotations

import mmap
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

out = Console(width=None if sys.stdout.isatty() else 170)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 170)

PROG = "bench"  # set by the script: prefixes every note


def note(msg: str) -> None:
    """A progress or warning line on stderr, prefixed with the script's name."""
    err.print(f"[dim]{PROG}:[/dim] {msg}", highlight=False)


# --- measurements -------------------------------------------------------------------------------


@dataclass
class Measurement:
    """The median of repeated runs of one figure, with the runs themselves."""

    median: float
    reps: list[float]
    cpu_share: float | None = None  # this process's CPU time / wall time while measuring
    unit: str = "MB/s"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, reps: list[float], unit: str = "MB/s", **extra: Any) -> Measurement:
        """A Measurement whose median is the median of `reps`."""
        return cls(statistics.median(reps), list(reps), None, unit, dict(extra))

    def to_json(self) -> dict:
        """MB/s figures keep bench-raid's keys; other units name themselves."""
        if self.unit == "MB/s":
            d: dict[str, Any] = {"median_mb_s": self.median, "reps_mb_s": self.reps,
                                 "cpu_share": self.cpu_share}
        else:
            d = {"median": self.median, "reps": self.reps, "unit": self.unit,
                 "cpu_share": self.cpu_share}
        d.update(self.extra)
        return d


def med(x: Any) -> float | None:
    """The median of a Measurement, None for anything else."""
    return x.median if isinstance(x, Measurement) else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None if either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(x: float | None) -> str:
    """A ratio as `1.23×`, `–` when missing."""
    return "–" if x is None else f"{x:.2f}×"


def verdict(met: bool | None) -> str:
    """Rich markup for a target's outcome."""
    return "[dim]n/a[/dim]" if met is None else ("[green]met[/green]" if met
                                                   else "[red]NOT met[/red]")


def to_json(x: Any) -> Any:
    """Measurements (and numpy scalars) inside dicts and lists as plain JSON values."""
    if isinstance(x, Measurement):
        return x.to_json()
    if isinstance(x, dict):
        return {k: to_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_json(v) for v in x]
    if hasattr(x, "dtype") and hasattr(x, "item"):
        return x.item()
    return x


# --- environment --------------------------------------------------------------------------------


def is_root() -> bool:
    """True when running as root (page cache can be dropped, mounts made)."""
    return os.geteuid() == 0


def mounts() -> list[tuple[str, str, str]]:
    """(device, mount point, fs type) of every mount, from /proc/self/mounts."""
    rows = []
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])
                rows.append((parts[0], mp, parts[2]))
    return rows


def fs_type(path: str) -> str:
    """File-system type of the mount holding `path` (longest matching mount point)."""
    real = os.path.realpath(path)
    best, kind = "", "?"
    for _dev, mp, fstype in mounts():
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
            best, kind = mp, fstype
    return kind


def mount_type(path: str) -> str | None:
    """File-system type of the mount whose mount point is exactly `path`, None if none."""
    real = os.path.realpath(path)
    kind = None
    for _dev, mp, fstype in mounts():
        if mp == real:
            kind = fstype  # the last one listed is the one on top
    return kind


def is_mounted(path: str) -> bool:
    """True if something is mounted exactly at `path`."""
    return mount_type(path) is not None


def pick_temp_base() -> tuple[str, str]:
    """Base directory for temporary files and why it was chosen."""
    env = os.environ.get("TMPDIR")
    if env:
        return env, "$TMPDIR"
    repo_dev = os.stat(ROOT).st_dev
    for cand in ("/var/tmp", str(ROOT.parent)):
        try:
            st = os.stat(cand)
        except OSError:
            continue
        if (st.st_dev == repo_dev and os.access(cand, os.W_OK)
                and fs_type(cand) not in ("tmpfs", "ramfs")):
            return cand, "same disk as the repository"
    return str(ROOT.parent), "the repository's parent directory"


_drop_warned = False


def drop_caches() -> bool:
    """Write back and drop the page cache, dentries and inodes (root only); False if not possible.

    On a FUSE mount this also makes the kernel forget the inodes it does not hold open, so the
    next access to a path goes to the daemon again (LOOKUP), as after a reboot.
    """
    global _drop_warned
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as exc:
        if not _drop_warned:
            note(f"[yellow]cannot drop the page cache ({exc.strerror}); reads are warm[/yellow]")
            _drop_warned = True
        return False


def cache_state() -> str:
    """`cold` if drop_caches() can work here, else `warm`."""
    return "cold" if is_root() and os.access("/proc/sys/vm/drop_caches", os.W_OK) else "warm"


def run(cmd: list[str], timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess:
    """Run `cmd` with captured text output; raises subprocess.TimeoutExpired after `timeout` s."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


# --- dd -----------------------------------------------------------------------------------------

_DD_SECONDS = re.compile(r"copied, ([0-9.]+) s")


def dd(args: list[str], nbytes: int, timeout: float = 1200) -> float:
    """MB/s of one dd run (dd's own timing, which includes conv=fsync / fdatasync)."""
    t0 = time.perf_counter()
    r = run(["dd", *args], timeout=timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"dd {' '.join(args)} failed: {r.stderr.strip()[-300:]}")
    m = _DD_SECONDS.search(r.stderr)
    seconds = float(m.group(1)) if m else wall
    return nbytes / seconds / 1e6


def settle_memory(nbytes: int) -> None:
    """Write to and free `nbytes` of anonymous memory, so that the page cache the next timed
    step fills reuses pages the machine has already backed.

    On a virtual machine whose host provides memory on first use, a page the guest has never
    used costs a host fault when it is first written: measured here at 1.4-6 µs per 4 KiB page.
    That cut a 256 MiB first read of a ghost from 1.3 GB/s to 0.4 GB/s, and `cp` of the same
    file alike, depending only on how much of the guest's memory the earlier steps had used.
    Both sides of a comparison call this first; on hardware it changes nothing.
    """
    block = b"\1" * (16 * MiB)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        for _ in range(nbytes // len(block)):
            m.write(block)
        m.write(block[:nbytes % len(block)])
    finally:
        m.close()


def warm_file(path: str) -> None:
    """Read a file so that it sits in the page cache."""
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


# --- unmounting ---------------------------------------------------------------------------------


def unmount(cli: list[str] | None, mountpoint: str, log: list[str]) -> None:
    """`CLI umount` (when given, e.g. dwfs), then fusermount3 -u, then fusermount3 -uz.

    Each step runs only while `mountpoint` is still mounted; failures go to `log`.
    """
    steps = []
    if cli:
        steps.append([*cli, "umount", mountpoint])
    steps += [["fusermount3", "-u", mountpoint], ["fusermount3", "-uz", mountpoint]]
    for cmd in steps:
        if not is_mounted(mountpoint):
            return
        try:
            r = run(cmd, timeout=600)
            if r.returncode != 0:
                log.append(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()[-300:]}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.append(f"{' '.join(cmd)}: {exc}")
    if is_mounted(mountpoint):
        log.append(f"{mountpoint} is still mounted")
