"""Logging set-up, called by the CLI only (never on import).

Under systemd (JOURNAL_STREAM set), records go to journald's native socket
with structured fields (UNITBOX_RUN_ID, UNITBOX_UNIT, UNITBOX_STATE), so
`journalctl UNITBOX_RUN_ID=<id>` finds the daemon's account of a run beside
the run unit's own; journald adds the timestamps. Elsewhere: stderr."""

from __future__ import annotations

import logging
import os
import sys

from pystemd import journal as sd_journal

FIELDS = ("run_id", "unit", "state")
JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _FieldsFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(f"{name}={getattr(record, name)}" for name in FIELDS if hasattr(record, name))
        return f"{text} {extra}" if extra else text


class JournalHandler(logging.Handler):
    """Records to journald with their fields, through libsystemd's
    sd_journal_sendv (pystemd.journal: the library already in use, which
    also knows journald's protocol for large or binary fields)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {
                "MESSAGE": self.format(record),
                "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
                "SYSLOG_IDENTIFIER": "unitbox",
                "LOGGER": record.name,
            }
            for name in FIELDS:
                if hasattr(record, name):
                    fields[f"UNITBOX_{name.upper()}"] = str(getattr(record, name))
            sd_journal.sendv(**fields)
        except Exception:
            self.handleError(record)


def setup_logging(level: str, target: str = "auto") -> None:
    """target: auto (journal under systemd, else stderr), journal (both), stderr."""
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    handlers: list[logging.Handler] = []
    use_journal = (target == "journal" or (target == "auto" and under_journal)) and os.path.exists(JOURNAL_SOCKET)
    if use_journal:
        journal = JournalHandler()
        journal.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(journal)
    if not (use_journal and target == "auto"):
        fmt = "%(levelname)s %(name)s: %(message)s" if under_journal else \
            "%(asctime)s %(levelname)s %(name)s: %(message)s"
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(_FieldsFormatter(fmt))
        handlers.append(stream)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level.upper())
