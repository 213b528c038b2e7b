"""The daemon's log file (dwfs.log in the warehouse) stays bounded on a long-lived mount."""

from __future__ import annotations

import logging
import subprocess
import sys

from dwfs import daemon


def test_the_daemon_log_is_rotated_and_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(daemon, "LOG_BYTES", 4096)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        daemon._log_to_file(str(tmp_path), debug=False)
        log = logging.getLogger("dwfs.test")
        for i in range(500):
            log.info("line %d %s", i, "x" * 50)
        log.debug("not logged without --debug")
    finally:
        for h in root.handlers:
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["dwfs.log"] + [f"dwfs.log.{i}" for i in range(1, daemon.LOG_KEPT + 1)]
    assert all((tmp_path / n).stat().st_size <= 4096 for n in names)
    text = (tmp_path / "dwfs.log").read_text()
    assert "line 499 " in text and "not logged" not in text
    assert "line 0 " not in "".join((tmp_path / n).read_text() for n in names)  # rotated out


def test_standard_error_follows_the_log_to_its_new_file(tmp_path):
    # `dwfs mount` opens dwfs.log as the daemon's standard output and error; after a rotation
    # what is written there (a thread's uncaught exception) must land in the new dwfs.log.
    script = (
        "import logging, sys\n"
        "from dwfs import daemon\n"
        "daemon.LOG_BYTES = 4096\n"
        f"daemon._log_to_file({str(tmp_path)!r}, debug=False)\n"
        "for i in range(200):\n"
        "    logging.getLogger('dwfs.test').info('line %d %s', i, 'x' * 50)\n"
        "sys.stderr.write('on standard error after the rotation\\n')\n"
        "sys.stderr.flush()\n"
    )
    with open(tmp_path / "dwfs.log", "ab") as log:
        subprocess.run([sys.executable, "-c", script], stdout=log, stderr=log, timeout=60,
                       check=True)
    assert "on standard error after the rotation" in (tmp_path / "dwfs.log").read_text()
    assert (tmp_path / "dwfs.log.1").exists()
