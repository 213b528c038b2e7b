"""Helpers for tests that use the dwfs command and real FUSE mounts."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

from dwfs.mounts import pid_alive  # noqa: F401 (re-exported for the tests)

DWFS = [sys.executable, "-m", "dwfs.cli"]


def dwfs(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the dwfs command line; fails the test with its output if `check` and it fails."""
    proc = subprocess.run([*DWFS, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"dwfs {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def status(warehouse) -> dict:
    return json.loads(dwfs("status", warehouse, "--json", check=False).stdout)


def is_mounted(mountpoint) -> bool:
    parent, name = os.path.split(os.path.abspath(mountpoint))
    target = os.path.join(os.path.realpath(parent), name)
    with open("/proc/mounts", encoding="utf-8") as f:
        return any(line.split()[1] == target for line in f)


def daemon_pid(warehouse) -> int | None:
    try:
        with open(os.path.join(warehouse, ".dwfs.lock"), encoding="ascii") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def force_unmount(mountpoint, warehouse=None) -> None:
    """Test teardown: never leave a mount or a daemon behind."""
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True,
                       check=False)
    if warehouse is not None:
        pid = daemon_pid(warehouse)
        if pid and pid != os.getpid() and pid_alive(pid):
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def drop_caches() -> None:
    """Make the next reads reach the daemon (root only; otherwise a no-op)."""
    if os.getuid() == 0:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def wait_for_log(warehouse, text: str, timeout: float = 20) -> str:
    """Wait until the warehouse's dwfs.log contains `text`; returns the log."""
    log = os.path.join(warehouse, "dwfs.log")
    deadline = time.monotonic() + timeout
    while True:
        with open(log, encoding="utf-8", errors="replace") as f:
            content = f.read()
        if text in content or time.monotonic() > deadline:
            return content
        time.sleep(0.2)


def _log_size(warehouse) -> int:
    try:
        return os.path.getsize(os.path.join(str(warehouse), "dwfs.log"))
    except FileNotFoundError:
        return 0


class FsMount:
    """A warehouse's filesystem mounted through the dwfs command line."""

    raw = False

    def __init__(self, warehouse, mountpoint) -> None:
        self.warehouse = str(warehouse)
        self.mountpoint = str(mountpoint)
        os.makedirs(self.mountpoint, exist_ok=True)

    def path(self, *parts: str) -> str:
        """A path inside the mount."""
        return os.path.join(self.mountpoint, *parts)

    def mount(self, *options: str) -> None:
        args = ["mount", *(["--raw"] if self.raw else []), self.warehouse, self.mountpoint]
        if options:
            args += ["-o", ",".join(options)]
        self._log_from = _log_size(self.warehouse)
        dwfs(*args)
        assert is_mounted(self.mountpoint)

    def umount(self) -> None:
        """Unmount; the daemon must have closed everything cleanly (it says so last)."""
        dwfs("umount", self.mountpoint)
        assert not is_mounted(self.mountpoint)
        with open(os.path.join(self.warehouse, "dwfs.log"), errors="replace") as f:
            f.seek(getattr(self, "_log_from", 0))
            since = f.read()
        assert re.search(r"closed .+ cleanly", since), since[-3000:]

    def cleanup(self) -> None:
        force_unmount(self.mountpoint, self.warehouse)


class RawMount(FsMount):
    """A warehouse's raw volume mounted through the dwfs command line."""

    raw = True

    @property
    def volume(self) -> str:
        return os.path.join(self.mountpoint, "volume")


def make_warehouse(path, level: str = "raidz2", devices: int = 5, size: str = "64M",
                   backend: str = "file") -> str:
    """A new warehouse of small block-file (or sqlite) members."""
    dwfs("mkfs", path, "--level", level, "--devices", str(devices), "--device-size", size,
         "--backend", backend)
    return str(path)


@contextmanager
def scratch_mount(prefix: str, public: bool = False, options: tuple[str, ...] = ()):
    """A new warehouse mounted (with mount `options`) in a new directory under /var/tmp (an
    ext4 beside which the tests compare): yields the mount and that directory (for a
    reference tree), and removes both afterwards. `public`: every user can reach the mount
    (for the non-root steps)."""
    base = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")
    if public:
        os.chmod(base, 0o755)
    m = FsMount(make_warehouse(os.path.join(base, "wh")), os.path.join(base, "mnt"))
    try:
        m.mount(*options)
        if public:
            os.chmod(m.mountpoint, 0o755)
        yield m, base
    finally:
        m.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def mounted_warehouse(base, size: str = "64M"):
    """A new raidz2 warehouse of five members of `size` under `base`, mounted at base/mnt for
    the duration; unmounted (forcibly if need be) afterwards."""
    m = FsMount(make_warehouse(base / "wh", size=size), base / "mnt")
    try:
        m.mount()
        yield m
        m.umount()
    finally:
        force_unmount(m.mountpoint, m.warehouse)
