"""Request and response models at the HTTP edge (docs/api.md, contract v1). They
also generate the OpenAPI document; inside, the engine uses plain dataclasses."""

from __future__ import annotations

import base64
import binascii
import io
import keyword
import tokenize
import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

from unitbox.leftovers import OutputFile, RunDetails
from unitbox.outcome import RunState
from unitbox.profile import LintMode, unit_name
from unitbox.store import RunRecord

_Number = StrictInt | StrictFloat


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LimitsIn(_Strict):
    """Every field optional; a missing one takes the server's default. Values
    ≤ 0, non-numbers and values above the server's maximum are rejected."""

    timeout_s: _Number | None = Field(default=None, description="Wall-clock limit in seconds (> 0).")
    memory_mb: _Number | None = Field(default=None, description="Memory limit for the whole run, no swap.")
    cpu_percent: _Number | None = Field(default=None, description="CPU quota; 100 = one full core.")
    tasks: _Number | None = Field(default=None, description="Processes + threads at once.")
    output_kb: _Number | None = Field(default=None, description="Cap on each of stdout and stderr.")
    disk_mb: _Number | None = Field(default=None, description="Cap on the working directory and /tmp.")

    def requested(self) -> dict[str, object]:
        return self.model_dump(exclude_none=True)


class LimitsOut(BaseModel):
    timeout_s: float
    memory_mb: int
    cpu_percent: int
    tasks: int
    output_kb: int
    disk_mb: int


def check_args(args: list[str]) -> list[str]:
    for index, arg in enumerate(args):
        if "\0" in arg:
            raise ValueError(f"args[{index}] contains a NUL byte")
    return args


def decode_source(source: bytes) -> bytes:
    """Check that `source` is Python source the interpreter will read: UTF-8,
    or another encoding its PEP 263 coding line declares; no NUL bytes."""
    if b"\0" in source:
        raise ValueError("the code contains a NUL byte")
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(source).readline)
        source.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError) as exc:
        raise ValueError(f"the code is not valid UTF-8 (or its declared encoding): {exc}") from None
    return source


class InputFileIn(_Strict):
    path: str = Field(description="Where the file goes, relative to the working directory (e.g. data/in.csv).")
    content: str | None = Field(default=None, description="Its content as UTF-8 text …")
    content_b64: str | None = Field(default=None, description="… or as base64 (exactly one of the two).")


def check_entrypoint(value: str | None) -> str | None:
    """A function name as Python itself stores it: identifiers are NFKC-normalised when
    the program is parsed (`def ﬁ` defines `fi`), so the name looked up must be too."""
    if value is None:
        return None
    name = unicodedata.normalize("NFKC", value)
    if not (name.isidentifier() and not keyword.iskeyword(name) and len(name) <= 100):
        raise ValueError(f"{value[:100]!r} is not a Python function name")
    return name


class RunRequest(_Strict):
    code: str | None = Field(default=None, description="The program, as UTF-8 text.")
    code_b64: str | None = Field(default=None, description="Alternative to code: base64 of the source bytes.")
    stdin: str = Field(default="", description="Fed to the program's standard input.")
    args: list[str] = Field(default_factory=list, description="sys.argv[1:] of the program.")
    limits: LimitsIn | None = Field(default=None, description="Per-run limits; a missing one takes the server's "
                                                               "default.")
    runtime: str = Field(default="default", description="A runtime the server defines (GET /runtimes).")
    wait: bool = Field(default=False, description="Answer once the run has finished (up to the server's cap), "
                                                  "with its output, result and files inline.")
    entrypoint: str | None = Field(default=None, description="Import the program as a module and call this "
                                   "function with no arguments; its value, as JSON, becomes the run's result.")
    lint: bool = Field(default=False, description="Check the program with ruff (in the sandbox) before it runs.")
    lint_only: bool = Field(default=False, description="Check the program, never run it.")
    files: list[InputFileIn] = Field(default_factory=list, description="Input files, placed in the working "
                                     "directory before the program starts.")

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint_is_a_name(cls, value: str | None) -> str | None:
        return check_entrypoint(value)

    @field_validator("args")
    @classmethod
    def _no_nul_in_args(cls, value: list[str]) -> list[str]:
        return check_args(value)

    @model_validator(mode="after")
    def _one_source(self) -> RunRequest:
        if (self.code is None) == (self.code_b64 is None):
            raise ValueError("give exactly one of code and code_b64")
        return self

    def source(self) -> bytes:
        if self.code is not None:
            try:
                return decode_source(self.code.encode("utf-8"))
            except UnicodeEncodeError:
                raise ValueError("code contains lone surrogates: it is not valid UTF-8") from None
        try:
            raw = base64.b64decode(self.code_b64 or "", validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("code_b64 is not valid base64") from None
        return decode_source(raw)


Timestamp = Annotated[datetime | None, Field(description="RFC 3339, UTC; null until known.")]


def _time(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


class DiagnosticOut(BaseModel):
    line: int
    column: int
    code: str = Field(description="ruff's rule code (e.g. F821), or invalid-syntax.")
    message: str
    severity: Literal["error", "warning"] = Field(description="error: the program cannot run as written.")


class FileOut(BaseModel):
    path: str = Field(description="Relative to the working directory.")
    size: int
    sha256: str
    media_type: str = Field(description="Guessed from the name; served as the Content-Type.")
    url: str = Field(description="Where its bytes are served.")

    @classmethod
    def of(cls, run_id: str, file: OutputFile) -> FileOut:
        return cls(path=file.path, size=file.size, sha256=file.sha256, media_type=file.media_type,
                   url=f"/runs/{run_id}/files/{quote(file.path)}")


class FilesOut(BaseModel):
    id: str
    files: list[FileOut]
    skipped: list[dict[str, str]] = Field(description="Entries not collected and why (symlinks, FIFOs, over a "
                                                      "cap); the first 20.")
    skipped_count: int
    incomplete: bool = Field(description="Whether a cap on files or entries looked at stopped the collection.")


class RunOut(BaseModel):
    id: str = Field(description="16 hex digits; also in the unit's name.")
    state: RunState = Field(description="Where the run is: see States.")
    exit_code: int | None = Field(description="The program's exit status when it exited; null when a signal ended "
                                                "it or it never ran.")
    signal: str | None = Field(description="The signal that ended it (e.g. SIGKILL, SIGSEGV); null if it exited.")
    unit: str = Field(description="Its systemd unit: unitbox-run-<id>.service, or the warm unit it was handed "
                                  "to, unitbox-warm-<slot>.service (its description names the run).")
    node: str | None = Field(default=None, description="The node it runs on when several share a store "
                                                       "(docs/operations.md); null while it waits in their "
                                                       "shared queue, and with a store of its own.")
    runtime: str = Field(description="The runtime it ran with.")
    created_at: Timestamp = Field(description="When it was accepted.")
    started_at: Timestamp = Field(description="When its unit started; null until then.")
    finished_at: Timestamp = Field(description="When its final state was recorded; null until then.")
    duration_ms: float | None = Field(description="Wall time from the start of the run's unit (just before its "
                                                  "program's sandbox is set up) to the end of its last process, "
                                                  "as the run's own outcome recorder measured it (10 ms steps); "
                                                  "null while it runs.")
    cpu_ms: float | None = Field(description="CPU time of all its processes; null until it has finished (a "
                                             "pooled run answered at its program's exit: until its unit's end, "
                                             "a moment later).")
    memory_peak_bytes: int | None = Field(description="Its cgroup's memory peak; null until it has finished, as "
                                                      "cpu_ms (and where the kernel does not report one).")
    limits: LimitsOut = Field(description="The limits it got: its request's, the rest the server's defaults.")
    stdout_bytes: int = Field(description="Bytes of stdout kept (at most output_kb); grows while it runs.")
    stderr_bytes: int = Field(description="Bytes of stderr kept (at most output_kb).")
    stdout_truncated: bool = Field(description="Whether stdout went past output_kb (or the server's disk budget) "
                                               "and the rest was dropped.")
    stderr_truncated: bool = Field(description="The same for stderr.")
    error: str | None = Field(description="Why it ended so: the limit it reached (timed_out, oom_killed), why "
                                          "the service could not run it (error), or facts about its end (e.g. "
                                          "output lost at a shutdown); null otherwise.")
    owner: str | None = Field(description="Name of the token that submitted it; null on a server without tokens.")
    entrypoint: str | None = Field(default=None, description="The function called (main() mode); null: run as "
                                                             "a script.")
    lint: LintMode = Field(default=LintMode.OFF, description="Whether it was linted before "
                                                   "running, or only linted.")
    input_files: int = Field(default=0, description="Input files placed in its working directory.")
    output_files: int | None = Field(default=None, description="Files collected from its working directory "
                                     "when it ended (GET /runs/<id>/files); null until then, or if it left none.")
    result_bytes: int | None = Field(default=None, description="Size of its result as JSON; null: no result.")
    lint_findings: int | None = Field(default=None, description="How many diagnostics its lint found; null: "
                                      "not linted (yet).")
    result: Any = Field(default=None, description="What the entrypoint returned (any JSON value). In GET "
                        "/status/<id>, waited submissions and the events' final Run; null in /runs pages.")
    diagnostics: list[DiagnosticOut] | None = Field(default=None, description="The lint findings, as for result.")
    files: list[FileOut] | None = Field(default=None, description="The files it left, as for result.")
    stdout: str | None = Field(default=None, description="Its stdout (up to inline_output_kb), in waited "
                               "submissions and GET /status/<id>?include=output only.")
    stderr: str | None = Field(default=None, description="Its stderr, as for stdout.")
    inline_truncated: bool | None = Field(default=None, description="Whether stdout or stderr above was cut at "
                                          "inline_output_kb (GET /output/<id> has all that was kept).")

    @classmethod
    def of(cls, record: RunRecord, details: RunDetails | None = None) -> RunOut:
        extra: dict[str, Any] = {}
        if details is not None:
            extra = {"result": details.result, "files": [FileOut.of(record.id, f) for f in details.files]
                     if details.files is not None else None,
                     "diagnostics": [DiagnosticOut.model_validate(d, from_attributes=True)
                                     for d in details.diagnostics] if details.diagnostics is not None else None,
                     "stdout": details.stdout, "stderr": details.stderr,
                     "inline_truncated": details.inline_truncated}
        return cls(
            id=record.id, state=record.state, exit_code=record.exit_code, signal=record.signal,
            unit=record.unit or unit_name(record.id), node=record.node,
            runtime=record.runtime, created_at=_time(record.created_at), started_at=_time(record.started_at),
            finished_at=_time(record.finished_at), duration_ms=record.duration_ms, cpu_ms=record.cpu_ms,
            memory_peak_bytes=record.memory_peak_bytes, limits=LimitsOut.model_validate(record.limits.as_dict()),
            stdout_bytes=record.stdout_bytes, stderr_bytes=record.stderr_bytes,
            stdout_truncated=record.stdout_truncated, stderr_truncated=record.stderr_truncated,
            error=record.error, owner=record.owner, entrypoint=record.entrypoint, lint=LintMode(record.lint),
            input_files=record.input_files, output_files=record.output_files, result_bytes=record.result_bytes,
            lint_findings=record.lint_findings, **extra,
        )


class SubmitOut(BaseModel):
    id: str
    state: RunState
    status_url: str
    output_url: str


class OutputOut(BaseModel):
    id: str
    state: RunState
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    encoding: Literal["utf-8"] = "utf-8"


class RunsPage(BaseModel):
    runs: list[RunOut]
    next_cursor: str | None


class RuntimeOut(BaseModel):
    name: str
    python: str
    packages: dict[str, str]


class RuntimesOut(BaseModel):
    runtimes: list[RuntimeOut]


class ServerLimitsOut(BaseModel):
    defaults: LimitsOut = Field(description="What a run gets for each limit its request leaves out.")
    maxima: LimitsOut = Field(description="The most a request may ask for; above is a 422.")


class NodeOut(BaseModel):
    name: str = Field(description="The node's name (`node` in its config; its host name by default).")
    url: str = Field(description="Where the other nodes relay requests for its runs.")
    capacity: int = Field(description="Runs it executes at once (its `max_concurrent`).")
    running: int = Field(description="Runs starting or running there, at its last heartbeat.")
    queued: int = Field(description="Runs waiting there for a free slot, at its last heartbeat.")
    started_at: float = Field(description="When its daemon started (Unix time).")
    heartbeat_at: float = Field(description="Its last heartbeat (Unix time); one every 2 s.")
    alive: bool = Field(description="Its last heartbeat is less than 6 s old.")
    this: bool = Field(description="It is the node that answers this request.")


class NodesOut(BaseModel):
    nodes: list[NodeOut]
    queued: int = Field(description="Runs queued on any node.")


class HealthOut(BaseModel):
    status: Literal["ok", "unavailable"]
    node: str | None = Field(default=None, description="The node that answers (clusters: docs/operations.md).")
    systemd: str | None = None
    running: int = 0
    queued: int = 0
    reason: str | None = None


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorOut(BaseModel):
    error: ErrorBody
