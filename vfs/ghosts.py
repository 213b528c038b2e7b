"""Ghost files: placeholders whose content lives in a source file until it is first read.

A ghost has its source's name, size, mode and times; its row in `ghosts` records the source
path, the source's size and mtime at import and, once taken, a content hash (xxh3-64 of every
1 MiB piece). States:

- `ghost`: nothing stored. The first read starts one fetch (shared by concurrent readers); a
  reader waits only until the range it asks for has arrived. Every piece is checked against
  the source's size and mtime and, when known, its hash before it is stored or served; if the
  source is gone or changed the fetch fails, what was stored is dropped, the file stays a
  ghost and readers get EIO. When storing falls behind (the volume writes slower than the
  source reads), a reader beyond the fetch reads and checks its pieces from the source itself,
  so a first read runs at the source's speed rather than the volume's. A fetch keeps no more
  than a few pieces ahead of a reader that follows it closely, so that reader is served from
  memory to the end instead of reading back what was just queued for the volume. A ghost
  larger than the volume's free space is not fetched: its reads are served from its source,
  checked piece by piece, and it stays a ghost (hydrating it, or writing to it, is ENOSPC).
- `hydrated`: the content is stored like any file's; it may be dropped again (dehydrated) when
  the source still holds identical content, by request or by the cache limit (least recently
  used first, never an open file).
- `pinned`: hydrated and never dehydrated.

Writing to a ghost (or truncating it) fetches it first, then it becomes an ordinary file.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
import time
from collections.abc import Callable

from vfs.alloc import SECTOR
from vfs.errors import FSError
from vfs.fs import Filesystem
from vfs.ghostsource import (
    FOLLOW_RATE,
    FOLLOW_SECONDS,
    Fetch,
    Record,
    SourceChanged,
    keep_last,
    pack_hashes,
    read_pieces,
    read_range,
    source_hashes,
    unpack_hashes,
)

log = logging.getLogger(__name__)

BUFFER_BYTES = 128 << 20  # checked pieces of all fetches waiting to be stored, at most
STREAMED_PIECES = 8  # pieces of ghosts too big to store, kept for the reads that follow
GHOST, HYDRATED, PINNED = "ghost", "hydrated", "pinned"
STATES = (GHOST, HYDRATED, PINNED)
USED_REFRESH_NS = 60 * 10**9


def _unexpected(exc: Exception, doing: str) -> FSError:
    """An error other than FSError met while `doing` something for a fetch: logged with its
    traceback and turned into the FSError (its errno, else EIO) the fetch's readers get."""
    log.exception("%s failed unexpectedly", doing)
    return FSError(getattr(exc, "errno", None) or errno.EIO, f"{doing} failed: {exc}")


class Ghosts:
    """The ghost files of one filesystem: their states, fetches and cache limit."""

    def __init__(self, fs: Filesystem, cache_limit: int | None = None) -> None:
        self.fs = fs
        self.db = fs.db
        self.cache_limit = cache_limit
        self.fetch_rate: int | None = None  # bytes per second a fetch may read; None: no limit
        self.buffer_bytes = BUFFER_BYTES  # checked pieces that may wait to be stored
        self.follow_seconds = FOLLOW_SECONDS  # see Fetch.keep_pace
        self.follow_rate = FOLLOW_RATE
        self.fetches: dict[int, Fetch] = {}
        self.stop = threading.Event()
        self._used: dict[int, int] = {}
        self._threads: set[threading.Thread] = set()
        # told of every ghost whose stored content was dropped (caches of it must go)
        self.dropped_hooks: list[Callable[[int], None]] = []
        self._sealed_up_to = 0
        self._buffered = 0
        self.imports = 0  # imports running (one at a time: the control channel takes turns);
        # hashing waits for them: they would share one interpreter
        self._buffer_cond = threading.Condition()
        self._unsealable: dict[int, tuple[int, int]] = {}  # sources that failed, as recorded
        self._no_room: set[int] = set()  # ghosts too big for the free space (warned of once)
        self._streamed: dict[tuple[int, int, int, int], bytes] = {}  # see _from_source
        self._streamed_lock = threading.Lock()
        with fs.lock:
            self.states: dict[int, str] = dict(self.db.rows("SELECT inode, state FROM ghosts"))
            partial = [r[0] for r in self.db.rows(
                "SELECT g.inode FROM ghosts g JOIN inodes i ON i.id = g.inode "
                "WHERE g.state = ? AND i.sectors > 0", (GHOST,))]
            for ino in partial:
                log.info("ghost inode %d: dropping a fetch interrupted by a crash", ino)
                fs.drop_content(ino)

    # --- records ------------------------------------------------------------------------------

    def state(self, ino: int) -> str | None:
        """`ghost`, `hydrated`, `pinned`, or None for an ordinary file."""
        return self.states.get(ino)

    def record(self, ino: int) -> Record:
        """The ghost row of inode `ino`."""
        r = self.db.row("SELECT inode, source, size, mtime_ns, hashes, state FROM ghosts "
                        "WHERE inode=?", (ino,))
        if r is None:
            raise FSError(errno.EINVAL, f"inode {ino} is not a ghost")
        return Record(r[0], bytes(r[1]).decode(errors="surrogateescape"), r[2], r[3],
                      unpack_hashes(r[4]), r[5])

    def _set_state(self, ino: int, state: str) -> None:
        self.db.change("UPDATE ghosts SET state=?, used_ns=? WHERE inode=?",
                       (state, time.time_ns(), ino))
        self.states[ino] = state

    def forget(self, ino: int) -> None:
        """Inode `ino` is no longer a ghost (it was removed, or became an ordinary file)."""
        self.states.pop(ino, None)
        self._used.pop(ino, None)
        self._no_room.discard(ino)

    def added(self, ino: int, state: str = GHOST) -> None:
        """Inode `ino` was made a ghost (by an import)."""
        self.states[ino] = state

    # --- reading ------------------------------------------------------------------------------

    def needs_fetch(self, ino: int) -> bool:
        """True if reading inode `ino` may have to wait for its source."""
        return self.states.get(ino) == GHOST

    def read_held(self, ino: int, offset: int, length: int) -> bytes | None:
        """The range from a fetch in progress if it has arrived and is still in memory, at
        once and without any lock; None otherwise (then `read`)."""
        fetch = self.fetches.get(ino)
        if fetch is None or not fetch.covers(offset, length):
            return None
        return fetch.from_memory(offset, length)

    def read(self, ino: int, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Read a file, fetching a ghost's content first as far as the range needs."""
        while True:
            # A fetch in progress serves and is waited for without the filesystem's lock,
            # which a store or a commit may hold while the volume is busy.
            fetch = self.fetches.get(ino)
            if fetch is not None and fetch.covers(offset, length):
                held = fetch.from_memory(offset, length)
                if held is not None:
                    return held
                if not fetch.done and fetch.error is None:
                    # stored and no longer held: the source is at hand while the volume
                    # is busy storing the rest
                    return self._read_ahead(fetch, offset, length)
            elif fetch is not None and not fetch.done and fetch.error is None:
                if fetch.held_back:
                    return self._read_ahead(fetch, offset, length)
                fetch.wait(offset, length)
                if fetch.error is not None:
                    raise FSError(fetch.error.errno, str(fetch.error))
                continue
            with self.fs.lock:
                state = self.states.get(ino)
                if state is None:
                    return self.fs.read(ino, offset, length)
                if state != GHOST:
                    self._touch(ino)
                    return self.fs.read(ino, offset, length)
                if self.db.read_only:
                    log.warning("inode %d is a ghost: fetching it would store it, and the "
                                "filesystem is read-only", ino)
                    raise FSError(errno.EROFS, f"inode {ino} is a ghost; the filesystem is "
                                  "read-only, so its content cannot be fetched and stored")
                got = self._fetch_for(ino, reader=True)
                if isinstance(got, Fetch):
                    if got.covers(offset, length):
                        continue  # served above, without the lock
                    if got.error is not None:
                        raise got.error
            if isinstance(got, Record):  # no room to store it: read from its source
                return self._from_source(got, offset, length)
            got.wait(offset, length)
            if got.error is not None:
                raise FSError(got.error.errno, str(got.error))

    def _read_ahead(self, fetch: Fetch, offset: int, length: int) -> bytes:
        """A range beyond a held-back fetch, read from its source (see Fetch.read_ahead)."""
        try:
            return fetch.read_ahead(offset, length)
        except FSError as exc:
            log.error("ghost inode %d: reading %d bytes at %d from %s ahead of its fetch: %s",
                      fetch.rec.ino, length, offset, fetch.rec.source, exc)
            raise

    def _touch(self, ino: int) -> None:
        if self.db.read_only:
            return
        now = time.time_ns()
        if now - self._used.get(ino, 0) > USED_REFRESH_NS:
            self._used[ino] = now
            self.db.change("UPDATE ghosts SET used_ns=? WHERE inode=?", (now, ino))

    def _fetch_for(self, ino: int, reader: bool = False) -> Fetch | Record:
        """Ghost `ino`'s fetch, started if need be (for a `reader`, who then follows it); its
        record instead when the volume has no room to store it (under the lock)."""
        fetch = self.fetches.get(ino)
        if fetch is not None:
            return fetch
        rec = self.record(ino)
        return self._start(rec, reader) if self._has_room(rec) else rec

    def _has_room(self, rec: Record) -> bool:
        """True if the volume has room to store a ghost's content (under the lock)."""
        free = self.fs.free_sectors() * SECTOR
        if rec.size <= free:
            self._no_room.discard(rec.ino)
            return True
        if rec.ino not in self._no_room:
            self._no_room.add(rec.ino)
            log.warning("ghost inode %d: its %d bytes do not fit in the %d bytes free; it is "
                        "read from %s and stays a ghost", rec.ino, rec.size, free, rec.source)
        return False

    def _from_source(self, rec: Record, offset: int, length: int) -> bytes:
        """A range of a ghost there is no room to store, read from its source in checked
        pieces; the last few pieces read are kept for the reads that follow."""
        version = (rec.ino, rec.size, rec.mtime_ns)  # a refreshed ghost: new keys

        def held(start: int) -> bytes | None:
            with self._streamed_lock:
                return self._streamed.get((*version, start))

        def keep(start: int, piece: bytes) -> None:
            with self._streamed_lock:
                keep_last(self._streamed, (*version, start), piece, STREAMED_PIECES)

        try:
            return read_range(rec, offset, length, held, keep)
        except FSError as exc:
            log.error("ghost inode %d: reading %d bytes at %d from %s: %s", rec.ino, length,
                      offset, rec.source, exc)
            raise

    def _start(self, rec: Record, reader: bool = False) -> Fetch:
        """Begin fetching a ghost's content (under the lock), for a `reader` or without one."""
        ino = rec.ino
        fetch = Fetch(rec, follow_seconds=self.follow_seconds, follow_rate=self.follow_rate,
                      read_at=time.monotonic() if reader else 0.0)
        self.fetches[ino] = fetch
        t = threading.Thread(target=self._fetch, args=(fetch,), name=f"ghost-fetch-{ino}",
                             daemon=True)
        self._threads.add(t)
        t.start()
        return fetch

    def _fetch(self, fetch: Fetch) -> None:
        """Read, check and hand out a ghost's pieces; a second thread stores them.

        A checked piece is served to readers at once: the content is already safe in its
        source, so readers need not wait for the volume, and while a fast reader follows the
        fetch, the store waits (`Fetch.defer_store`). At most `buffer_bytes` of pieces (of
        all fetches) wait to be stored; while a fetch waits for room, readers beyond it read
        their pieces from the source themselves. The file becomes `hydrated` once every piece
        is stored.
        """
        rec = fetch.rec
        t0 = time.monotonic()
        hashes: list[int] = []
        to_store: queue.Queue[tuple[int, bytes] | None] = queue.Queue()
        storer = threading.Thread(target=self._store, args=(fetch, to_store),
                                  name=f"ghost-store-{rec.ino}", daemon=True)
        storer.start()
        try:
            try:
                for offset, piece, h in read_pieces(rec, self.stop):
                    if self.fetch_rate:  # pace the fetch (a slow or shared source)
                        ahead = offset / self.fetch_rate - (time.monotonic() - t0)
                        if ahead > 0:
                            self.stop.wait(ahead)
                    self._take_buffer(len(piece), fetch)
                    hashes.append(h)
                    fetch.arrive(offset, piece)
                    to_store.put((offset, piece))
                    fetch.keep_pace(offset + len(piece))  # (before the next piece is read)
            finally:
                to_store.put(None)
                storer.join()
            if fetch.store_error is not None:
                raise fetch.store_error
            fetch.keep_pace(rec.size, 1)  # a reader close behind gets the last pieces from memory
            with self.fs.lock:
                if self.states.get(rec.ino) == GHOST:
                    if rec.hashes is None:
                        self.db.change("UPDATE ghosts SET hashes=? WHERE inode=?",
                                       (pack_hashes(hashes), rec.ino))
                    self._set_state(rec.ino, HYDRATED)
                self.fetches.pop(rec.ino, None)
            log.info("ghost inode %d: fetched %d bytes from %s in %.2f s", rec.ino, rec.size,
                     rec.source, time.monotonic() - t0)
        except Exception as exc:  # noqa: BLE001 - any failure must end the fetch for its readers
            if not isinstance(exc, FSError):
                exc = _unexpected(exc, f"ghost inode {rec.ino}: fetching {rec.source}")
            elif self.stop.is_set():
                log.info("ghost inode %d: fetch of %s stopped by the unmount; it stays a ghost",
                         rec.ino, rec.source)
            elif not self.fs.exists(rec.ino):
                log.info("ghost inode %d: removed while %s was being fetched; fetch dropped",
                         rec.ino, rec.source)
            else:
                log.error("ghost inode %d: fetching %s failed: %s", rec.ino, rec.source, exc)
            with self.fs.lock:
                self.fetches.pop(rec.ino, None)
                try:
                    if self.fs.exists(rec.ino):
                        self.fs.drop_content(rec.ino)
                except FSError as drop_exc:
                    log.error("ghost inode %d: dropping the partial fetch: %s", rec.ino, drop_exc)
            fetch.error = exc
        finally:
            with fetch.cond:
                fetch.done = True
                fetch.recent.clear()
                fetch.ahead.clear()
                fetch.cond.notify_all()
            self._threads.discard(threading.current_thread())
        if fetch.error is None:
            self.enforce_limit()

    def _store(self, fetch: Fetch, to_store: queue.Queue) -> None:
        """Store a fetch's checked pieces through the volume, in order (its second thread)."""
        while (item := to_store.get()) is not None:
            offset, piece = item
            try:
                if fetch.store_error is None and fetch.error is None:
                    fetch.defer_store()
                    self.fs.write(fetch.rec.ino, offset, piece, keep_times=True)
                    fetch.stored(offset)
            except Exception as exc:  # noqa: BLE001 - the fetch reports it; storing stops
                if not isinstance(exc, FSError):
                    exc = _unexpected(exc, f"ghost inode {fetch.rec.ino}: storing "
                                           f"{len(piece)} bytes at {offset}")
                fetch.store_error = exc
            finally:
                self._give_buffer(len(piece))

    def _take_buffer(self, n: int, fetch: Fetch) -> None:
        """Wait until `n` more bytes may wait to be stored."""
        with self._buffer_cond:
            while self._buffered + n > self.buffer_bytes and self._buffered:
                if fetch.store_error is not None or self.stop.is_set():
                    break
                if not fetch.held_back:
                    fetch.hold_back(True)
                self._buffer_cond.wait(0.5)
            self._buffered += n
        if fetch.held_back:
            fetch.hold_back(False)

    def _give_buffer(self, n: int) -> None:
        with self._buffer_cond:
            self._buffered -= n
            self._buffer_cond.notify_all()

    def hydrate(self, ino: int) -> None:
        """Fetch a ghost's whole content and wait for it (nothing to do for other files)."""
        with self.fs.lock:
            if self.states.get(ino) != GHOST:
                return
            fetch = self._fetch_for(ino)
        if isinstance(fetch, Record):
            raise FSError(errno.ENOSPC, f"ghost inode {ino}: no room on the volume for its "
                          f"{fetch.size} bytes")
        fetch.wait_done()
        if fetch.error is not None:
            raise FSError(fetch.error.errno, str(fetch.error))

    # --- changing state -----------------------------------------------------------------------

    def make_ordinary(self, ino: int, keep_content: bool = True) -> None:
        """Turn a ghost into an ordinary file before it is written to or truncated; its
        content is fetched first unless `keep_content` is False (truncation to zero)."""
        if ino not in self.states:
            return
        if keep_content:
            self.hydrate(ino)
        with self.fs.lock:
            if ino in self.states and ino not in self.fetches:
                self.db.change("DELETE FROM ghosts WHERE inode=?", (ino,))
                self.forget(ino)
                log.info("ghost inode %d is an ordinary file now", ino)
            elif ino in self.fetches:
                raise FSError(errno.EBUSY, f"ghost inode {ino} is being fetched")

    def set_state(self, ino: int, value: bytes) -> None:
        """Ask for a state through the `user.dwfs.state` attribute."""
        want = value.decode(errors="replace").strip()
        if want not in STATES:
            raise FSError(errno.EINVAL, f"unknown ghost state {want!r} (ghost, hydrated, pinned)")
        state = self.states.get(ino)
        if state is None:  # EOPNOTSUPP: `cp -a` of a ghost's copy passes over it quietly
            raise FSError(errno.EOPNOTSUPP, f"inode {ino} is not a ghost: it has no state")
        if want == GHOST:
            self.dehydrate(ino)
            return
        self.hydrate(ino)
        with self.fs.lock:
            if self.states.get(ino) in (HYDRATED, PINNED):
                self._set_state(ino, want)
                log.info("ghost inode %d is %s", ino, want)

    def dehydrate(self, ino: int, skip_open: bool = False) -> bool:
        """Drop a hydrated ghost's stored content if the source still holds it.

        Pinned files are refused (EPERM); a source that changed keeps the local copy (EIO).
        Returns False if the file was skipped because it is open (`skip_open`)."""
        with self.fs.lock:
            state = self.states.get(ino)
            if state is None:
                raise FSError(errno.EINVAL, f"inode {ino} is not a ghost")
            if state == PINNED:
                raise FSError(errno.EPERM, f"ghost inode {ino} is pinned; unpin it first")
            if state == GHOST:
                return True
            if skip_open and self.fs.opens.get(ino):
                return False
            rec = self.record(ino)
        if rec.hashes is None:
            raise SourceChanged(rec, "has no content hash to compare with")
        hashes = source_hashes(rec, self.stop)  # raises SourceChanged if it differs
        if hashes != rec.hashes:
            raise SourceChanged(rec, "has different content now")
        with self.fs.lock:
            if self.states.get(ino) != HYDRATED or (skip_open and self.fs.opens.get(ino)):
                return False
            self.fs.drop_content(ino)
            self._set_state(ino, GHOST)
        log.info("ghost inode %d: dehydrated (source %s unchanged)", ino, rec.source)
        for hook in self.dropped_hooks:
            hook(ino)
        return True

    def enforce_limit(self) -> None:
        """Dehydrate least recently used, unpinned, closed ghosts while the stored content of
        ghosts exceeds the cache limit."""
        if self.cache_limit is None:
            return
        with self.fs.lock:
            total = self.stored_bytes()
            if total <= self.cache_limit:
                return
            order = [(r[0], r[1]) for r in self.db.rows(
                "SELECT g.inode, i.sectors FROM ghosts g JOIN inodes i ON i.id = g.inode "
                "WHERE g.state = ? AND i.sectors > 0 ORDER BY g.used_ns", (HYDRATED,))]
        for ino, sectors in order:
            if total <= self.cache_limit:
                break
            try:
                if self.dehydrate(ino, skip_open=True):
                    total -= sectors * 4096
            except FSError as exc:
                log.warning("cache limit: cannot dehydrate ghost inode %d: %s", ino, exc)
        if total > self.cache_limit:
            log.warning("ghost content takes %d bytes, over the cache limit of %d (the rest "
                        "is pinned, open, or its source changed)", total, self.cache_limit)

    def seal_some(self, limit: int = 200) -> int:
        """Take the content hash of up to `limit` ghosts imported without one; returns how
        many were looked at. A source that changed since its import is left unhashed (its
        reads fail until it is imported again or a watcher refreshes it)."""
        if self.imports:
            return 0
        with self.fs.lock:
            # In inode order from where the last call stopped (`+state`: not by the state
            # index, which would visit every ghost and sort them on every call).
            todo = [r[0] for r in self.db.rows(
                "SELECT inode FROM ghosts WHERE hashes IS NULL AND +state = ? AND inode > ? "
                "ORDER BY inode LIMIT ?", (GHOST, self._sealed_up_to, limit))]
            recs = [self.record(ino) for ino in todo]
        if not todo:
            self._sealed_up_to = 0
            return 0
        for rec in recs:
            if self.stop.is_set() or self.imports:
                break
            self._sealed_up_to = rec.ino
            if (self._unsealable.get(rec.ino) == (rec.size, rec.mtime_ns)
                    or rec.ino in self.fetches):  # a fetch takes the hashes itself
                continue
            try:
                hashes = source_hashes(rec, self.stop)
            except FSError as exc:
                log.warning("ghost inode %d: no content hash taken: %s", rec.ino, exc)
                self._unsealable[rec.ino] = (rec.size, rec.mtime_ns)
                continue
            with self.fs.lock:
                self.db.change("UPDATE ghosts SET hashes=? WHERE inode=? AND hashes IS NULL "
                               "AND size=? AND mtime_ns=?",
                               (pack_hashes(hashes), rec.ino, rec.size, rec.mtime_ns))
        return len(todo)

    def unsealed(self) -> int:
        """How many ghosts have no content hash yet."""
        with self.fs.lock:
            return self.db.value("SELECT count(*) FROM ghosts WHERE hashes IS NULL", (), 0)

    def stored_bytes(self) -> int:
        """Bytes of stored content of hydrated and pinned ghosts."""
        return 4096 * self.db.value(
            "SELECT coalesce(sum(i.sectors), 0) FROM ghosts g JOIN inodes i ON i.id = g.inode "
            "WHERE g.state != ?", (GHOST,), 0)

    def close(self) -> None:
        """Stop fetches in progress (their ghosts stay ghosts) and wait for them."""
        self.stop.set()
        for t in list(self._threads):
            t.join(timeout=30)
