"""stress-ng's filesystem stressors, with --verify, on a real mount: the kind of exerciser the
mount is judged by from outside. They run all at once (one worker each), so file data, names,
links, locks, attributes, flags, holes and maps are changed concurrently; every stressor must
pass, the daemon must log no ERROR or WARNING, and fsck must find the warehouse clean."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from mountutil import dwfs, make_warehouse

pytestmark = pytest.mark.skipif(shutil.which("stress-ng") is None,
                                reason="stress-ng is not installed (scripts/test installs it)")

# (stressor, its options): each of these ran 30 s with two workers on a mount with nothing
# failing, and passes on ext4.
STRESSORS = [
    ("hdd", ["--hdd-opts", "wr-rnd,rd-rnd,fsync", "--hdd-bytes", "8M"]),
    ("iomix", ["--iomix-bytes", "8M"]),
    ("mmap", ["--mmap-file", "--mmap-bytes", "8M"]),
    ("msync", ["--msync-bytes", "8M"]),
    ("fallocate", ["--fallocate-bytes", "8M"]),
    ("fpunch", []),
    ("copy-file", []),
    ("sendfile", []),
    ("seek", ["--seek-size", "8M"]),
    ("dir", []),
    ("dentry", []),
    ("filename", []),
    ("rename", []),
    ("link", []),
    ("symlink", []),
    ("xattr", []),
    ("inode-flags", []),
    ("chmod", []),
    ("utime", []),
    ("flock", []),
    ("lockf", []),
    ("lockofd", []),
]
SECONDS = 20
PROBLEM = re.compile(r"\b(ERROR|WARNING|CRITICAL)\b|Traceback")


@pytest.mark.timeout(300)
def test_filesystem_stressors_at_once_pass_and_leave_the_warehouse_clean(tmp_path, fs_mount):
    m = fs_mount(make_warehouse(tmp_path / "wh", size="512M"))
    m.mount()
    log = os.path.join(m.warehouse, "dwfs.log")
    before = os.path.getsize(log)
    work = os.path.join(m.mountpoint, "stress")
    os.mkdir(work)
    cmd = ["stress-ng", "--temp-path", work, "--verify", "--timeout", f"{SECONDS}s",
           "--metrics-brief"]
    for name, options in STRESSORS:
        cmd += [f"--{name}", "1", *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 180,
                          check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "successful run completed" in out, out[-4000:]
    ran = {m.group(1) for m in re.finditer(r"metrc: \[\d+\] (\S+) +\d+ ", out)}
    assert ran >= {name for name, _ in STRESSORS}, out[-4000:]  # none was skipped
    failed = [line for line in out.splitlines() if re.search(r"\bfail", line, re.I)
              and not re.search(r"failed: 0\b", line)]
    assert not failed, "\n".join(failed)
    with open(log, errors="replace") as f:
        f.seek(before)
        problems = [line for line in f if PROBLEM.search(line)]
    assert not problems, "".join(problems[:20])
    assert not os.listdir(work)  # stress-ng removed what it made
    m.umount()
    checked = dwfs("fsck", m.warehouse, check=False)
    assert checked.returncode == 0 and "clean" in checked.stdout, checked.stdout + checked.stderr
