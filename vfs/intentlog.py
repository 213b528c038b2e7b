"""The intent log: small volume writes made durable in the metadata database, so that an fsync
costs one database commit rather than a flush of every member (ZFS's ZIL, in spirit).

The filesystem writes file data to the volume through an `IntentLog`, which remembers the
writes made since the volume was last flushed (up to LOG_BYTES of them). A commit that asks for
it (`fsync`) and finds that little unflushed stores those writes as rows of `intent_log` in the
same transaction as the metadata that points to them, and leaves the volume unflushed: the
data is then durable twice over once the volume flushes, and once in the database until then.
Every other commit (the background one every few seconds, unmount, anything larger) flushes
the volume first and empties the log in its transaction, as before.

After a crash, the rows of a committed log are written to the volume again, in order, before
the filesystem is used (`replay`): they hold the last bytes written at those places by the
time of that commit, and whatever reached the members after it was never committed. A
read-only open cannot write: it reads through the rows instead (`read_through`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vfs.filedata import VolumeLike
    from vfs.metadb import MetaDB

log = logging.getLogger(__name__)

LOG_BYTES = 1024 * 1024  # unflushed writes a commit may put in the log instead of flushing
HELD_SCAN = 64  # newest remembered writes a read looks through before asking the volume

_ROWS = "SELECT offset, data FROM intent_log ORDER BY seq"
_TABLE = ("CREATE TABLE IF NOT EXISTS intent_log (seq INTEGER PRIMARY KEY, "
          "offset INTEGER NOT NULL, data BLOB NOT NULL)")


class IntentLog:
    """A volume, as the filesystem sees it, that keeps what it has not flushed yet."""

    def __init__(self, volume: VolumeLike, db: MetaDB) -> None:
        self.volume = volume
        self.db = db
        self.capacity = volume.capacity
        self.stripe_bytes = volume.stripe_bytes
        self._pending: list[tuple[int, Any]] = []  # (offset, bytes) written since the flush
        self._pending_bytes = 0
        self._logged = 0  # how many of _pending are rows already (committed or not)
        self._too_much = False  # more was written since the flush than the log takes
        self._rows = 0  # rows in the table, committed or in the open transaction
        self._overlay: list[tuple[int, bytes]] = []  # a read-only open's rows
        if self._has_table():
            self._rows = db.value("SELECT count(*) FROM intent_log", default=0)

    @classmethod
    def opened(cls, volume: VolumeLike, db: MetaDB, write: bool) -> IntentLog:
        """`volume` seen through the log in `db`, with a committed log's rows written to it
        again (`write`) or read through (a read-only open, a check)."""
        logged = cls(volume, db)
        if write:
            logged.replay()
        else:
            logged.read_through()
        return logged

    def _has_table(self) -> bool:
        return self.db.value("SELECT 1 FROM sqlite_master WHERE type='table' AND "
                             "name='intent_log'") is not None

    # --- the volume's interface -------------------------------------------------------------

    def write(self, offset: int, data: Any) -> None:
        """Write to the volume, and remember the bytes until the volume is flushed."""
        self.volume.write(offset, data)
        if self._too_much:
            return
        n = memoryview(data).nbytes
        if self._pending_bytes + n > LOG_BYTES:
            self._too_much = True
            self._pending.clear()
            self._pending_bytes = self._logged = 0
            return
        self._pending.append((offset, data))  # the volume's writers never change it later
        self._pending_bytes += n

    def read(self, offset: int, length: int, caller_checks: bool = False) -> Any:
        """Read from the volume (through a read-only open's logged writes); bytes that one
        write since the volume's flush holds whole come from it, without a volume read. (See
        `Volume.read` for `caller_checks`.)"""
        held = self._held(offset, length)
        if held is not None:
            return held
        out = self.volume.read(offset, length, caller_checks)
        if self._overlay:
            out = _patched(out, offset, self._overlay)
        return out

    def _held(self, offset: int, length: int) -> memoryview | None:
        """[offset, offset + length) from the newest remembered write that touches it, if
        that write holds all of it (a small write's partial sector, read back to be completed:
        SQLite's WAL frames, for one, do not start on sector boundaries)."""
        end = offset + length
        for i in range(len(self._pending) - 1, max(-1, len(self._pending) - HELD_SCAN - 1), -1):
            o, d = self._pending[i]
            view = memoryview(d).cast("B")
            if o < end and offset < o + view.nbytes:
                if o <= offset and end <= o + view.nbytes:
                    return view[offset - o : end - o]
                return None  # newer bytes for part of the range only: ask the volume
        return None

    def flush(self) -> None:
        """Flush the volume (what was written stays remembered until `forget`)."""
        self.volume.flush()

    def parity_only_chunks(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """As the volume's."""
        return self.volume.parity_only_chunks(offset, length)

    # --- commits --------------------------------------------------------------------------------

    def can_log(self) -> bool:
        """Whether what was written since the volume's flush fits in the log."""
        return not self._too_much and bool(self._pending)

    def would_log(self, more: int) -> bool:
        """Whether what was written since the volume's flush, and `more` bytes besides, would
        fit in the log."""
        return not self._too_much and self._pending_bytes + more <= LOG_BYTES

    def log_pending(self) -> None:
        """Add the writes not yet in the log to it (inside the open transaction)."""
        new = self._pending[self._logged:]
        if not self._rows:
            self.db.change(_TABLE)  # made on first use: nothing changes for a database
            # whose filesystem never logged (a read-only fsck writes nothing)
        self.db.changemany("INSERT INTO intent_log (offset, data) VALUES (?, ?)",
                           [(o, bytes(d)) for o, d in new])
        self._logged = len(self._pending)
        self._rows += len(new)

    def forget(self) -> None:
        """The volume was flushed with every write so far (under the filesystem lock): empty
        the log, in the open transaction."""
        self._pending.clear()
        self._pending_bytes = self._logged = 0
        self._too_much = False
        if self._rows:
            self.db.change("DELETE FROM intent_log")
            self._rows = 0

    # --- after a crash ------------------------------------------------------------------------

    def replay(self) -> int:
        """Write a committed log's rows to the volume, flush it and empty the log (committed);
        returns how many rows there were."""
        if not self._rows:
            return 0
        n = 0
        for offset, data in self.db.rows(_ROWS):
            self.volume.write(offset, data)
            n += 1
        self.volume.flush()
        self.db.change("DELETE FROM intent_log")
        self.db.commit()
        self._rows = 0
        log.info("intent log: wrote %d logged writes to the volume again (an fsync'd commit "
                 "the volume had not flushed when the filesystem stopped)", n)
        return n

    def read_through(self) -> int:
        """For a read-only open: serve reads through the committed log's rows; returns how
        many there are."""
        if self._rows:
            self._overlay = list(self.db.rows(_ROWS))
            log.info("intent log: %d logged writes not yet on the volume; reading through "
                     "them (a read-write open writes them)", len(self._overlay))
        return len(self._overlay)


def _patched(out: Any, offset: int, rows: list[tuple[int, bytes]]) -> Any:
    """`out` (the volume's bytes at `offset`) with the logged writes that overlap it, later
    ones over earlier ones."""
    end = offset + len(out)
    patched = None
    for o, data in rows:
        lo, hi = max(offset, o), min(end, o + len(data))
        if lo >= hi:
            continue
        if patched is None:
            patched = bytearray(out)
        patched[lo - offset : hi - offset] = data[lo - o : hi - o]
    return out if patched is None else patched
