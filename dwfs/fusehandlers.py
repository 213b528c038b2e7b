"""The base of dwfs's FUSE handlers: where a request is answered, and the one place that turns
errors into errnos.

A request is answered on one of three lanes. Metadata runs inline on the session's reading
thread when the filesystem's lock is free (SQLite answers in microseconds, a thread hop costs
more). Requests that move file data, and any request that would wait for the lock, run on one
worker thread in arrival order, so the reading thread never waits for the volume. Requests that
may wait for a ghost's source get threads of their own.
"""

from __future__ import annotations

import errno
import logging
import queue
import reprlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dwfs.fusesession import Request

log = logging.getLogger(__name__)

SLOW_THREADS = 16  # requests waiting for ghosts' sources at once
QUIET_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENODATA, errno.ENOTDIR,
                errno.EISDIR, errno.EINVAL, errno.ENAMETOOLONG, errno.EPERM, errno.EXDEV,
                errno.EOPNOTSUPP, errno.ERANGE, errno.ENOSPC, errno.EFBIG, errno.E2BIG,
                errno.EMLINK, errno.ELOOP, errno.ENXIO}

Pack = Callable[[Any], Any] | None  # turns a call's result into the reply's payload


def answer(r: Request, pack: Pack, fn: Callable[..., Any], args: tuple) -> None:
    """Run `fn(*args)` and reply with `pack(result)` (without `pack`: the result itself, None
    being an empty reply), or with the errno it raised. An OSError from a lower layer carries
    its errno; any other exception is a bug: logged with its traceback and answered with EIO."""
    try:
        payload = fn(*args) if pack is None else pack(fn(*args))
    except OSError as exc:
        code = exc.errno or errno.EIO
        if code in QUIET_ERRNOS:
            log.debug("%s%s: %s", getattr(fn, "__name__", fn), reprlib.repr(args), exc)
        else:
            log.error("%s%s failed: %s", getattr(fn, "__name__", fn), reprlib.repr(args), exc)
        r.fail(code)
        return
    except Exception:  # noqa: BLE001 - a bug in one request must not end the mount
        log.exception("%s%s: unexpected error; answering EIO", getattr(fn, "__name__", fn),
                      reprlib.repr(args))
        r.fail(errno.EIO)
        return
    r.reply(b"" if payload is None else payload)


class Worker:
    """One thread that runs calls one at a time, in arrival order."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue `fn(*args)`; it must handle its own errors (as `answer` does)."""
        self._jobs.put((fn, args))

    def close(self) -> None:
        """Stop the thread once the calls queued so far are done."""
        self._jobs.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args = job
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - the thread must outlive one bad call
                log.exception("%s: queued call %s failed", self._thread.name, fn)


class Handlers:
    """Answers to every FUSE request: ENOSYS unless a subclass says otherwise."""

    init_flags = 0  # FUSE INIT flags these handlers ask for beyond the session's own

    def __init__(self, lock: threading.RLock | threading.Lock, worker_name: str) -> None:
        self.lock = lock
        self.worker = Worker(worker_name)
        self._behind = 0  # requests without a reply queued on the worker and not yet run
        self._behind_lock = threading.Lock()
        self._slow_pool = ThreadPoolExecutor(SLOW_THREADS, thread_name_prefix="fs-slow")

    # --- lanes --------------------------------------------------------------------------------

    def meta(self, r: Request, pack: Pack, fn: Callable[..., Any], *args: Any) -> None:
        """Answer inline if the lock is free (and no request without a reply waits on the
        worker), else on the worker."""
        if not self._behind and self.lock.acquire(blocking=False):
            try:
                answer(r, pack, fn, args)
            finally:
                self.lock.release()
        else:
            self.worker.submit(answer, r, pack, fn, args)

    def unanswered(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a request that has no reply (FORGET) inline if the lock is free, else on the
        worker; until it has run there, metadata requests queue behind it: the kernel does not
        wait for it before sending the next request (a statfs right after an unlink must find
        the forgotten file's space free)."""
        if self.lock.acquire(blocking=False):
            try:
                fn(*args)
            finally:
                self.lock.release()
            return
        with self._behind_lock:
            self._behind += 1
        self.worker.submit(self._run_behind, fn, args)

    def _run_behind(self, fn: Callable[..., None], args: tuple) -> None:
        try:
            fn(*args)
        finally:
            with self._behind_lock:
                self._behind -= 1

    def data(self, r: Request, pack: Pack, fn: Callable[..., Any], *args: Any) -> None:
        """Answer on the worker thread (calls that may touch the volume)."""
        self.worker.submit(answer, r, pack, fn, args)

    def slow(self, r: Request, pack: Pack, fn: Callable[..., Any], *args: Any) -> None:
        """Answer on a thread of its own (calls that may wait for a ghost's source)."""
        self._slow_pool.submit(answer, r, pack, fn, args)

    def close(self) -> None:
        """Finish what is queued and stop the threads."""
        self.worker.close()
        self._slow_pool.shutdown(wait=True, cancel_futures=False)

    def sync(self) -> None:
        """Make everything durable (control socket `flush`, SIGHUP)."""

    # --- requests (node is the inode the request is about) ------------------------------------

    def _nosys(self, r: Request, *args: Any) -> None:
        r.fail(errno.ENOSYS)

    lookup = getattr = setattr = readlink = symlink = mknod = mkdir = _nosys
    unlink = rmdir = rename = link = open = read = write = statfs = _nosys
    release = fsync = setxattr = getxattr = listxattr = removexattr = flush = _nosys
    opendir = readdir = releasedir = fsyncdir = create = fallocate = lseek = _nosys
    tmpfile = copy_file_range = ioctl = statx = _nosys

    def forget(self, items: list[tuple[int, int]]) -> None:
        """The kernel dropped `n` references to each (inode, n); there is no reply."""
