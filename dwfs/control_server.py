"""The daemon's side of the control channel: serves JSON-line requests over a Unix socket."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import trio

log = logging.getLogger(__name__)

Handler = Callable[[dict, Callable[[int, int], None]], Any]
LimiterFor = Callable[[dict], trio.CapacityLimiter]  # the threads a request may wait for


async def serve(sock_path: str, handler: Handler, limiter_for: LimiterFor,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve requests on a Unix socket until cancelled; each runs in a worker thread, within
    the limiter `limiter_for` gives it."""
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(sock_path)
    os.chmod(sock_path, 0o600)
    ours = _identity(sock_path)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(
            lambda stream: _connection(stream, handler, limiter_for), [listener]
        )
    finally:
        _remove_if_ours(sock_path, ours)


def _identity(path: str) -> tuple[int, int]:
    """What tells one socket file from a later one at the same path (inodes are reused)."""
    st = os.stat(path)
    return st.st_ino, st.st_ctime_ns


def _remove_if_ours(sock_path: str, ours: tuple[int, int]) -> None:
    """Remove the socket unless it is gone or another daemon of the same warehouse, started
    while this one was still closing, has put its own in its place."""
    try:
        if _identity(sock_path) != ours:
            log.info("control socket %s belongs to a newer daemon: left in place", sock_path)
            return
        os.unlink(sock_path)
    except FileNotFoundError:
        log.debug("control socket %s already gone", sock_path)


async def _connection(stream: trio.SocketStream, handler: Handler,
                      limiter_for: LimiterFor) -> None:
    async with stream:
        buf = b""
        while b"\n" not in buf:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buf += chunk
        try:
            op = json.loads(buf.split(b"\n", 1)[0])
        except ValueError as exc:
            await _send(stream, {"ok": False, "error": f"malformed request: {exc}",
                                 "errno": errno.EINVAL})
            return
        send_channel, receive_channel = trio.open_memory_channel(64)
        token = trio.lowlevel.current_trio_token()

        def offer(msg: dict) -> None:
            try:
                send_channel.send_nowait(msg)
            except trio.WouldBlock:
                log.debug("control client is behind; progress %s not sent", msg["progress"])
            except trio.ClosedResourceError:
                log.debug("progress %s after the request ended", msg["progress"])

        def progress(done: int, total: int) -> None:
            # Handed over without waiting for the event loop: a worker waiting on every
            # update measured up to 5 ms each (the loop waits its turn for the interpreter).
            # The loop runs these in order, and before it sees the request's end.
            try:
                token.run_sync_soon(offer, {"progress": [done, total]})
            except trio.RunFinishedError:
                log.debug("progress after the daemon stopped: %d/%d", done, total)

        async def work() -> None:
            async with send_channel:
                try:
                    result = await trio.to_thread.run_sync(handler, op, progress,
                                                           limiter=limiter_for(op))
                    await send_channel.send({"ok": True, "result": result})
                except OSError as exc:
                    log.error("control request %s failed: %s", op.get("op"), exc)
                    await send_channel.send({"ok": False, "error": str(exc),
                                             "errno": exc.errno or errno.EIO})
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("control request %s is invalid: %s", op, exc)
                    await send_channel.send({"ok": False, "error": str(exc),
                                             "errno": errno.EINVAL})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(work)
            async with receive_channel:
                async for msg in receive_channel:
                    try:
                        await _send(stream, msg)
                    except trio.BrokenResourceError:
                        log.info("control client went away; the request goes on")


async def _send(stream: trio.SocketStream, msg: dict) -> None:
    await stream.send_all(json.dumps(msg).encode() + b"\n")
