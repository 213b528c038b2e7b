"""The `dwfs` command line itself: what a command loads before it runs, and how it reports
a user's mistake."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("numpy", "rich", "apsw", "galois", "numba", "trio", "raid.volume", "vfs.fs")


def dwfs_cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dwfs.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def _loaded(modules: str, watched: tuple[str, ...]) -> list[str]:
    """Which of `watched` are in sys.modules after importing `modules` in a new interpreter."""
    probe = (f"import json, sys, {modules}; "
             f"print(json.dumps(sorted(m for m in {watched!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_command_line_loads_no_array_code_until_a_command_needs_it():
    # `dwfs ghost ...` and `dwfs smart ...` only talk to the mount's daemon, and so do
    # `status`, `scrub` and `replace` of a mounted warehouse: they must not pay for numpy,
    # SQLite or rich at every start (a ghost import of 10,000 files takes about as long as
    # importing them; `dwfs status` took 0.4 s with them, 0.15 s without).
    assert _loaded("dwfs.cli, dwfs.ghostcli, dwfs.smartcli, dwfs.arraycli", HEAVY) == []
    # Nor for the standard modules they do without (~20 ms of a 60 ms start).
    assert _loaded("dwfs.cli, dwfs.ghostcli, dwfs.smartcli",
                   ("dataclasses", "subprocess", "shutil")) == []


@pytest.mark.parametrize("args, message", [
    (("status", "/nonexistent/warehouse"), "is not a dwfs warehouse"),
    (("mkfs", "{tmp}/w", "--level", "raid9", "--devices", "3", "--device-size", "1M"),
     "unknown level 'raid9'"),
    (("mkfs", "{tmp}/w", "--level", "raid5", "--devices", "2", "--device-size", "1M"),
     "raid5 needs at least 3 members, got 2"),
    (("ghost", "import", "/nonexistent/source", "{tmp}"), "is not a directory"),
    (("ghost", "import", "{tmp}", "{tmp}"), "is not inside a mounted dwfs filesystem"),
])
def test_a_mistake_is_one_line_on_standard_error_and_exit_status_1(tmp_path, args, message):
    done = dwfs_cli(*(a.format(tmp=tmp_path) for a in args))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.startswith("dwfs: error: ") and message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "w").exists()


def test_an_array_beyond_its_tolerance_is_reported_in_one_line(tmp_path):
    wh = tmp_path / "w"
    made = dwfs_cli("mkfs", str(wh), "--level", "raid5", "--devices", "3", "--device-size", "8M")
    assert made.returncode == 0, made.stderr
    for slot in (0, 1):
        (wh / "members" / f"member-{slot}.img").unlink()
    done = dwfs_cli("scrub", str(wh))
    assert done.returncode == 1
    assert done.stderr.startswith("dwfs: error: raid5 tolerates 1 failed members")
    assert "slot 0 missing" in done.stderr and "slot 1 missing" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_closing_daemon_leaves_a_newer_daemons_control_socket_alone(tmp_path):
    """A daemon still closing when the next one of the same warehouse has started must not
    remove the newer one's control socket (its `dwfs umount` could then not reach it)."""
    import os
    import socket
    import time

    from dwfs.control_server import _identity, _remove_if_ours

    path = str(tmp_path / "ctl.sock")
    old = socket.socket(socket.AF_UNIX)
    old.bind(path)
    ours = _identity(path)
    os.unlink(path)  # the newer daemon replaces it
    time.sleep(0.01)  # (a later change time, even where the inode number is reused)
    new = socket.socket(socket.AF_UNIX)
    new.bind(path)
    try:
        _remove_if_ours(path, ours)
        assert os.path.exists(path) and _identity(path) != ours
        _remove_if_ours(path, _identity(path))
        assert not os.path.exists(path)
        _remove_if_ours(path, ours)  # already gone: nothing to do
    finally:
        old.close()
        new.close()


@pytest.mark.timeout(120)
def test_commands_take_the_mount_point_and_umount_takes_the_warehouse(tmp_path):
    """`dwfs status|scrub|fsck|replace MOUNTPOINT` act on the warehouse mounted there, as
    `zpool status` or `btrfs scrub` take what the user sees; `dwfs umount WAREHOUSE`
    unmounts it, as umount(8) takes a device."""
    from mountutil import is_mounted, mounted_warehouse

    with mounted_warehouse(tmp_path) as m:
        shown = dwfs_cli("status", "--json", m.mountpoint)
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        assert doc["warehouse"] == m.warehouse and doc["mountpoint"] == m.mountpoint
        every = dwfs_cli("status", "--json")  # no warehouse named: every mounted one
        assert m.warehouse in [d["warehouse"] for d in json.loads(every.stdout)], every.stderr
        assert f"warehouse  {m.warehouse}  (mounted at {m.mountpoint})" in \
            dwfs_cli("status").stdout
        scrubbed = dwfs_cli("scrub", "--json", m.mountpoint)
        assert scrubbed.returncode == 0, scrubbed.stderr
        assert json.loads(scrubbed.stdout)["rows_checked"] > 0
        checked = dwfs_cli("fsck", m.mountpoint)  # the warehouse is in use: refused, by name
        assert checked.returncode == 8
        assert f"warehouse {m.warehouse} is in use" in checked.stderr
        bad = dwfs_cli("replace", m.mountpoint, "9")
        assert bad.returncode == 1 and "slot 9" in bad.stderr, bad.stderr
        # A directory that is not a mount point is still taken as a warehouse.
        plain = dwfs_cli("status", str(tmp_path))
        assert plain.returncode == 1 and "is not a dwfs warehouse" in plain.stderr
        done = dwfs_cli("umount", m.warehouse, cwd="/")
        assert done.returncode == 0, done.stderr
        assert f"unmounted {m.mountpoint}" in done.stdout
        assert not is_mounted(m.mountpoint)
        m.mount()  # (the context unmounts it again)
    missing = dwfs_cli("umount", m.warehouse)
    assert missing.returncode == 1 and "is not mounted" in missing.stderr


def test_status_tells_when_the_last_scrub_ran_and_what_it_found(tmp_path):
    wh = tmp_path / "w"
    made = dwfs_cli("mkfs", str(wh), "--level", "raid5", "--devices", "3", "--device-size", "8M")
    assert made.returncode == 0, made.stderr
    shown = dwfs_cli("status", str(wh))
    assert "scrubbed   never" in shown.stdout
    assert json.loads(dwfs_cli("status", "--json", str(wh)).stdout)["last_scrub"] is None
    scrubbed = json.loads(dwfs_cli("scrub", "--json", str(wh)).stdout)
    last = json.loads(dwfs_cli("status", "--json", str(wh)).stdout)["last_scrub"]
    assert {k: last[k] for k in ("rows_checked", "errors", "repair")} == \
        {"rows_checked": scrubbed["rows_checked"], "errors": 0, "repair": False}
    assert "s ago)" in dwfs_cli("status", str(wh)).stdout
    # A record that cannot be read is as good as none (and logged), not a failure of status.
    (wh / "last-scrub.json").write_text("{not json")
    done = dwfs_cli("status", "--json", str(wh))
    assert done.returncode == 0 and json.loads(done.stdout)["last_scrub"] is None


@pytest.mark.timeout(120)
def test_mounting_a_degraded_array_says_so(tmp_path):
    """As mdadm says an array "has been started with 4 drives (out of 5)"."""
    from mountutil import force_unmount, make_warehouse

    wh = make_warehouse(tmp_path / "wh")
    (tmp_path / "wh" / "members" / "member-3.img").unlink()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        done = dwfs_cli("mount", wh, str(mnt))
        assert done.returncode == 0, done.stderr
        assert f"dwfs: the array is degraded: slot 3 ({wh}/members/member-3.img) missing " \
               f"(`dwfs replace {wh} 3` rebuilds it)" in done.stderr
        assert dwfs_cli("umount", str(mnt)).returncode == 0
        clean = make_warehouse(tmp_path / "wh2")
        done = dwfs_cli("mount", clean, str(mnt))
        assert done.returncode == 0 and "degraded" not in done.stderr, done.stderr
        assert dwfs_cli("umount", str(mnt)).returncode == 0
    finally:
        force_unmount(str(mnt), wh)
