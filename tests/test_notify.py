"""Notifications: what the daemon tells, by mail to a real SMTP server started here and by a
command, when a member fails or errors are met, and `dwfs notify` checking the settings."""

from __future__ import annotations

import email
import email.policy
import json
import os
import socket
import sys
import threading
import time

import pytest
from aiosmtpd.controller import Controller
from mountutil import FsMount, dwfs, force_unmount, make_warehouse

from dwfs.config import ConfigError, load_config
from dwfs.notify import REPEAT_SECONDS, HealthWatch, NotifyConfig

HOOK = """#!{python}
import json, os, sys
with open({log!r}, "a") as f:
    f.write(json.dumps({{k: v for k, v in os.environ.items() if k.startswith("DWFS_")}}
                       | {{"text": sys.stdin.read()}}) + "\\n")
"""


def free_port() -> int:
    """A local TCP port nothing listens on (as of now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Inbox:
    """An SMTP server on a free local port that keeps every message it is given."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self._cond = threading.Condition()
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        msg = email.message_from_bytes(envelope.original_content or envelope.content,
                                       policy=email.policy.default)
        with self._cond:
            self.messages.append(msg)
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            self._cond.notify_all()
        return "250 Message accepted for delivery"

    def wait_for(self, words: str, timeout: float = 30.0) -> email.message.EmailMessage:
        """The first message whose subject holds `words`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if words in m["Subject"]:
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no mail about {words!r} within {timeout} s; got "
                                         f"{[m['Subject'] for m in self.messages]}")
                self._cond.wait(left)


@pytest.fixture
def inbox():
    box = Inbox()
    box.controller.start()
    try:
        yield box
    finally:
        box.controller.stop()


def _configure(warehouse: str, table: str) -> None:
    with open(os.path.join(warehouse, "dwfs.toml"), "a", encoding="utf-8") as f:
        f.write("\n" + table)


def _hook(tmp_path) -> tuple[str, str]:
    log = str(tmp_path / "hook.log")
    path = tmp_path / "hook.py"
    path.write_text(HOOK.format(python=sys.executable, log=log))
    path.chmod(0o755)
    return str(path), log


def _hook_events(log: str, at_least: int = 0, timeout: float = 30.0) -> list[dict]:
    """What the hook command was run with, once it has run `at_least` times."""
    deadline = time.monotonic() + timeout
    while True:
        lines = []
        if os.path.exists(log):
            with open(log, encoding="utf-8") as f:
                lines = [json.loads(line) for line in f if line.endswith("\n")]
        if len(lines) >= at_least:
            return lines
        assert time.monotonic() < deadline, f"the hook ran {len(lines)} times, not {at_least}"
        time.sleep(0.05)


# --- what is told, from status documents ----------------------------------------------------


def _doc(states: list[str], counts: dict[int, int] | None = None, state: str | None = None,
         stopped: str | None = None) -> dict:
    counts = counts or {}
    members = [{"slot": i, "path": f"/m/{i}.img", "state": s, "reason": "gone" if s != "active"
                else "", "read_errors": 0, "write_errors": 0,
                "checksum_errors": counts.get(i, 0), "repaired": counts.get(i, 0)}
               for i, s in enumerate(states)]
    bad = sum(s not in ("active",) for s in states)
    return {"state": state or ("clean" if not bad else "degraded"), "level": "raidz2",
            "tolerance": 2, "members": members, "stopped": stopped}


def test_health_watch_tells_each_change_once():
    w = HealthWatch()
    assert w.observe(_doc(["active"] * 5, {1: 4}), 0.0) == []  # counts from earlier: history
    assert w.observe(_doc(["active"] * 5, {1: 4}), 5.0) == []
    failed = w.observe(_doc(["active", "faulty", "active", "active", "active"], {1: 4}), 10.0)
    assert [(e.kind, e.slot) for e in failed] == [("member-failed", 1), ("degraded", None)]
    assert "slot 1 (/m/1.img) is faulty" in failed[0].summary and "gone" in failed[0].detail
    assert w.observe(_doc(["active", "faulty", "active", "active", "active"], {1: 4}), 15) == []
    grew = w.observe(_doc(["active", "faulty", "active", "active", "active"], {1: 4, 3: 2}), 20)
    assert [(e.kind, e.slot) for e in grew] == [("member-errors", 3)]
    assert "met 2 checksum errors" in grew[0].summary
    # Growing again within the hour: not told again; after it, told with what grew since.
    assert w.observe(_doc(["active", "faulty", "active", "active", "active"], {3: 9}), 60) == []
    again = w.observe(_doc(["active", "faulty", "active", "active", "active"], {3: 9}),
                      20 + REPEAT_SECONDS)
    assert [e.kind for e in again] == ["member-errors"] and "met 7 checksum" in again[0].summary
    # `dwfs clear` (counts back to zero): errors met afterwards are news again, once the
    # hour since the last message has passed.
    one_down = ["active", "faulty", "active", "active", "active"]
    assert w.observe(_doc(one_down), 30 + REPEAT_SECONDS) == []
    after = w.observe(_doc(one_down, {3: 2}), 40 + 2 * REPEAT_SECONDS)
    assert [e.kind for e in after] == ["member-errors"] and "met 2 checksum" in after[0].summary
    rebuilding = _doc(["active", "rebuilding", "active", "active", "active"], {3: 9},
                      state="rebuilding")
    assert w.observe(rebuilding, 9000) == []
    done = w.observe(_doc(["active"] * 5, {3: 9}), 9005)
    assert [(e.kind, e.slot) for e in done] == [("rebuilt", 1), ("clean", None)]
    full = _doc(["active"] * 5, {3: 9})
    full["metadata_room"] = "the disk holding meta.db has 1 MiB free"
    told = w.observe(full, 9007)
    assert [e.kind for e in told] == ["metadata-full"] and "1 MiB free" in told[0].detail
    assert w.observe(full, 9008) == []
    stopped = w.observe(_doc(["active"] * 5, {3: 9}, stopped="metadata write failed"), 9010)
    assert [e.kind for e in stopped] == ["stopped"] and stopped[0].severity == "critical"


def test_health_watch_first_look_tells_what_is_wrong_already():
    events = HealthWatch().observe(_doc(["active", "missing", "missing", "missing", "active"],
                                        state="failed"), 0.0)
    assert [(e.kind, e.slot) for e in events] == [("member-failed", 1), ("member-failed", 2),
                                                  ("member-failed", 3), ("failed", None)]


@pytest.mark.parametrize("table, message", [
    ("[notify]\nmail_to = 3\n", "mail_to must be an address or a list of addresses"),
    ("[notify]\nmail_to = 'nobody'\n", "mail_to must be an address"),
    ("[notify]\nsmtp_port = 70000\n", "smtp_port must be a port number"),
    ("[notify]\nsmtp_starttls = 'yes'\n", "smtp_starttls must be true or false"),
    ("[notify]\nmail_too = 'a@b'\n", "[notify] has no setting 'mail_too'"),
    ("[notify]\ncommand = 'a \"b'\n", "No closing quotation"),
    ("[[notify]]\nmail_to = 'a@b.c'\n", "[notify] must be a table"),
])
def test_bad_notify_settings_are_named(tmp_path, table, message):
    wh = make_warehouse(tmp_path / "wh", size="16M")
    _configure(wh, table)
    with pytest.raises(ConfigError) as err:
        load_config(wh)
    assert message in str(err.value)
    done = dwfs("status", wh, check=False)
    assert done.returncode == 1 and message in done.stderr


def test_notify_settings_survive_a_rewrite_of_dwfs_toml(tmp_path):
    wh = make_warehouse(tmp_path / "wh", size="16M")
    _configure(wh, "[notify]\nmail_to = ['a@example.org', 'b@example.org']\n"
                   "smtp_port = 2525\ncommand = '/bin/logger -t dwfs'\nsmtp_starttls = true\n")
    cfg = load_config(wh)
    cfg.save()  # as a replacement onto a new device does
    again = load_config(wh).notify
    assert again == cfg.notify == NotifyConfig(
        mail_to=["a@example.org", "b@example.org"], smtp_port=2525,
        command="/bin/logger -t dwfs", smtp_starttls=True)


# --- through real mail and a real mount -------------------------------------------------------


def test_dwfs_notify_sends_a_test_message_and_says_what_failed(tmp_path, inbox):
    wh = make_warehouse(tmp_path / "wh", size="16M")
    done = dwfs("notify", wh, check=False)
    assert done.returncode == 1 and "no [notify] settings" in done.stderr
    hook, log = _hook(tmp_path)
    _configure(wh, f"[notify]\nmail_to = 'admin@example.org'\nmail_from = 'dwfs@test'\n"
                   f"smtp_host = '127.0.0.1'\nsmtp_port = {inbox.port}\ncommand = '{hook}'\n")
    done = dwfs("notify", wh)
    assert "sent a test message to admin@example.org and ran" in done.stdout
    msg = inbox.wait_for("test message")
    assert msg["To"] == "admin@example.org" and msg["X-Dwfs-Event"] == "test"
    assert inbox.envelopes[-1] == ("dwfs@test", ["admin@example.org"])
    assert os.path.realpath(wh) in msg.get_content()
    [ran] = _hook_events(log, at_least=1)
    assert ran["DWFS_EVENT"] == "test" and ran["DWFS_WAREHOUSE"] == os.path.realpath(wh)
    assert "test message" in ran["text"]
    # A server that is not there, a command that fails: each named, exit status 1.
    closed = free_port()  # nothing listens there
    _configure(wh, "")  # (keeps the file's end clean for the rewrite below)
    text = open(os.path.join(wh, "dwfs.toml"), encoding="utf-8").read()
    text = text.replace(f"smtp_port = {inbox.port}", f"smtp_port = {closed}")
    text = text.replace(f"command = '{hook}'", "command = '/bin/false'")
    with open(os.path.join(wh, "dwfs.toml"), "w", encoding="utf-8") as f:
        f.write(text)
    done = dwfs("notify", wh, check=False)
    assert done.returncode == 1
    assert f"through 127.0.0.1:{closed} failed" in done.stderr
    assert "command '/bin/false' exited 1" in done.stderr


@pytest.mark.timeout(180)
def test_the_daemon_mails_when_a_member_fails_and_when_it_is_rebuilt(tmp_path, inbox):
    wh = make_warehouse(tmp_path / "wh", size="32M")
    hook, log = _hook(tmp_path)
    _configure(wh, f"[notify]\nmail_to = ['ops@example.org']\nsmtp_host = '127.0.0.1'\n"
                   f"smtp_port = {inbox.port}\ncommand = '{hook}'\n")
    m = FsMount(wh, tmp_path / "mnt")
    try:
        m.mount()
        with open(m.path("f"), "wb") as f:
            f.write(os.urandom(3 << 20))
        victim = load_config(wh).member_path(2)
        os.unlink(victim)
        failed = inbox.wait_for("slot 2")
        assert f"slot 2 ({victim}) is faulty" in failed["Subject"]
        assert failed["X-Dwfs-Event"] == "member-failed"
        body = failed.get_content()
        assert "dwfs replace WAREHOUSE 2" in body and m.mountpoint in body
        assert inbox.wait_for("the array is degraded")["X-Dwfs-Event"] == "degraded"
        ran = _hook_events(log, at_least=2)
        assert [e["DWFS_EVENT"] for e in ran] == ["member-failed", "degraded"]
        assert ran[0]["DWFS_SLOT"] == "2" and ran[0]["DWFS_MEMBER"] == victim
        assert ran[0]["DWFS_MOUNTPOINT"] == m.mountpoint and ran[0]["DWFS_SEVERITY"] == \
            "critical"
        dwfs("replace", m.mountpoint, "2")
        assert inbox.wait_for("slot 2 rebuilt")["X-Dwfs-Event"] == "rebuilt"
        assert inbox.wait_for("clean again")["X-Dwfs-Event"] == "clean"
        m.umount()
    finally:
        force_unmount(m.mountpoint, wh)
    subjects = [msg["Subject"] for msg in inbox.messages]
    assert len(subjects) == len(set(subjects)) == 4, subjects  # each told once


@pytest.mark.timeout(120)
def test_a_mount_goes_on_when_mail_cannot_be_sent(tmp_path):
    closed = free_port()  # nothing listens there
    wh = make_warehouse(tmp_path / "wh", size="32M")
    _configure(wh, f"[notify]\nmail_to = 'ops@example.org'\nsmtp_host = '127.0.0.1'\n"
                   f"smtp_port = {closed}\n")
    m = FsMount(wh, tmp_path / "mnt")
    try:
        m.mount()
        os.unlink(load_config(wh).member_path(0))
        deadline = time.monotonic() + 30
        text = ""
        while "failed: [Errno 111] Connection refused" not in text:
            assert time.monotonic() < deadline, text[-2000:]
            time.sleep(0.2)
            with open(os.path.join(wh, "dwfs.log"), errors="replace") as f:
                text = f.read()
        assert "notify member-failed: mail to ops@example.org through" in text
        with open(m.path("g"), "wb") as f:
            f.write(b"still writable")
        with open(m.path("g"), "rb") as f:
            assert f.read() == b"still writable"
        m.umount()
    finally:
        force_unmount(m.mountpoint, wh)
