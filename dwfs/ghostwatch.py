"""`dwfs ghost import --watch`: follow a ghost source's changes with watchdog and send them to
the mount's daemon in batches."""

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


class _Changes(FileSystemEventHandler):
    """Collects the source's changes as paths relative to its root."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.queue: queue.Queue[list[str]] = queue.Queue()

    def _rel(self, path: str | bytes) -> str:
        return os.path.relpath(os.fsdecode(path), self.root)

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write", "closed"):
            return
        if event.is_directory and event.event_type == "modified":
            return  # a directory's own times: its entries bring their own events
        if event.event_type == "moved":
            self.queue.put(["moved", self._rel(event.src_path), self._rel(event.dest_path)])
        else:
            self.queue.put(["changed", self._rel(event.src_path)])


def watch(source: str, sock: str, dest: str) -> None:
    """Keep the ghosts under `dest` in step with `source` until interrupted."""
    handler = _Changes(source)
    observer = Observer()
    observer.schedule(handler, source, recursive=True)
    observer.start()
    out.print(f"watching {source} (Ctrl-C stops)")
    try:
        while True:
            batch = [handler.queue.get()]
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
            op = {"op": "ghost-sync", "source": source, "dest": dest, "changes": changes,
                  "uid": os.getuid(), "gid": os.getgid()}
            try:
                r = control.request(sock, op)
            except control.ControlError as exc:
                err.print(f"dwfs: applying {len(changes)} source changes failed: {exc}")
                if exc.errno == errno.ECONNREFUSED:
                    raise CommandError("the mount's daemon is gone; stopped watching") from exc
                continue
            out.print(f"synced {len(changes)} changes: {r['ghosts']} new ghosts, "
                      f"{r['refreshed']} refreshed, {r['removed']} removed")
    finally:
        observer.stop()
        observer.join(timeout=10)
