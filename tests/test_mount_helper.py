"""The mount(8) helper: `mount -t fuse.dwfs`, an fstab line, the systemd unit example."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from mountutil import daemon_pid, dwfs, force_unmount, is_mounted, make_warehouse, pid_alive

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEMD_DIR = os.path.join(os.path.dirname(HERE), "scripts", "systemd")
HELPERS = ("mount.fuse.dwfs", "mount.dwfs")

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="mount(8) of a fuse type needs root")


@pytest.fixture(scope="module")
def helper_installed():
    """/usr/sbin/mount.fuse.dwfs pointing at this checkout's helper, as scripts/setup links it.

    Another checkout on the machine may have linked its own; point the links here for this
    module and put back what was there.
    """
    bindir = os.path.dirname(sys.executable)
    before: dict[str, str | None] = {}
    for name in HELPERS:
        target = os.path.join(bindir, name)
        assert os.access(target, os.X_OK), f"{target} missing: run scripts/setup"
        link = os.path.join("/usr/sbin", name)
        before[name] = os.readlink(link) if os.path.islink(link) else None
        if before[name] != target:
            tmp = link + ".dwfs-test"
            os.symlink(target, tmp)
            os.replace(tmp, link)
    yield
    for name, old in before.items():
        link = os.path.join("/usr/sbin", name)
        if old is not None and os.readlink(link) != old:
            tmp = link + ".dwfs-test"
            os.symlink(old, tmp)
            os.replace(tmp, link)


@pytest.fixture(scope="module")
def place(tmp_path_factory, helper_installed):
    """A warehouse and a mount point; nothing is left mounted afterwards."""
    base = tmp_path_factory.mktemp("helper")
    wh = make_warehouse(base / "wh")
    mp = base / "mnt"
    mp.mkdir()
    yield wh, str(mp), base
    force_unmount(mp, wh)


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=180, check=False,
                          env=env)


def _umount(mp: str, wh: str) -> None:
    pid = daemon_pid(wh)
    dwfs("umount", mp)
    assert not is_mounted(mp)
    assert pid is None or not pid_alive(pid)


def test_mount_t_fuse_dwfs(place):
    wh, mp, base = place
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    p = _run("mount", "-t", "fuse.dwfs", "-o", "_netdev,x-systemd.automount,nofail", wh, mp,
             env=env)
    assert p.returncode == 0, p.stderr
    assert is_mounted(mp), "mount returned before the mount was ready"
    with open(os.path.join(mp, "hello"), "w") as f:
        f.write("from mount -t")
    # A login shell's XDG_RUNTIME_DIR differs from mount(8)'s empty one: status still finds
    # the daemon.
    other = dict(os.environ, XDG_RUNTIME_DIR=str(base))
    st = subprocess.run([sys.executable, "-m", "dwfs.cli", "status", wh, "--json"], env=other,
                        capture_output=True, text=True, check=False)
    assert st.returncode == 0, st.stderr
    assert f'"mountpoint": "{mp}"' in st.stdout
    _umount(mp, wh)


def test_fstab_line(place):
    """The example fstab line, with this test's paths, mounted by `mount MOUNTPOINT`."""
    wh, mp, base = place
    with open(os.path.join(SYSTEMD_DIR, "fstab.example"), encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1
    fields = lines[0].split()
    assert len(fields) == 6 and fields[2] == "fuse.dwfs"
    assert os.path.isabs(fields[0]) and os.path.isabs(fields[1])
    assert "_netdev" in fields[3] and "nofail" in fields[3]
    fstab = base / "fstab"
    fstab.write_text(f"{wh} {mp} {' '.join(fields[2:])}\n")
    p = _run("mount", "--fstab", str(fstab), mp)
    assert p.returncode == 0, p.stderr
    assert is_mounted(mp)
    with open(os.path.join(mp, "hello")) as f:
        assert f.read() == "from mount -t"
    p = _run("mount", "--fstab", str(fstab), mp)
    assert p.returncode != 0 and is_mounted(mp), "a second mount must be refused"
    _umount(mp, wh)


def test_unknown_option_is_refused(place):
    wh, mp, _ = place
    p = _run("mount", "-t", "fuse.dwfs", "-o", "nofail,bogus=1", wh, mp)
    assert p.returncode != 0
    assert "unknown mount option 'bogus=1'" in p.stderr
    assert not is_mounted(mp)
    helper = os.path.join(os.path.dirname(sys.executable), "mount.fuse.dwfs")
    # -s (sloppy) drops what dwfs does not know; -f (fake) checks without mounting.
    p = _run(helper, wh, mp, "-s", "-f", "-o", "bogus,noatime,x-systemd.requires=a.mount")
    assert p.returncode == 0, p.stderr
    assert "with options noatime," in p.stderr and "bogus" not in p.stderr
    assert not is_mounted(mp)
    p = _run(helper, os.path.join(wh, "nowhere"), mp, "-f")
    assert p.returncode == 32 and "not a dwfs warehouse" in p.stderr


def test_relative_paths_are_made_absolute(place):
    wh, mp, base = place
    helper = os.path.join(os.path.dirname(sys.executable), "mount.dwfs")
    p = subprocess.run([helper, os.path.basename(wh), os.path.basename(mp), "-f"], cwd=base,
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    assert f"would mount {wh} at {mp}" in p.stderr


def test_systemd_style_stop_closes_cleanly(place):
    """systemd stops a .mount unit with umount(8), then SIGTERMs what is left in the unit."""
    wh, mp, _ = place
    assert _run("mount", "-t", "fuse.dwfs", wh, mp).returncode == 0
    with open(os.path.join(mp, "unsynced"), "wb") as f:
        f.write(b"closed cleanly")  # no fsync: only the daemon's close makes this durable
    pid = daemon_pid(wh)
    assert pid is not None
    p = _run("umount", mp)
    assert p.returncode == 0, p.stderr
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)
    assert _run("mount", "-t", "fuse.dwfs", wh, mp).returncode == 0
    with open(os.path.join(mp, "unsynced"), "rb") as f:
        assert f.read() == b"closed cleanly"
    _umount(mp, wh)


def test_systemd_unit_example():
    units = [n for n in os.listdir(SYSTEMD_DIR) if n.endswith(".mount")]
    assert units, "no example .mount unit"
    for name in units:
        path = os.path.join(SYSTEMD_DIR, name)
        unit = configparser.ConfigParser(strict=True, interpolation=None)
        unit.optionxform = str  # type: ignore[assignment,method-assign]
        unit.read(path, encoding="utf-8")
        where = unit["Mount"]["Where"]
        assert unit["Mount"]["Type"] == "fuse.dwfs"
        assert os.path.isabs(unit["Mount"]["What"]) and os.path.isabs(where)
        assert name == where.strip("/").replace("/", "-") + ".mount"
        assert "WantedBy" in unit["Install"]
        tool = shutil.which("systemd-analyze")
        if tool:
            p = _run(tool, "verify", path)
            assert p.returncode == 0 and not p.stderr.strip(), p.stderr
