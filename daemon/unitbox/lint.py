"""The static check a run may ask for (`lint`): which linter, and what its
report means. The linter itself runs inside the run's unit (profile.py),
never in the daemon: the submission is untrusted and parsers have bugs. The
daemon only reads the linter's JSON report, as untrusted bytes (size cap,
strict parse, each field checked).

ruff, not pylint: it executes nothing of the code it checks (pylint imports
modules to infer types, and its plugins run code), it is one static binary
with no runtime of its own to mount, and it checks a file in milliseconds."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from unitbox.config import Config

MAX_DIAGNOSTICS = 200
MESSAGE_CHARS = 500
# Findings that mean the program cannot run as written; the rest are warnings.
ERROR_CODES = ("invalid-syntax", "E9", "F821", "F822", "F823", "F63", "F7")

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Diagnostic:
    line: int
    column: int
    code: str
    message: str
    severity: Severity


@dataclass(frozen=True, slots=True)
class LintReport:
    diagnostics: list[Diagnostic]
    truncated: bool = False  # more findings than MAX_DIAGNOSTICS
    error: str | None = None  # why there is no (complete) report


def find_linter(config: Config) -> str | None:
    """ruff's path: configured, beside the daemon's interpreter (its venv), or on PATH."""
    if config.lint.ruff:
        return config.lint.ruff if Path(config.lint.ruff).is_file() else None
    beside = Path(sys.executable).parent / "ruff"
    if beside.is_file():
        return str(beside)
    return shutil.which("ruff")


def severity_of(code: str) -> Severity:
    return "error" if code.startswith(ERROR_CODES) else "warning"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(raw: bytes) -> Any:
    """JSON as RFC 8259 has it: NaN and Infinity, which Python would take, are
    refused (ValueError), so what a run wrote is answered as valid JSON."""
    return json.loads(raw, parse_constant=_reject_constant)


def parse_report(raw: bytes | None, cap: int) -> LintReport:
    """ruff's `--output-format json` report (at most `cap` bytes were read)."""
    if not raw:  # it could not start, or died: its own errors are in the run's stderr
        return LintReport([], error="the linter left no report (its errors, if any, are in stderr)")
    if len(raw) >= cap:
        return LintReport([], error=f"the linter's report is over {cap // 1024} KiB")
    try:
        findings = strict_json(raw)
    except (ValueError, RecursionError):
        return LintReport([], error="the linter's report is not valid JSON")
    if not isinstance(findings, list):
        return LintReport([], error="the linter's report is not a list")
    diagnostics = [d for d in map(_diagnostic, findings[:MAX_DIAGNOSTICS]) if d is not None]
    diagnostics.sort(key=lambda d: (d.line, d.column))
    return LintReport(diagnostics, truncated=len(findings) > MAX_DIAGNOSTICS)


def _diagnostic(finding: Any) -> Diagnostic | None:
    if not isinstance(finding, dict):
        return None
    where = finding.get("location")
    line, column = (where.get("row"), where.get("column")) if isinstance(where, dict) else (None, None)
    code = finding.get("code") or finding.get("name") or "invalid-syntax"
    message = finding.get("message")
    if not (isinstance(line, int) and isinstance(column, int) and _count(line) and _count(column)
            and isinstance(code, str) and isinstance(message, str)):
        return None
    return Diagnostic(line=line, column=column, code=code[:40], message=message[:MESSAGE_CHARS],
                      severity=severity_of(code))


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31
