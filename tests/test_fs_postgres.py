"""PostgreSQL on the mount: a real server keeps its data directory (with page checksums) on
dwfs, runs pgbench, and survives kill -9 of the dwfs daemon under that load: after
`fusermount3 -u` and a remount, crash recovery replays the WAL, every committed transfer
balances, amcheck and pg_checksums find nothing, and neither does `dwfs fsck --verify-data`.

The server is PostgreSQL's own (`scripts/test` installs it as root, without a cluster); it
runs as the `postgres` user, so this module needs root."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
from mountutil import daemon_pid, dwfs, is_mounted, scratch_mount

BIN = max(glob.glob("/usr/lib/postgresql/*/bin/postgres"), default=None, key=os.path.getmtime)
PORT = 5433  # names the socket file only: the server listens on no TCP address

pytestmark = [
    pytest.mark.skipif(BIN is None, reason="PostgreSQL's server is not installed "
                       "(scripts/test installs it when run as root)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the server runs as the postgres user"),
    pytest.mark.timeout(300),
]

# pgbench moves amounts between accounts, tellers and branches and logs each move in
# pgbench_history: after any crash, the four sums agree for the transactions that committed.
SUMS = ("SELECT (SELECT sum(abalance) FROM pgbench_accounts), "
        "(SELECT sum(bbalance) FROM pgbench_branches), "
        "(SELECT sum(tbalance) FROM pgbench_tellers), "
        "(SELECT coalesce(sum(delta), 0) FROM pgbench_history), "
        "(SELECT count(*) FROM pgbench_history)")


def parents() -> dict[int, int]:
    """Every running process's parent, by pid."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    found[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue  # ended while read
    return found


def descendants(pid: int) -> set[int]:
    """The processes below `pid` in the process tree."""
    of = parents()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in of.items() if parent in frontier} - found
        found |= frontier
    return found


def working_in(directory: str) -> set[int]:
    """The processes whose working directory is `directory` or below it."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue  # ended while read
            if cwd == directory or cwd.startswith(directory + "/"):
                found.add(int(entry))
    return found


def is_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie no longer holds files)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def tool(name: str) -> str:
    """A PostgreSQL program of the same version as the server."""
    return os.path.join(os.path.dirname(BIN), name)


class Server:
    """A PostgreSQL server on `datadir`, in a process group of its own, as the postgres user."""

    def __init__(self, datadir: str, sockets: str, log: str) -> None:
        self.datadir, self.sockets, self.log = datadir, sockets, log
        self.proc: subprocess.Popen | None = None

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        """A client program against this server; its output."""
        p = subprocess.run([tool(args[0]), "-h", self.sockets, "-p", str(PORT), *args[1:]],
                           user="postgres", group="postgres", extra_groups=[],
                           capture_output=True, text=True, timeout=timeout, check=False)
        if check:
            assert p.returncode == 0, f"{args[0]}: {p.stdout[-2000:]}{p.stderr[-2000:]}"
        return p.stdout

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [BIN, "-D", self.datadir, "-k", self.sockets, "-p", str(PORT),
                 "-c", "listen_addresses=", "-c", "max_wal_size=48MB"],
                user="postgres", group="postgres", extra_groups=[], stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while subprocess.run([tool("pg_isready"), "-q", "-h", self.sockets, "-p", str(PORT)],
                             check=False).returncode != 0:
            assert self.proc.poll() is None, self.log_text()[-3000:]
            assert time.monotonic() < deadline, self.log_text()[-3000:]
            time.sleep(0.1)

    def stop(self) -> None:
        """A fast shutdown (SIGINT), which writes a checkpoint."""
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(timeout=120) == 0, self.log_text()[-3000:]

    def kill(self) -> None:
        """kill -9 of the server and every process it started; waits until all are gone.

        PostgreSQL's children each call setsid(), so the server's process group holds only
        the postmaster: the children are found as its descendants, and as any process whose
        working directory is the data directory (a backend forked while this ran)."""
        if self.proc is None:
            return
        doomed = descendants(self.proc.pid) | {self.proc.pid}
        deadline = time.monotonic() + 60
        while True:
            doomed |= working_in(self.datadir)
            alive = {pid for pid in doomed if is_alive(pid)}
            if not alive:
                break
            assert time.monotonic() < deadline, f"PostgreSQL processes {alive} outlived kill -9"
            for pid in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        self.proc.wait(timeout=60)

    def log_text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


def sums(server: Server) -> list[int]:
    out = server.run("psql", "-AtF", " ", "-c", SUMS, "postgres")
    return [int(x) for x in out.split()]


def test_postgres_survives_kill9_of_the_daemon_under_pgbench(tmp_path):
    pg = pwd.getpwnam("postgres")
    sockets = tempfile.mkdtemp(prefix="dwfs-pg-")
    os.chown(sockets, pg.pw_uid, pg.pw_gid)
    log = str(tmp_path / "postgres.log")
    with open(log, "w"):
        pass
    os.chown(log, pg.pw_uid, pg.pw_gid)
    try:
        with scratch_mount("dwfs-pg-", public=True) as (m, _base):
            bench: subprocess.Popen | None = None
            server = Server(m.path("pgdata"), sockets, log)
            try:
                bench = crash_under_pgbench(m, server)
                check_recovery(m, server)
            finally:  # before the mount goes: nothing may keep it busy
                if bench is not None and bench.poll() is None:
                    bench.kill()
                    bench.wait(timeout=60)
                server.kill()
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


def crash_under_pgbench(m, server: Server) -> subprocess.Popen:
    """A new cluster on the mount, pgbench's tables, then kill -9 of the dwfs daemon while 4
    pgbench clients run; the server is killed too (it cannot go on without its files), and
    the dead mount is undone with fusermount3. Returns the (ended) pgbench."""
    pg = pwd.getpwnam("postgres")
    datadir = server.datadir
    os.mkdir(datadir, 0o700)
    os.chown(datadir, pg.pw_uid, pg.pw_gid)
    init = subprocess.run([tool("initdb"), "-D", datadir, "--data-checksums",
                           "-A", "trust", "-U", "postgres"],
                          user="postgres", group="postgres", extra_groups=[],
                          capture_output=True, text=True, timeout=120, check=False)
    assert init.returncode == 0, init.stdout + init.stderr
    server.start()
    server.run("pgbench", "-i", "-q", "-s", "2", "postgres")
    server.run("psql", "-c", "CREATE EXTENSION amcheck", "postgres")
    assert sums(server) == [0, 0, 0, 0, 0]
    # Load: 4 clients for up to a minute; the daemon dies once 500 transfers committed.
    bench = subprocess.Popen(
        [tool("pgbench"), "-h", server.sockets, "-p", str(PORT), "-n", "-c", "4", "-j", "2",
         "-T", "60", "postgres"], user="postgres", group="postgres",
        extra_groups=[], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while sums(server)[4] < 500:
        assert bench.poll() is None, "pgbench ended early"
        assert time.monotonic() < deadline, "pgbench made no progress"
        time.sleep(0.1)
    os.kill(daemon_pid(m.warehouse), signal.SIGKILL)
    bench.wait(timeout=120)
    assert bench.returncode != 0  # cut off by the dead mount
    server.kill()
    unmount = subprocess.run(["fusermount3", "-u", m.mountpoint], capture_output=True,
                             text=True, check=False)
    assert unmount.returncode == 0, unmount.stderr
    assert not is_mounted(m.mountpoint)
    return bench


def check_recovery(m, server: Server) -> None:
    """Remount without repair; the server recovers, and the data checks out every way."""
    m.mount()
    os.unlink(os.path.join(server.datadir, "postmaster.pid"))  # left by the killed server
    server.start()
    assert "redo done" in server.log_text()  # it did recover from the WAL
    a, b, t, h, n = sums(server)
    assert n >= 500 and a == b == t == h, (a, b, t, h, n)
    server.run("pg_amcheck", "--heapallindexed", "--rootdescend", "postgres")
    server.stop()
    checked = subprocess.run([tool("pg_checksums"), "-c", "-D", server.datadir],
                             user="postgres", group="postgres", extra_groups=[],
                             capture_output=True, text=True, timeout=120, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Bad checksums:  0" in checked.stdout, checked.stdout
    m.umount()
    p = dwfs("fsck", "--verify-data", m.warehouse, check=False)
    assert p.returncode == 0 and "clean" in p.stdout, p.stdout + p.stderr
