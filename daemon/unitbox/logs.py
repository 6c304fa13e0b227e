"""Logging set-up, called by the CLI only (never on import). Under journald
(JOURNAL_STREAM set) no timestamps; structured run fields appended as
key=value so `journalctl -u unitbox | grep run_id=…` finds a run's events."""

from __future__ import annotations

import logging
import os
import sys

FIELDS = ("run_id", "unit", "state")


class _FieldsFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(f"{name}={getattr(record, name)}" for name in FIELDS if hasattr(record, name))
        return f"{text} {extra}" if extra else text


def setup_logging(level: str) -> None:
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_FieldsFormatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
