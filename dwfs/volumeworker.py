"""A dedicated thread that runs blocking calls for the trio event loop, in arrival order."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import trio

log = logging.getLogger(__name__)


class VolumeWorker:
    """One thread that runs volume calls for the event loop, one at a time, in arrival order.

    Unlike trio.to_thread with a CapacityLimiter(1), the thread starts the next queued call as
    soon as one returns, without waiting for the event loop to take the result and hand the
    next call over: sequential reads keep the volume busy while the loop replies to FUSE.
    """

    def __init__(self, name: str = "volume-worker") -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the worker thread: its result, or its exception raised here."""
        job = _Job(fn, args, trio.lowlevel.current_trio_token())
        self._jobs.put(job)
        # The volume call cannot be abandoned half way: a cancelled caller waits for it too.
        with trio.CancelScope(shield=True):
            await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        """Stop the thread once the calls queued so far are done."""
        self._jobs.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job.result = job.fn(*job.args)
            except Exception as exc:  # noqa: BLE001 - handed to the caller, who raises it
                job.error = exc
            try:
                job.token.run_sync_soon(job.done.set)
            except trio.RunFinishedError:
                log.warning("%s finished after the event loop stopped; its result is dropped",
                            getattr(job.fn, "__name__", job.fn))


class _Job:
    """A call queued for the VolumeWorker and, once done, its outcome."""

    __slots__ = ("fn", "args", "token", "done", "result", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple, token: trio.lowlevel.TrioToken) -> None:
        self.fn = fn
        self.args = args
        self.token = token
        self.done = trio.Event()
        self.result: Any = None
        self.error: Exception | None = None
