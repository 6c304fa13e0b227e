"""What a run leaves besides its outcome and output: its entrypoint's value,
its lint report and its output files, as the collector (collect.py) took
them into the run directory. All of it was made by hostile code: every read
here is capped, every parse strict, and a name from the run is never a path
(output files are stored as numbered blobs and found through the manifest).
Blocking file I/O: call from a worker thread."""

from __future__ import annotations

import codecs
import json
import mimetypes
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unitbox.collect import LINT_BYTES
from unitbox.lint import MAX_DIAGNOSTICS, Diagnostic, LintReport, parse_report, strict_json
from unitbox.rundir import RunDir
from unitbox.store import RunRecord

MANIFEST_BYTES = 4 << 20
ERROR_CHARS = 500
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BLOB = re.compile(r"[0-9]{1,9}")


@dataclass(frozen=True, slots=True)
class OutputFile:
    path: str
    size: int
    sha256: str
    media_type: str
    blob: str


@dataclass(frozen=True, slots=True)
class OutputFiles:
    files: list[OutputFile] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    skipped_count: int = 0
    incomplete: bool = False


@dataclass(frozen=True, slots=True)
class Summary:
    """What the final record says about the leftovers."""

    result_bytes: int | None = None
    output_files: int | None = None
    lint_findings: int | None = None
    stored_bytes: int = 0  # charged to the disk budget
    errors: tuple[str, ...] = ()  # for the record's `error` field


@dataclass(frozen=True, slots=True)
class RunDetails:
    """A single run's view beyond its record: loaded on demand, never stored in memory."""

    result: Any = None
    diagnostics: list[Diagnostic] | None = None
    files: list[OutputFile] | None = None
    stdout: str | None = None
    stderr: str | None = None
    inline_truncated: bool | None = None


def load_details(run_dir: RunDir, record: RunRecord, *, result_cap: int, inline_cap: int | None) -> RunDetails:
    """`inline_cap`: bytes of stdout and stderr each to include (None: no output)."""
    result = load_value(run_dir, result_cap) if record.result_bytes is not None else None
    diagnostics = load_lint(run_dir).diagnostics if record.lint_findings is not None else None
    found = load_files(run_dir) if record.output_files is not None else None
    out = err = None
    cut = None
    if inline_cap is not None:
        (out, out_cut), (err, err_cut) = (_inline(run_dir.output(s), inline_cap) for s in ("stdout", "stderr"))
        cut = out_cut or err_cut
    return RunDetails(result=result, diagnostics=diagnostics, files=found.files if found else None,
                      stdout=out, stderr=err, inline_truncated=cut)


def _inline(path: Path, cap: int) -> tuple[str, bool]:
    """The first `cap` bytes as text (a character cut at the end is left out), and whether there was more."""
    raw = read_capped(path, cap + 1) or b""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    if len(raw) > cap:
        return decoder.decode(raw[:cap], final=False), True
    return decoder.decode(raw, final=True), False


def read_capped(path: Path, cap: int) -> bytes | None:
    """At most `cap` bytes of a regular file (never a symlink's target), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, size = [], 0
        while size < cap and (chunk := os.read(fd, min(1 << 16, cap - size))):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_value(raw: bytes, cap: int) -> Any:
    """The entrypoint's value; ValueError saying why it cannot be taken."""
    if len(raw) > cap:
        raise ValueError(f"the result is over the result_kb limit ({cap // 1024} KiB)")
    try:
        return strict_json(raw)
    except (ValueError, RecursionError):
        raise ValueError("the result is not valid JSON") from None


def media_type(path: str) -> str:
    guessed, encoding = mimetypes.guess_type(path, strict=False)
    return "application/octet-stream" if guessed is None or encoding is not None else guessed


def load_files(run_dir: RunDir) -> OutputFiles | None:
    """The collected files' manifest, each entry checked; None if nothing was collected."""
    raw = read_capped(run_dir.manifest, MANIFEST_BYTES)
    if raw is None:
        return None
    try:
        manifest = json.loads(raw)
        entries, skipped = manifest["files"], manifest["skipped"]
        files = [OutputFile(path=e["path"], size=e["size"], sha256=e["sha256"], media_type=media_type(e["path"]),
                            blob=e["blob"]) for e in entries
                 if isinstance(e["path"], str) and isinstance(e["size"], int) and _SHA256.fullmatch(e["sha256"])
                 and _BLOB.fullmatch(e["blob"])]
        return OutputFiles(files, [s for s in skipped if isinstance(s, dict)][:100],
                           int(manifest["skipped_count"]), bool(manifest["incomplete"]))
    except (ValueError, KeyError, TypeError):
        return OutputFiles(incomplete=True)


def load_value(run_dir: RunDir, result_cap: int) -> Any:
    """The entrypoint's value, None if there is none to take."""
    raw = read_capped(run_dir.returned, result_cap + 1)
    if raw is None:
        return None
    try:
        return parse_value(raw, result_cap)
    except ValueError:
        return None


def load_lint(run_dir: RunDir) -> LintReport:
    return parse_report(read_capped(run_dir.lint_report, LINT_BYTES + 1), LINT_BYTES + 1)


def summarize(run_dir: RunDir, *, entrypoint: str | None, linted: bool, result_cap: int) -> Summary:
    """The leftovers of a run that has ended, checked once for its final record."""
    errors: list[str] = []
    result_bytes = None
    stored = 0
    if entrypoint is not None:
        raw = read_capped(run_dir.returned, result_cap + 1)
        reason = read_capped(run_dir.return_error, ERROR_CHARS * 4)
        if raw is not None:
            stored += len(raw)
            try:
                parse_value(raw, result_cap)
                result_bytes = len(raw)
            except ValueError as exc:
                errors.append(str(exc))
        elif reason is not None:
            errors.append(reason.decode("utf-8", "replace")[:ERROR_CHARS])
    lint_findings = None
    if linted:
        report = load_lint(run_dir)
        lint_findings = len(report.diagnostics) if report.error is None else None
        if report.error is not None:
            errors.append(report.error)
        elif report.truncated:
            errors.append(f"lint: more than {MAX_DIAGNOSTICS} findings, the first {MAX_DIAGNOSTICS} kept")
        stored += _size(run_dir.lint_report)
    files = load_files(run_dir)
    if files is not None:
        stored += sum(f.size for f in files.files)
        if files.incomplete or files.skipped_count:
            errors.append(f"output files: {files.skipped_count} not collected"
                          + (" (a cap was reached)" if files.incomplete else ""))
    return Summary(result_bytes=result_bytes, output_files=len(files.files) if files is not None else None,
                   lint_findings=lint_findings, stored_bytes=stored, errors=tuple(errors))


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0
