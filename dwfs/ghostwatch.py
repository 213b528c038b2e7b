"""`dwfs ghost import --watch`: follow a ghost source's changes with watchdog and send them to
the mount's daemon in batches.

Events are hints, not the whole truth: inotify says nothing of a write through a shared
mapping, and a burst of changes can outrun it. So once the changes have settled (but not
sooner than WHOLE_GAP_SECONDS after the last time), and every `rescan` seconds in any case,
the whole source is brought in step (the daemon compares it with the ghosts: new, changed and
gone files, links and directories)."""

from __future__ import annotations

import errno
import os
import queue
import time

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from dwfs import control
from dwfs.cliutil import CommandError, err, out

WATCH_BATCH_SECONDS = 0.3
SETTLE_SECONDS = 2.0  # quiet after changes before the whole source is compared
RESCAN_SECONDS = 600.0  # the whole source is compared at least this often
# After changes, the whole source is compared again only this long after the last comparison
# began, and at least COMPARE_SHARE times as long as that one took: a source of 100,000 files
# with one file appended to every few seconds is not compared over and over.
WHOLE_GAP_SECONDS = 30.0
COMPARE_SHARE = 20
WHOLE = [["changed", "."]]  # the change that compares the whole source


class _Changes(FileSystemEventHandler):
    """Collects the source's changes as paths relative to its root."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.queue: queue.Queue[list[str]] = queue.Queue()

    def _rel(self, path: str | bytes) -> str:
        return os.path.relpath(os.fsdecode(path), self.root)

    def on_any_event(self, event: FileSystemEvent) -> None:
        # "closed" (a close after writing) counts: it is all a write through a mapping says.
        if event.event_type in ("opened", "closed_no_write"):
            return
        if event.is_directory and event.event_type == "modified":
            return  # a directory's own times: its entries bring their own events
        if event.event_type == "moved":
            self.queue.put(["moved", self._rel(event.src_path), self._rel(event.dest_path)])
        else:
            self.queue.put(["changed", self._rel(event.src_path)])


def watch(source: str, sock: str, dest: str, rescan: float = RESCAN_SECONDS) -> None:
    """Keep the ghosts under `dest` in step with `source` until interrupted; the whole source
    is compared once changes settle and every `rescan` seconds (0: never periodically)."""
    handler = _Changes(source)
    observer = Observer()
    observer.schedule(handler, source, recursive=True)
    observer.start()
    out.print(f"watching {source} (Ctrl-C stops)")
    # Changes came since the whole source was last compared: at the start, those made while
    # nothing watched (the import before only adds and refreshes; the comparison also removes).
    unsettled = True
    last_whole, gap = time.monotonic() - WHOLE_GAP_SECONDS, WHOLE_GAP_SECONDS
    try:
        while True:
            now = time.monotonic()
            wait = max(SETTLE_SECONDS, last_whole + gap - now) if unsettled else None
            if rescan > 0:
                due = max(0.0, last_whole + rescan - now)
                wait = due if wait is None else min(wait, due)
            try:
                batch = [handler.queue.get(timeout=wait)]
            except queue.Empty:
                last_whole = time.monotonic()
                _send(sock, source, dest, WHOLE, "compared the whole source")
                took = time.monotonic() - last_whole
                unsettled, gap = False, max(WHOLE_GAP_SECONDS, COMPARE_SHARE * took)
                continue
            deadline = time.monotonic() + WATCH_BATCH_SECONDS
            while time.monotonic() < deadline:
                try:
                    batch.append(handler.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            changes: list[list[str]] = []
            for c in batch:
                if not changes or changes[-1] != c:
                    changes.append(c)
            _send(sock, source, dest, changes, f"synced {len(changes)} changes")
            unsettled = True
    finally:
        observer.stop()
        observer.join(timeout=10)


def _send(sock: str, source: str, dest: str, changes: list[list[str]], what: str) -> None:
    """Have the daemon apply `changes` and say what it did."""
    op = {"op": "ghost-sync", "source": source, "dest": dest, "changes": changes,
          "uid": os.getuid(), "gid": os.getgid()}
    try:
        r = control.request(sock, op)
    except control.ControlError as exc:
        err.print(f"dwfs: applying {len(changes)} source changes failed: {exc}")
        if exc.errno == errno.ECONNREFUSED:
            raise CommandError("the mount's daemon is gone; stopped watching") from exc
        return
    out.print(f"{what}: {r['ghosts']} new ghosts, {r['refreshed']} refreshed, "
              f"{r['removed']} removed")
