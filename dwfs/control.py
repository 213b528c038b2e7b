"""The control channel between the CLI and a running mount daemon: JSON lines over a socket.

A request is one JSON object `{"op": ..., ...}`. The daemon answers with zero or more progress
lines `{"progress": [done, total]}` and one final line, `{"ok": true, "result": ...}` or
`{"ok": false, "error": message, "errno": n}`.
"""

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


class ControlError(OSError):
    """The daemon refused or failed a request, or could not be reached."""


def request(sock_path: str, op: dict, progress: Callable[[int, int], None] | None = None,
            timeout: float | None = None) -> Any:
    """Send one request to the daemon and return its result."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
    except OSError as exc:
        s.close()
        raise ControlError(errno.ECONNREFUSED, f"no daemon answers on {sock_path}: {exc}") from exc
    with s, s.makefile("rwb") as f:
        f.write(json.dumps(op).encode() + b"\n")
        f.flush()
        for line in f:
            msg = json.loads(line)
            if "progress" in msg:
                if progress:
                    progress(*msg["progress"])
                continue
            if msg.get("ok"):
                return msg.get("result")
            raise ControlError(msg.get("errno", errno.EIO), msg.get("error", "request failed"))
    raise ControlError(errno.EPIPE, "the daemon closed the connection without an answer")


def reachable(sock_path: str) -> bool:
    """Whether a daemon answers on this socket."""
    try:
        request(sock_path, {"op": "ping"}, timeout=5)
    except (ControlError, OSError):
        return False
    return True


async def serve(sock_path: str, handler: Handler, limiter: trio.CapacityLimiter,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve requests on a Unix socket until cancelled; each runs in a worker thread."""
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(sock_path)
    os.chmod(sock_path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(
            lambda stream: _connection(stream, handler, limiter), [listener]
        )
    finally:
        try:
            os.unlink(sock_path)
        except FileNotFoundError:
            log.debug("control socket %s already gone", sock_path)


async def _connection(stream: trio.SocketStream, handler: Handler,
                      limiter: trio.CapacityLimiter) -> None:
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

        def progress(done: int, total: int) -> None:
            try:
                trio.from_thread.run(send_channel.send, {"progress": [done, total]})
            except trio.RunFinishedError:
                log.debug("progress after the daemon stopped: %d/%d", done, total)

        async def work() -> None:
            async with send_channel:
                try:
                    result = await trio.to_thread.run_sync(handler, op, progress,
                                                           limiter=limiter)
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
