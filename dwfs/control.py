"""The control channel between the CLI and a running mount daemon: JSON lines over a socket.

A request is one JSON object `{"op": ..., ...}`. The daemon answers with zero or more progress
lines `{"progress": [done, total]}` and one final line, `{"ok": true, "result": ...}` or
`{"ok": false, "error": message, "errno": n}`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def runtime_dir() -> str:
    """Where control sockets live.

    For root always /run: a mount made by mount(8) or systemd (no XDG_RUNTIME_DIR) must be
    found by `dwfs status` from a login shell (XDG_RUNTIME_DIR=/run/user/0) and vice versa.
    """
    if os.getuid() == 0 and os.path.isdir("/run"):
        base = "/run"
    else:
        base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    path = os.path.join(base, f"dwfs-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def control_socket_path(directory: str) -> str:
    """The control socket of the daemon serving this warehouse."""
    key = hashlib.sha256(os.path.realpath(directory).encode()).hexdigest()[:20]
    return os.path.join(runtime_dir(), f"{key}.sock")


class ControlError(OSError):
    """The daemon refused or failed a request, or could not be reached."""

    def __str__(self) -> str:  # the daemon's own words, without "[Errno N]"
        return self.strerror or super().__str__()


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
