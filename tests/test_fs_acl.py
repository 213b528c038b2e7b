"""POSIX access control lists through a real mount, beside ext4: setting lists, chmod,
inheritance of default lists under two umasks, refusals, the kernel's checks against named
users, and a remount."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import subprocess

import pytest
from mountutil import scratch_mount
from posixutil import NOBODY, as_user

ACCESS = "system.posix_acl_access"
DEFAULT = "system.posix_acl_default"
NO_ID = 0xFFFFFFFF
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def acl(*entries: tuple[int, int, int]) -> bytes:
    """A list in the kernel's binary form from (tag, perm, id) entries, in order."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


NOBODY_RW = acl((USER_OBJ, 6, NO_ID), (USER, 6, NOBODY), (GROUP_OBJ, 4, NO_ID),
                (MASK, 6, NO_ID), (OTHER, 4, NO_ID))
NOBODY_NONE = acl((USER_OBJ, 6, NO_ID), (USER, 0, NOBODY), (GROUP_OBJ, 4, NO_ID),
                  (MASK, 4, NO_ID), (OTHER, 4, NO_ID))
MINIMAL = acl((USER_OBJ, 7, NO_ID), (GROUP_OBJ, 5, NO_ID), (OTHER, 1, NO_ID))
INHERIT = acl((USER_OBJ, 7, NO_ID), (USER, 7, NOBODY), (GROUP_OBJ, 5, NO_ID), (GROUP, 3, 4321),
              (MASK, 7, NO_ID), (OTHER, 0, NO_ID))


@pytest.fixture(scope="module")
def roots():
    with scratch_mount("dwfs-acl-", public=True) as (m, base):
        ref = os.path.join(base, "ref")
        os.mkdir(ref)
        os.chmod(ref, 0o755)
        yield ref, m


def state(root: str) -> dict[str, tuple]:
    """Mode and every attribute (names and values) of everything under `root`."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            try:
                names = sorted(os.listxattr(p, follow_symlinks=False))
                xattrs = [(n, os.getxattr(p, n, follow_symlinks=False)) for n in names]
            except OSError as exc:
                xattrs = [("error", errno.errorcode[exc.errno])]
            out[os.path.relpath(p, root)] = (stat.filemode(st.st_mode), xattrs)
    return out


def outcome(fn, *args) -> str:
    try:
        fn(*args)
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]


def scenario(root: str) -> list[str]:
    """The same steps on either tree; what each returned."""
    d = os.path.join(root, "t")
    os.mkdir(d, 0o777)
    os.chmod(d, 0o755)
    f = os.path.join(d, "f")
    with open(f, "wb") as fh:
        fh.write(b"secret")
    os.chmod(f, 0o640)
    said = [outcome(os.setxattr, f, ACCESS, NOBODY_RW)]
    said.append(stat.filemode(os.stat(f).st_mode))  # the group bits are the mask's
    said.append(outcome(os.chmod, f, 0o604))  # the mask follows the group bits
    said.append(repr(os.getxattr(f, ACCESS)))
    g = os.path.join(d, "g")
    with open(g, "wb"):
        pass
    said.append(outcome(os.setxattr, g, ACCESS, MINIMAL))  # says no more than the mode
    said.append(outcome(os.setxattr, g, DEFAULT, INHERIT))  # a file has no default list
    said.append(outcome(os.setxattr, g, ACCESS, b"\x02\x00\x00\x00\x01\x00"))  # malformed
    said.append(outcome(os.removexattr, g, ACCESS))  # not there: fine
    inherit = os.path.join(d, "inherit")
    os.mkdir(inherit)
    said.append(outcome(os.setxattr, inherit, DEFAULT, INHERIT))
    for umask in (0o022, 0o077):
        old = os.umask(umask)
        try:
            for where in (inherit, d):
                base = os.path.join(where, f"u{umask:o}")
                os.close(os.open(base + "-file", os.O_CREAT | os.O_WRONLY, 0o666))
                os.mkdir(base + "-dir", 0o777)
                os.mkfifo(base + "-fifo", 0o640)
                os.symlink("x", base + "-link")
                os.mkdir(os.path.join(base + "-dir", "deeper"), 0o750)  # inherits again
        finally:
            os.umask(old)
    return said


def test_lists_beside_ext4(roots):
    ref, m = roots
    want = scenario(ref)
    got = scenario(m.mountpoint)
    assert got == want
    ref_state, got_state = state(os.path.join(ref, "t")), state(m.path("t"))
    diff = {k: (got_state.get(k), ref_state.get(k)) for k in set(ref_state) | set(got_state)
            if got_state.get(k) != ref_state.get(k)}
    assert not diff, f"(mount, ext4): {diff}"


def test_the_kernel_checks_named_entries(roots):
    _ref, m = roots
    p = m.path("checked")
    with open(p, "wb") as fh:
        fh.write(b"data")
    os.chmod(p, 0o600)
    read = lambda: open(p, "rb").read()  # noqa: E731
    with pytest.raises(OSError) as exc:
        as_user(read)
    assert exc.value.errno == errno.EACCES
    os.setxattr(p, ACCESS, NOBODY_RW)
    assert as_user(read) == b"data"
    os.setxattr(p, ACCESS, NOBODY_NONE)  # named nobody: nothing, though others may read
    assert oct(os.stat(p).st_mode & 0o777) == oct(0o644)
    with pytest.raises(OSError) as exc:
        as_user(read)
    assert exc.value.errno == errno.EACCES
    assert as_user(read, uid=4242, gid=4242) == b"data"
    # the list is stored: it is there after a remount, and still checked
    m.umount()
    m.mount()
    assert os.getxattr(p, ACCESS) == NOBODY_NONE
    with pytest.raises(OSError) as exc:
        as_user(read)
    assert exc.value.errno == errno.EACCES


def test_cp_and_rsync_carry_lists(roots):
    """`cp -a` and `rsync -aAX` copy a tree with access and default lists from ext4 onto the
    mount and back, unchanged."""
    ref, m = roots
    src = os.path.join(ref, "tree")
    os.makedirs(os.path.join(src, "sub"))
    with open(os.path.join(src, "sub", "f"), "wb") as fh:
        fh.write(b"f")
    os.setxattr(os.path.join(src, "sub", "f"), ACCESS, NOBODY_RW)
    os.setxattr(os.path.join(src, "sub"), DEFAULT, INHERIT)
    want = state(src)
    subprocess.run(["cp", "-a", src, m.path("cp-tree")], check=True)
    assert state(m.path("cp-tree")) == want
    if shutil.which("rsync"):
        subprocess.run(["rsync", "-aAX", src + "/", m.path("rsync-tree") + "/"], check=True)
        assert state(m.path("rsync-tree")) == want
        back = os.path.join(ref, "back")
        subprocess.run(["rsync", "-aAX", m.path("rsync-tree") + "/", back + "/"], check=True)
        assert state(back) == want


def test_a_non_member_setting_a_list_loses_setgid(roots):
    """As on ext4: an owner outside the file's group who sets an access list clears the
    setgid bit (a member keeps it)."""
    ref, m = roots
    modes = []
    for root in (ref, m.mountpoint):
        for name, gid in (("outsider", 4321), ("member", NOBODY)):
            p = os.path.join(root, f"sgid-{name}")
            with open(p, "wb"):
                pass
            os.chown(p, NOBODY, gid)
            os.chmod(p, 0o2775)
            as_user(lambda p=p: os.setxattr(p, ACCESS, MINIMAL))
            modes.append(stat.filemode(os.stat(p).st_mode))
    assert modes[2:] == modes[:2]
    assert modes[:2] == ["-rwxr-x--x", "-rwxr-s--x"]
