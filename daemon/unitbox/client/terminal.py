"""What the client commands show a person: a run's output on this process's
stdout and stderr as it comes, one-line messages on stderr (`unitbox: …`),
and the server's error answers in words that say what to do."""

from __future__ import annotations

import os
import re
import sys
from typing import Any, BinaryIO, TextIO

from unitbox.client.http import ApiError, Sink, Unreachable

# The request's fields as the options that set them, for 422 answers (docs/api.md#errors).
OPTION_OF_FIELD = {
    "limits.timeout_s": "--timeout", "limits.memory_mb": "--memory", "limits.cpu_percent": "--cpu",
    "limits.tasks": "--tasks", "limits.output_kb": "--output-kb", "limits.disk_mb": "--disk",
    "code": "SCRIPT", "code_b64": "SCRIPT", "args": "ARGS", "stdin": "--stdin", "runtime": "--runtime",
    "entrypoint": "--entrypoint", "lint": "--lint", "lint_only": "--lint-only", "files": "--file",
    "state": "--state", "limit": "--limit",
}
_INDEX = re.compile(r"\[(\d+)\]|\.(\d+)(?=\.|$)")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class Terminal:
    """stdout and stderr of this process. A reader that goes away (`| head`)
    stops the copying, never the following of the run (its exit status still counts)."""

    def __init__(self) -> None:
        self.transient = False  # a status line (queued…) is on stderr, to be erased

    def write(self, stream: str, text: str) -> None:
        self.write_bytes(stream, text.encode("utf-8", "surrogateescape"))

    def write_bytes(self, stream: str, data: bytes) -> None:
        self._erase_transient()
        self._put(sys.stdout if stream == "stdout" else sys.stderr, data)

    def sink(self, stream: str) -> Sink:
        """`stream` ("stdout" or "stderr") as a file bytes are copied into."""
        return _StreamSink(self, stream)

    def say(self, message: str) -> None:
        self._erase_transient()
        self._put(sys.stderr, f"unitbox: {message}\n".encode("utf-8", "replace"))

    def note(self, message: str) -> None:
        """A message only a person at a terminal needs (never in a script's captured stderr)."""
        if sys.stderr.isatty():
            self.say(message)

    def show_status(self, message: str | None) -> None:
        """A line about the run's progress that the next output replaces; only on a terminal."""
        if not sys.stderr.isatty():
            return
        self._erase_transient()
        if message is not None:
            self._put(sys.stderr, f"unitbox: {message}".encode())
            self.transient = True

    def _erase_transient(self) -> None:
        if self.transient:
            self.transient = False
            self._put(sys.stderr, b"\r\x1b[K")

    @staticmethod
    def _put(stream: TextIO, data: bytes) -> None:
        try:
            stream.flush()  # what print() left in the text layer goes first
            buffer: BinaryIO = stream.buffer
            buffer.write(data)
            buffer.flush()
        except BrokenPipeError:
            # Further writes (and the interpreter's flush at exit) go nowhere, as Python's docs advise.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


class _StreamSink:
    def __init__(self, terminal: Terminal, stream: str) -> None:
        self.terminal, self.stream = terminal, stream

    def write(self, data: bytes, /) -> None:
        self.terminal.write_bytes(self.stream, data)


def printable(name: str) -> str:
    """A name from a run (an output file's path) shown without its control characters."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m[0]):02x}", name)


def field_label(field: str, files: list[str] | None = None) -> str:
    """`limits.timeout_s` → `--timeout (limits.timeout_s)`; `files[1].path` → `--file data.csv (files[1].path)`."""
    index = _INDEX.search(field)
    base = _INDEX.sub("", field)
    option = OPTION_OF_FIELD.get(base) or OPTION_OF_FIELD.get(base.split(".")[0])
    if option is None:
        return field
    if option == "--file" and files is not None and index is not None:
        position = int(index[1] or index[2])
        if position < len(files):
            option = f"--file {files[position]}"
    return f"{option} ({field})"


def error_line(exc: ApiError | Unreachable, url: str, *, token: bool, files: list[str] | None = None) -> str:
    """One line saying what went wrong and, where it helps, what to do."""
    if isinstance(exc, Unreachable):
        return f"cannot reach the unitbox server at {url}: {exc} (is it running? --url or $UNITBOX_URL)"
    if exc.status == 401:
        return (f"the server at {url} refused the token (--token or $UNITBOX_TOKEN)" if token
                else f"the server at {url} needs a token: --token or $UNITBOX_TOKEN")
    if exc.status == 422 and exc.details:
        problems = "; ".join(f"{field_label(str(d.get('field')), files)}: {d.get('message')}" for d in exc.details)
        return f"the server refused the request: {problems}"
    if exc.status == 503:
        later = f" (Retry-After: {exc.retry_after} s)" if exc.retry_after else ""
        return f"the server cannot take it now ({exc.code}): {exc.message}{later}"
    return f"{exc.message} ({exc.status} {exc.code})"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def how_it_ended(run: dict[str, Any]) -> str:
    """`exit 3`, `SIGSEGV`, `timed_out`… — the run's end in a word or two."""
    if run["exit_code"] is not None:
        return f"exit {run['exit_code']}"
    return str(run["signal"] or "-")


def run_summary(run: dict[str, Any]) -> list[str]:
    """`unitbox status`: one `name  value` line per fact a person looks for."""
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} ms"

    lines = [("id", run["id"]), ("state", run["state"]), ("ended", how_it_ended(run)),
             ("runtime", run["runtime"]), ("created", run["created_at"] or "-"),
             ("duration", ms(run["duration_ms"])), ("cpu", ms(run["cpu_ms"])),
             ("memory", size(run["memory_peak_bytes"])),
             ("stdout", size(run["stdout_bytes"]) + (" (cut at output_kb)" if run["stdout_truncated"] else "")),
             ("stderr", size(run["stderr_bytes"]) + (" (cut at output_kb)" if run["stderr_truncated"] else ""))]
    if run.get("entrypoint"):
        lines.append(("entrypoint", f"{run['entrypoint']}()"))
    if run.get("result_bytes") is not None:
        lines.append(("result", size(run["result_bytes"]) + " of JSON (--json shows it)"))
    if run.get("lint", "off") != "off":
        lines.append(("lint", f"{run['lint_findings']} findings" if run["lint_findings"] is not None else "-"))
    if run.get("input_files"):
        lines.append(("input files", str(run["input_files"])))
    if run.get("output_files") is not None:
        lines.append(("output files", f"{run['output_files']} (unitbox files {run['id']})"))
    if run["owner"] is not None:
        lines.append(("owner", run["owner"]))
    if run["error"]:
        lines.append(("error", run["error"]))
    return [f"{name:<13}{value}" for name, value in lines]


def run_row(run: dict[str, Any]) -> str:
    """`unitbox runs`: one line per run."""
    duration = "-" if run["duration_ms"] is None else f"{run['duration_ms'] / 1000:.2f}s"
    created = (run["created_at"] or "-")[:19].replace("T", " ")
    return f"{run['id']}  {run['state']:<10}  {how_it_ended(run):<8}  {duration:>8}  {created}  {run['runtime']}"


def diagnostic_lines(script: str, diagnostics: list[dict[str, Any]]) -> list[str]:
    """Lint findings as compilers print them, so editors can jump to them."""
    return [f"{script}:{d['line']}:{d['column']}: {d['code']} {d['message']}" for d in diagnostics]
