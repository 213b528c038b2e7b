"""The control channel between the CLI and a running mount daemon: JSON lines over a socket.

A request is one JSON object `{"op": ..., ...}`. The daemon answers with zero or more progress
lines `{"progress": [done, total]}` and one final line, `{"ok": true, "result": ...}` or
`{"ok": false, "error": message, "errno": n}`.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

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
