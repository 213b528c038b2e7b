"""Model-based test: random sequences of POSIX operations on the mount and on a plain reference
directory (ext4 under /var/tmp) must give the same errno or result, and leave the same tree
(names, types, modes, sizes, link counts, hard-link groups, contents, symlink targets, xattrs).
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import stat
import struct

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from mountutil import scratch_mount
from posixutil import (
    APPEND,
    FALLOC_KEEP_SIZE,
    FALLOC_PUNCH_HOLE,
    FALLOC_ZERO_RANGE,
    IMMUTABLE,
    NOATIME,
    NOBODY,
    NODUMP,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    as_user,
    clear_flags,
    fallocate,
    get_flags,
    renameat2,
    set_flags,
)

LONG = "L" * 255
TOO_LONG = "T" * 256
NAMES = ["a", "b", "c", "a", "b", "c", LONG, TOO_LONG]
TARGETS = ["a", "b", "a/b", "c/a/b", "missing", LONG, "a/" + LONG]
MODES = [0o755, 0o700, 0o644, 0o600, 0o000, 0o1777, 0o2755, 0o4755, 0o777]
XATTR_NAMES = ["user.a", "user.b", "trusted.t"]
OFFSETS = [0, 1, 4095, 4096, 65535, 65536, 65537, 131072, 200_000, 300_001, 1_040_000, 1_048_576]
SIZES = [0, 1, 100, 4096, 65535, 65536, 65537, 150_000, 310_000, 1_048_580]
OPEN_FLAGS = [
    os.O_RDONLY, os.O_WRONLY, os.O_RDWR,
    os.O_RDWR | os.O_CREAT, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    os.O_RDWR | os.O_CREAT | os.O_TRUNC, os.O_WRONLY | os.O_APPEND,
    os.O_RDWR | os.O_APPEND | os.O_CREAT, os.O_WRONLY | os.O_TRUNC,
    os.O_RDONLY | os.O_DIRECTORY,
]
MAX_OPEN = 6
# fallocate modes ext4 and dwfs both have (a hole without KEEP_SIZE: EOPNOTSUPP on both)
FALLOCATE_MODES = [0, FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, FALLOC_ZERO_RANGE,
                   FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE]
OWNERS = [(0, 0), (NOBODY, NOBODY), (0, 4321), (NOBODY, 4321)]
FLAG_SETS = [0, 0, IMMUTABLE, APPEND, IMMUTABLE | APPEND, NODUMP | NOATIME]
# (mount, ext4) outcomes that differ on an immutable or append-only file or directory because
# the kernel decides before a FUSE filesystem is asked, not knowing its flags: ext4 checks the
# flags first and says EPERM; on the mount the kernel's permission check says EACCES, and its
# type checks of rmdir, unlink and rename ENOTDIR or EISDIR.
KERNEL_FIRST = {(("err", e), ("err", "EPERM")) for e in ("EACCES", "ENOTDIR", "EISDIR")}


ACL_NAMES = ["system.posix_acl_access", "system.posix_acl_default"]
PERM = st.integers(0, 7)


def acl_value(owner: int, group: int, other: int, named: list[tuple[int, int, int]],
              mask: int | None) -> bytes:
    """An access control list in the kernel's binary form (version 2; entries: tag, perm, id;
    named users and groups sorted by id, a mask when there are any)."""
    no_id = 0xFFFFFFFF
    entries = [(0x01, owner, no_id)]
    entries += sorted((0x02, p, i) for tag, p, i in named if tag == 0x02)
    entries += [(0x04, group, no_id)]
    entries += sorted((0x08, p, i) for tag, p, i in named if tag == 0x08)
    if named or mask is not None:
        entries.append((0x10, 7 if mask is None else mask, no_id))
    entries.append((0x20, other, no_id))
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _append(p: str) -> int:
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        return os.write(fd, b"by nobody")
    finally:
        os.close(fd)


def _read(p: str) -> bytes:
    with open(p, "rb") as f:
        return f.read()


# Operations a non-root user tries; the kernel's default_permissions and the filesystem's own
# rules (sticky and setgid directories, ownership of new files) decide.
NOBODY_OPS = {
    "create": lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o666)),
    "create_setgid": lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o2775)),
    "append": _append,
    "read": _read,
    "mkdir": lambda p: os.mkdir(p, 0o777),
    "unlink": os.unlink,
    "rmdir": os.rmdir,
    "chmod": lambda p: os.chmod(p, 0o2770),
    "chown_group": lambda p: os.chown(p, -1, 4321),
    "utime_now": lambda p: os.utime(p),
    "utime_set": lambda p: os.utime(p, ns=(5, 5)),
    "truncate": lambda p: os.truncate(p, 1),
    "setxattr": lambda p: os.setxattr(p, "user.n", b"nobody"),
    "setacl": lambda p: os.setxattr(p, "system.posix_acl_access", acl_value(7, 5, 5, [], None)),
    "getxattr": lambda p: os.getxattr(p, "user.a"),
    "listdir": lambda p: sorted(os.listdir(p)),
    "stat": lambda p: stat_key(os.stat(p)),
}
NOBODY_OPS2 = {
    "rename": os.rename,
    "link": os.link,
    "symlink": lambda a, b: os.symlink("t", b),
}

def outcome(func):
    """('ok', result) or ('err', errno name) of calling func()."""
    try:
        return ("ok", func())
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno, exc.errno))


def stat_key(st: os.stat_result, size: bool = True) -> tuple:
    """What must agree between the two trees (not atime, not a directory's size)."""
    keep_size = size and not stat.S_ISDIR(st.st_mode)
    device = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
    return (stat.filemode(st.st_mode), st.st_nlink, st.st_uid, st.st_gid,
            st.st_size if keep_size else None, st.st_rdev if device else None)


def xattrs_of(path: str) -> list[tuple[str, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        return [("error", str(exc.errno).encode())]
    return sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)


def snapshot(root: str) -> dict:
    """Everything that must agree about a tree, keyed by path relative to `root`."""
    out: dict = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            entry = [stat_key(st), xattrs_of(path)]
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                entry.append(get_flags(path))
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    entry.append(f.read())
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                entry.append(os.readlink(path))
                inodes.setdefault(st.st_ino, []).append(rel)
            out[rel] = entry
    out["<hard-link groups>"] = sorted(sorted(g) for g in inodes.values() if len(g) > 1)
    out["<root>"] = stat_key(os.lstat(root))
    return out


class PosixModel(RuleBasedStateMachine):
    """Each example works in a fresh subdirectory of the mount and of the reference."""

    mount_root = ""
    ref_root = ""
    counter = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        n = next(self.counter)
        self.roots = (os.path.join(self.ref_root, f"ex{n}"), os.path.join(self.mount_root,
                                                                           f"ex{n}"))
        for r in self.roots:
            os.mkdir(r)
            os.chmod(r, 0o777)
        self.fds: list[tuple[int, int]] = []

    # --- helpers ---------------------------------------------------------------------------------

    def both(self, op, *rels: str):
        """Run `op(*paths)` on the reference and on the mount; the outcomes must agree."""
        ref = outcome(lambda: op(*(os.path.join(self.roots[0], r) for r in rels)))
        got = outcome(lambda: op(*(os.path.join(self.roots[1], r) for r in rels)))
        if got != ref and (got, ref) in KERNEL_FIRST and any(map(self.flagged, rels)):
            return ref
        assert got == ref, f"{getattr(op, '__name__', op)}{rels}: mount {got!r}, ext4 {ref!r}"
        return ref

    def both_fd(self, i: int, op):
        ref_fd, mnt_fd = self.fds[i % len(self.fds)]
        ref = outcome(lambda: op(ref_fd))
        got = outcome(lambda: op(mnt_fd))
        assert got == ref, f"{getattr(op, '__name__', op)} on fd: mount {got!r}, ext4 {ref!r}"
        return ref

    def existing(self) -> list[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.roots[0]):
            for name in dirnames + filenames:
                out.append(os.path.relpath(os.path.join(dirpath, name), self.roots[0]))
        return sorted(out)

    def existing_dirs(self) -> list[str]:
        return [""] + [p for p in self.existing()
                       if stat.S_ISDIR(os.lstat(os.path.join(self.roots[0], p)).st_mode)]

    def path(self, data, new: bool = False, old: bool = False) -> str:
        """An existing path, a new name in an existing directory, or a random path (mostly
        new ones if `new`, mostly existing ones if `old`)."""
        if new:
            kinds = ["new"] * 3 + ["random"]
        elif old:
            kinds = ["existing"] * 8 + ["new", "random"]
        else:
            kinds = ["existing"] * 6 + ["new"] * 3 + ["random"]
        kind = data.draw(st.sampled_from(kinds))
        if kind == "existing" and self.existing():
            return data.draw(st.sampled_from(self.existing()))
        if kind in ("new", "existing"):
            parent = data.draw(st.sampled_from(self.existing_dirs()))
            return os.path.join(parent, data.draw(st.sampled_from(NAMES)))
        parts = data.draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3))
        return "/".join(parts)

    @initialize(data=st.data())
    def populate(self, data):
        """A few directories and files to start from."""
        for top in "abc":
            kind = data.draw(st.sampled_from(["dir", "file", "none"]))
            if kind == "file":
                self.create_file(data, top)
            elif kind == "dir":
                self.both(os.mkdir, top)
                for sub in data.draw(st.lists(st.sampled_from(NAMES[:3]), max_size=2,
                                              unique=True)):
                    self.create_file(data, f"{top}/{sub}")

    def create_file(self, data, rel: str) -> None:
        size = data.draw(st.sampled_from(SIZES))
        content = bytes([data.draw(st.integers(1, 255))]) * size

        def op(p):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                return os.write(fd, content)
            finally:
                os.close(fd)

        self.both(op, rel)

    @rule(data=st.data())
    def write_file(self, data):
        self.create_file(data, self.path(data, new=data.draw(st.booleans())))

    # --- names -----------------------------------------------------------------------------------

    @rule(data=st.data(), mode=st.sampled_from(MODES))
    def mkdir(self, data, mode):
        self.both(lambda p: os.mkdir(p, mode), self.path(data, new=True))

    @rule(data=st.data())
    def rmdir(self, data):
        self.both(os.rmdir, self.path(data))

    @rule(data=st.data())
    def unlink(self, data):
        self.both(os.unlink, self.path(data))

    @rule(data=st.data(), flags=st.sampled_from([0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE,
                                                 RENAME_WHITEOUT,
                                                 RENAME_WHITEOUT | RENAME_NOREPLACE]))
    def rename(self, data, flags):
        src = self.path(data, old=True)
        dst = self.path(data, new=data.draw(st.booleans()))
        if flags:
            self.both(lambda a, b: renameat2(a, b, flags), src, dst)
        else:
            self.both(os.rename, src, dst)

    @rule(data=st.data())
    def rename_into_own_subtree(self, data):
        dirs = self.existing_dirs()[1:]
        if not dirs:
            return
        src = data.draw(st.sampled_from(dirs))
        below = [d for d in dirs if d.startswith(src + "/")]
        dst = os.path.join(data.draw(st.sampled_from([src] + below)),
                           data.draw(st.sampled_from(NAMES[:3])))
        self.both(os.rename, src, dst)

    @rule(data=st.data())
    def link(self, data):
        self.both(os.link, self.path(data, old=True), self.path(data, new=True))

    @rule(data=st.data(), dest=st.sampled_from(TARGETS))
    def symlink(self, data, dest):
        self.both(lambda p: os.symlink(dest, p), self.path(data, new=True))

    @rule(data=st.data())
    def readlink(self, data):
        self.both(os.readlink, self.path(data))

    @rule(data=st.data())
    def listdir(self, data):
        self.both(lambda p: sorted(os.listdir(p)), self.path(data))

    @rule(data=st.data())
    def stat_path(self, data):
        self.both(lambda p: stat_key(os.stat(p)), self.path(data))

    # --- attributes ------------------------------------------------------------------------------

    @rule(data=st.data(), owner=st.sampled_from(OWNERS))
    def chown(self, data, owner):
        self.both(lambda p: os.chown(p, *owner), self.path(data))

    @rule(data=st.data(), op=st.sampled_from(sorted(NOBODY_OPS)))
    def as_nobody(self, data, op):
        func = NOBODY_OPS[op]
        self.both(lambda p: as_user(lambda: func(p)), self.path(data))

    @rule(data=st.data(), op=st.sampled_from(sorted(NOBODY_OPS2)))
    def as_nobody2(self, data, op):
        func = NOBODY_OPS2[op]
        self.both(lambda a, b: as_user(lambda: func(a, b)), self.path(data, old=True),
                  self.path(data, new=data.draw(st.booleans())))

    def flagged(self, rel: str) -> bool:
        """True if `rel` (or what it links to) or its directory is immutable or append-only
        (in the reference)."""
        for p in (rel, os.path.dirname(rel)):
            path = os.path.join(self.roots[0], p)
            if os.path.isdir(path) or os.path.isfile(path):
                if get_flags(path) & (IMMUTABLE | APPEND):
                    return True
        return False

    @rule(data=st.data(), flags=st.sampled_from(FLAG_SETS))
    def chattr(self, data, flags):
        self.both(lambda p: set_flags(p, flags), self.path(data, old=True))

    @rule(data=st.data())
    def lsattr(self, data):
        self.both(get_flags, self.path(data))

    @rule(data=st.data(), mode=st.sampled_from(MODES))
    def chmod(self, data, mode):
        self.both(lambda p: os.chmod(p, mode), self.path(data))

    # times ext4 and dwfs both keep exactly: from 1901 (ext4's first second, -2**31 s, also
    # drops the nanoseconds of times within it, so it is left out) to 2242 (before 2262)
    @rule(data=st.data(), atime=st.integers((1 - 2**31) * 10**9, 2**33 * 10**9),
          mtime=st.integers((1 - 2**31) * 10**9, 2**33 * 10**9), follow=st.booleans())
    def utime(self, data, atime, mtime, follow):
        def op(p):
            os.utime(p, ns=(atime, mtime), follow_symlinks=follow)
            s = os.stat(p, follow_symlinks=follow)
            return s.st_atime_ns, s.st_mtime_ns

        self.both(op, self.path(data))

    @rule(data=st.data(), size=st.sampled_from(SIZES))
    def truncate(self, data, size):
        self.both(lambda p: os.truncate(p, size), self.path(data))

    @rule(data=st.data(), name=st.sampled_from(XATTR_NAMES), value=st.binary(max_size=40),
          flags=st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]), follow=st.booleans())
    def setxattr(self, data, name, value, flags, follow):
        self.both(lambda p: os.setxattr(p, name, value, flags, follow_symlinks=follow),
                  self.path(data))

    @rule(data=st.data(), name=st.sampled_from(ACL_NAMES), owner=PERM, group=PERM, other=PERM,
          named=st.lists(st.tuples(st.sampled_from([0x02, 0x08]), PERM,
                                   st.sampled_from([NOBODY, 4321])),
                         max_size=2, unique_by=lambda e: (e[0], e[2])),
          mask=st.one_of(st.none(), PERM), follow=st.booleans())
    def setacl(self, data, name, owner, group, other, named, mask, follow):
        value = acl_value(owner, group, other, named, mask)
        self.both(lambda p: os.setxattr(p, name, value, follow_symlinks=follow),
                  self.path(data))

    @rule(data=st.data(), name=st.sampled_from(ACL_NAMES))
    def getacl(self, data, name):
        self.both(lambda p: os.getxattr(p, name), self.path(data))

    @rule(data=st.data(), name=st.sampled_from(ACL_NAMES))
    def removeacl(self, data, name):
        p = self.path(data)
        if name.endswith("default") and os.path.isfile(os.path.join(self.roots[0], p)) \
                and self.flagged(p):
            # The kernel answers the removal of a file's default ACL itself (there is none),
            # on the mount without asking; ext4 checks the file's flags first (EPERM).
            return
        self.both(lambda p: os.removexattr(p, name), p)

    @rule(data=st.data(), name=st.sampled_from(XATTR_NAMES))
    def getxattr(self, data, name):
        self.both(lambda p: os.getxattr(p, name), self.path(data))

    @rule(data=st.data(), name=st.sampled_from(XATTR_NAMES))
    def removexattr(self, data, name):
        self.both(lambda p: os.removexattr(p, name), self.path(data))

    @rule(data=st.data())
    def listxattr(self, data):
        self.both(lambda p: sorted(os.listxattr(p)), self.path(data))

    # --- open files ------------------------------------------------------------------------------

    @precondition(lambda self: len(self.fds) < MAX_OPEN)
    @rule(data=st.data(), flags=st.sampled_from(OPEN_FLAGS), mode=st.sampled_from(MODES))
    def open(self, data, flags, mode):
        rel = self.path(data)
        ref = outcome(lambda: os.open(os.path.join(self.roots[0], rel), flags, mode))
        got = outcome(lambda: os.open(os.path.join(self.roots[1], rel), flags, mode))
        if ref[0] == got[0] == "ok":
            self.fds.append((ref[1], got[1]))
            return
        for o in (ref, got):
            if o[0] == "ok":
                os.close(o[1])
        assert got == ref, f"open({rel!r}, {flags:#o}): mount {got!r}, ext4 {ref!r}"

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, MAX_OPEN), data=st.binary(min_size=1, max_size=70_000),
          offset=st.one_of(st.none(), st.sampled_from(OFFSETS)))
    def write(self, i, data, offset):
        if offset is None:
            self.both_fd(i, lambda fd: os.write(fd, data))
        else:
            self.both_fd(i, lambda fd: os.pwrite(fd, data, offset))

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, MAX_OPEN), n=st.sampled_from([1, 100, 65536, 400_000]),
          offset=st.one_of(st.none(), st.sampled_from(OFFSETS)))
    def read(self, i, n, offset):
        if offset is None:
            self.both_fd(i, lambda fd: os.read(fd, n))
        else:
            self.both_fd(i, lambda fd: os.pread(fd, n, offset))

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, MAX_OPEN), size=st.sampled_from(SIZES))
    def ftruncate(self, i, size):
        self.both_fd(i, lambda fd: os.ftruncate(fd, size))

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, MAX_OPEN), mode=st.sampled_from(FALLOCATE_MODES),
          offset=st.sampled_from(OFFSETS), length=st.sampled_from([0, 1, 4096, 70_000, 300_000]))
    def fallocate(self, i, mode, offset, length):
        self.both_fd(i, lambda fd: fallocate(fd, mode, offset, length))

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, MAX_OPEN), whence=st.sampled_from([os.SEEK_SET, os.SEEK_END]),
          offset=st.sampled_from([0, 10, 70_000]))
    def lseek(self, i, whence, offset):
        ref_fd = self.fds[i % len(self.fds)][0]
        if whence == os.SEEK_END and stat.S_ISDIR(os.fstat(ref_fd).st_mode):
            return  # SEEK_END of a directory is each filesystem's own (ext4: LLONG_MAX)
        self.both_fd(i, lambda fd: os.lseek(fd, offset, whence))

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, MAX_OPEN))
    def fstat(self, i):
        self.both_fd(i, lambda fd: stat_key(os.fstat(fd)))

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, MAX_OPEN), data_only=st.booleans())
    def fsync(self, i, data_only):
        self.both_fd(i, lambda fd: (os.fdatasync if data_only else os.fsync)(fd))

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, MAX_OPEN))
    def close(self, i):
        ref_fd, mnt_fd = self.fds.pop(i % len(self.fds))
        os.close(ref_fd)
        os.close(mnt_fd)

    # --- the whole tree --------------------------------------------------------------------------

    @invariant()
    def trees_agree(self):
        ref, got = snapshot(self.roots[0]), snapshot(self.roots[1])
        if got != ref:
            diff = {k: (got.get(k), ref.get(k)) for k in set(ref) | set(got)
                    if got.get(k) != ref.get(k)}
            raise AssertionError(f"trees differ (mount, ext4): {diff!r}"[:3000])

    def teardown(self):
        for ref_fd, mnt_fd in self.fds:
            os.close(ref_fd)
            os.close(mnt_fd)
        self.fds = []
        for r in self.roots:
            clear_flags(r)
            shutil.rmtree(r)


@pytest.fixture(scope="module")
def model_mount():
    # non-root steps reach both; `dev` as the ext4 has it (a whiteout, a character device
    # 0/0, then opens with ENXIO on both, not EACCES on a nodev mount)
    with scratch_mount("dwfs-model-", public=True, options=("dev",)) as (m, base):
        ref = os.path.join(base, "ref")
        os.mkdir(ref)
        yield m, ref


@pytest.mark.timeout(600)
def test_posix_model(model_mount):
    """DWFS_MODEL_EXAMPLES=300 in the environment searches longer."""
    m, ref = model_mount
    PosixModel.mount_root = m.mountpoint
    PosixModel.ref_root = ref
    run_state_machine_as_test(
        PosixModel,
        settings=settings(max_examples=int(os.environ.get("DWFS_MODEL_EXAMPLES", "50")),
                          stateful_step_count=40, deadline=None,
                          database=None, suppress_health_check=list(HealthCheck)),
    )
