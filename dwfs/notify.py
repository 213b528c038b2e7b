"""Telling someone when the array needs attention, as `mdadm --monitor` and ZFS's event daemon
do: a mail through SMTP and/or a command of the user's, for what the mount daemon sees in the
volume's status (a member failed, errors met on a member, the array degraded, failed or clean
again, a rebuild done, the filesystem stopped). Configured in dwfs.toml's [notify] table."""

from __future__ import annotations

import logging
import os
import queue
import shlex
import smtplib
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

log = logging.getLogger(__name__)

REPEAT_SECONDS = 3600.0  # a member whose error counts keep growing is told of at most this often
COMMAND_TIMEOUT = 60.0
SMTP_TIMEOUT = 30.0
# raid.records.USABLE_STATES, not imported: this module loads with dwfs.config, without the
# array's code
USABLE = ("active", "rebuilding")
LOG_LEVEL = {"critical": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO}
COUNTS = ("read_errors", "write_errors", "checksum_errors")


@dataclass
class NotifyConfig:
    """dwfs.toml's [notify]: who gets mail, through which SMTP server, and a command to run."""

    mail_to: list[str] = field(default_factory=list)
    mail_from: str = ""  # empty: dwfs@<host name>
    smtp_host: str = "localhost"
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_user: str = ""
    smtp_password: str = ""
    command: str = ""  # run with the event in DWFS_* variables and its text on standard input

    @property
    def enabled(self) -> bool:
        """Whether events go anywhere."""
        return bool(self.mail_to or self.command)

    @classmethod
    def from_table(cls, table: object) -> NotifyConfig:
        """The settings of a [notify] table; ValueError names a wrong one."""
        if not isinstance(table, dict):
            raise ValueError("[notify] must be a table")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"[notify] has no setting {unknown[0]!r} (settings: "
                             f"{', '.join(sorted(known))})")
        cfg = cls()
        to = table.get("mail_to", [])
        if isinstance(to, str):
            to = [to]
        if not isinstance(to, list) or not all(isinstance(a, str) and "@" in a for a in to):
            raise ValueError(f"[notify] mail_to must be an address or a list of addresses, "
                             f"got {table.get('mail_to')!r}")
        cfg.mail_to = list(to)
        for key in ("mail_from", "smtp_host", "smtp_user", "smtp_password", "command"):
            value = table.get(key, getattr(cfg, key))
            if not isinstance(value, str):
                raise ValueError(f"[notify] {key} must be a string, got {value!r}")
            setattr(cfg, key, value)
        port = table.get("smtp_port", cfg.smtp_port)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"[notify] smtp_port must be a port number, got {port!r}")
        cfg.smtp_port = port
        tls = table.get("smtp_starttls", cfg.smtp_starttls)
        if not isinstance(tls, bool):
            raise ValueError(f"[notify] smtp_starttls must be true or false, got {tls!r}")
        cfg.smtp_starttls = tls
        if cfg.command:
            try:
                shlex.split(cfg.command)
            except ValueError as exc:
                raise ValueError(f"[notify] command {cfg.command!r}: {exc}") from None
        return cfg

    def toml_lines(self, quote) -> list[str]:
        """The [notify] table as dwfs.toml writes it (nothing when nothing is set)."""
        lines = []
        default = NotifyConfig()
        if self.mail_to:
            lines.append("mail_to = [" + ", ".join(quote(a) for a in self.mail_to) + "]")
        for key in ("mail_from", "smtp_host", "smtp_user", "smtp_password", "command"):
            if getattr(self, key) != getattr(default, key):
                lines.append(f"{key} = {quote(getattr(self, key))}")
        if self.smtp_port != default.smtp_port:
            lines.append(f"smtp_port = {self.smtp_port}")
        if self.smtp_starttls:
            lines.append("smtp_starttls = true")
        return ["[notify]", *lines, ""] if lines else []


@dataclass(frozen=True)
class Event:
    """Something about the array worth telling: what kind, how bad, and what to say."""

    # member-failed | member-errors | degraded | failed | clean | rebuilt | metadata-full |
    # stopped | spare-used | spare-failed | test
    kind: str
    severity: str  # critical | warning | info
    summary: str  # one line: a mail's subject
    detail: str = ""
    slot: int | None = None
    member: str | None = None


class HealthWatch:
    """Turns one volume's successive status documents into events: each change told once, a
    member's growing error counts at most every REPEAT_SECONDS."""

    def __init__(self) -> None:
        self.previous: dict | None = None
        self._told: dict[int, tuple[float, dict]] = {}  # slot -> (when, counts then)

    def observe(self, doc: dict, now: float) -> list[Event]:
        """The events since the last document (the first one tells what is wrong already;
        error counts kept from earlier mounts are history, not news)."""
        prev = self.previous
        self.previous = doc
        events: list[Event] = []
        members = doc["members"]
        if prev is None:
            for m in members:
                self._told[m["slot"]] = (float("-inf"), _counts(m))
                if m["state"] not in USABLE:
                    events.append(_member_failed(m))
            if doc["state"] in ("degraded", "failed"):
                events.append(_array_state(doc, None))
        else:
            for m, p in zip(members, prev["members"], strict=True):
                if p["state"] in USABLE and m["state"] not in USABLE:
                    events.append(_member_failed(m))
                elif p["state"] != "active" and m["state"] == "active":  # (a quick
                    # rebuild may never be seen rebuilding)
                    events.append(Event("rebuilt", "info",
                                        f"slot {m['slot']} rebuilt onto {m['path']}",
                                        "The member holds all its data again.",
                                        m["slot"], m["path"]))
            if doc["state"] != prev["state"] and doc["state"] != "rebuilding":
                events.append(_array_state(doc, prev["state"]))
        for m in members:
            events += self._grown(m, now)
        if doc.get("metadata_room") and not (prev or {}).get("metadata_room"):
            events.append(Event("metadata-full", "critical", "no room for new files",
                                f"{doc['metadata_room']}\nCreating files and growing "
                                "metadata fail (ENOSPC) until room is made."))
        if doc.get("stopped") and not (prev or {}).get("stopped"):
            events.append(Event("stopped", "critical", "the filesystem stopped",
                                f"{doc['stopped']}\nUnmount it and mount it again."))
        return events

    def _grown(self, m: dict, now: float) -> list[Event]:
        when, base = self._told.get(m["slot"], (float("-inf"), dict.fromkeys(COUNTS, 0)))
        counts = _counts(m)
        if any(counts[k] < base[k] for k in COUNTS):  # cleared, or a new member: start over
            base = dict.fromkeys(COUNTS, 0)
            self._told[m["slot"]] = (when, base)
        if not any(counts[k] > base[k] for k in COUNTS) or now - when < REPEAT_SECONDS:
            return []
        self._told[m["slot"]] = (now, counts)
        grown = ", ".join(f"{counts[k] - base[k]} {k.replace('_', ' ')}" for k in COUNTS
                          if counts[k] > base[k])
        return [Event("member-errors", "warning",
                      f"slot {m['slot']} ({m['path']}) met {grown}",
                      f"Redundancy covered them and {m['repaired']} chunk(s) were rewritten "
                      "so far; a member that keeps failing is a disk going bad. Totals: "
                      + ", ".join(f"{k.replace('_', ' ')} {counts[k]}" for k in COUNTS)
                      + ". At most one such message an hour per member; `dwfs clear` resets "
                        "the counts.", m["slot"], m["path"])]


def _counts(m: dict) -> dict:
    return {k: int(m[k]) for k in COUNTS}


def _member_failed(m: dict) -> Event:
    return Event("member-failed", "critical",
                 f"slot {m['slot']} ({m['path']}) is {m['state']}",
                 f"{m['reason'] or 'no reason recorded'}\nReads and writes go on from "
                 "redundancy while the level allows; `dwfs replace WAREHOUSE "
                 f"{m['slot']}` rebuilds it.", m["slot"], m["path"])


def _array_state(doc: dict, before: str | None) -> Event:
    state = doc["state"]
    down = [f"slot {m['slot']} ({m['path']}) {m['state']}" for m in doc["members"]
            if m["state"] != "active"]
    if state == "clean":
        return Event("clean", "info", "the array is clean again"
                     + (f" (was {before})" if before else ""), "Every member is active.")
    severity = "critical"
    summary = {"degraded": f"the array is degraded ({doc['level']}, tolerates "
                           f"{doc['tolerance']} failed member(s))",
               "failed": "the array has failed: more members are lost than it tolerates"
               }.get(state, f"the array is {state}")
    return Event(state, severity, summary, "\n".join(down))


class Notifier:
    """Delivers events in a thread of its own; a delivery that fails is logged, never raised."""

    def __init__(self, cfg: NotifyConfig, warehouse: str, mountpoint: str | None = None) -> None:
        self.cfg = cfg
        self.warehouse = warehouse
        self.mountpoint = mountpoint
        self._queue: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def send(self, event: Event) -> None:
        """Queue `event` for delivery (logged in any case)."""
        log.log(LOG_LEVEL[event.severity], "notify %s: %s", event.kind, event.summary)
        if not self.cfg.enabled:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="notify", daemon=True)
            self._thread.start()
        self._queue.put(event)

    def close(self, timeout: float = SMTP_TIMEOUT) -> None:
        """Deliver what is queued (waiting at most `timeout`), then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("notify: deliveries still pending after %.0f s; not waiting",
                            timeout)

    def _serve(self) -> None:
        while (event := self._queue.get()) is not None:
            for problem in self.deliver(event):
                log.warning("notify %s: %s", event.kind, problem)

    def deliver(self, event: Event) -> list[str]:
        """Send `event` by every configured way now; what went wrong, one line each."""
        problems = []
        text = self.text(event)
        if self.cfg.mail_to:
            try:
                self._mail(event, text)
            except (OSError, smtplib.SMTPException) as exc:
                problems.append(f"mail to {', '.join(self.cfg.mail_to)} through "
                                f"{self.cfg.smtp_host}:{self.cfg.smtp_port} failed: {exc}")
        if self.cfg.command:
            problem = self._command(event, text)
            if problem:
                problems.append(problem)
        return problems

    def text(self, event: Event) -> str:
        """The message body."""
        where = self.warehouse + (f", mounted at {self.mountpoint}" if self.mountpoint else "")
        return (f"{event.summary}\n\n{event.detail}\n\nWarehouse: {where}\n"
                f"Host: {socket.gethostname()}\nTime: {formatdate(localtime=True)}\n"
                f"Event: {event.kind} ({event.severity})\n\n"
                f"`dwfs status {self.warehouse}` shows the array.\n")

    def _mail(self, event: Event, text: str) -> None:
        msg = EmailMessage()
        msg["Subject"] = f"dwfs on {socket.gethostname()}: {event.summary}"
        msg["From"] = self.cfg.mail_from or f"dwfs@{socket.getfqdn()}"
        msg["To"] = ", ".join(self.cfg.mail_to)
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid("dwfs")
        msg["X-Dwfs-Event"] = event.kind
        msg.set_content(text)
        with smtplib.SMTP(self.cfg.smtp_host, self.cfg.smtp_port, timeout=SMTP_TIMEOUT) as smtp:
            if self.cfg.smtp_starttls:
                smtp.starttls()
            if self.cfg.smtp_user:
                smtp.login(self.cfg.smtp_user, self.cfg.smtp_password)
            smtp.send_message(msg)
        log.info("notify %s: mailed %s", event.kind, ", ".join(self.cfg.mail_to))

    def _command(self, event: Event, text: str) -> str | None:
        env = dict(os.environ, DWFS_EVENT=event.kind, DWFS_SEVERITY=event.severity,
                   DWFS_SUMMARY=event.summary, DWFS_WAREHOUSE=self.warehouse,
                   DWFS_MOUNTPOINT=self.mountpoint or "",
                   DWFS_SLOT="" if event.slot is None else str(event.slot),
                   DWFS_MEMBER=event.member or "")
        argv = shlex.split(self.cfg.command)
        try:
            done = subprocess.run(argv, input=text, text=True, env=env, capture_output=True,
                                  timeout=COMMAND_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"command {self.cfg.command!r} could not run: {exc}"
        if done.returncode != 0:
            return (f"command {self.cfg.command!r} exited {done.returncode}: "
                    f"{done.stderr.strip()[-300:]}")
        log.info("notify %s: ran %s", event.kind, self.cfg.command)
        return None


def trial_event(warehouse: str) -> Event:
    """What `dwfs notify` sends to check the settings."""
    return Event("test", "info", "test message",
                 f"This is a test of the notifications of {warehouse}, sent by `dwfs notify`. "
                 "Its daemon sends messages like it when a member fails, errors are met on "
                 "a member, or the array's state changes.")

