"""The endpoints of docs/api.md. Handlers parse and validate at the edge, then
speak to the engine in dataclasses; errors are raised, never formatted here."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.exposition import choose_encoder
from pydantic import ValidationError

from unitbox.api.auth import caller_of
from unitbox.api.errors import validation_details
from unitbox.api.inputs import check_files, decode_content
from unitbox.api.models import (
    HealthOut,
    LimitsIn,
    LimitsOut,
    NodeOut,
    NodesOut,
    RunOut,
    RunRequest,
    RunsPage,
    RuntimeOut,
    RuntimesOut,
    ServerLimitsOut,
    SubmitOut,
    check_args,
    check_entrypoint,
    decode_source,
)
from unitbox.api.relay import forward
from unitbox.api.state import ENGINE, OPENAPI
from unitbox.cluster import ALIVE_S
from unitbox.engine import Submission
from unitbox.errors import (
    BadRequest,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from unitbox.limits import resolve_limits
from unitbox.outcome import RunState
from unitbox.profile import LintMode
from unitbox.store import RunRecord

MULTIPART_FIELDS = frozenset({"file", "stdin", "args", "limits", "runtime", "wait", "entrypoint", "lint",
                              "lint_only", "files"})
REPEATABLE_FIELDS = frozenset({"files"})  # one part per input file, its filename the path
MAX_PAGE = 1000
MAX_CURSOR = 2**63 - 1  # SQLite's largest integer: a cursor is a row's seq


@asynccontextmanager
async def _body_deadline(request: web.Request) -> AsyncIterator[None]:
    """A body that stalls (or trickles) past body_timeout_s is a 408: a
    client must not hold a connection, and a worker's attention, forever."""
    seconds = request.app[ENGINE].config.body_timeout_s
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {seconds:g} s") from None


def _json(model: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=model.model_dump_json(), status=status, headers=headers,
                        content_type="application/json", charset="utf-8")


def _run_out(record: RunRecord) -> RunOut:
    return RunOut.of(record)


def _flag(raw: str | None, name: str) -> bool:
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise InvalidInput(f"{name} must be true or false, got {raw!r}",
                       details=[{"field": name, "message": "not a boolean"}])


@dataclass(frozen=True, slots=True)
class _Ways:
    """How the program is to be run (API v1.1), as the request gave it."""

    entrypoint: str | None = None
    lint: bool = False
    lint_only: bool = False
    files: Sequence[tuple[str, bytes]] = ()


def _submission(request: web.Request, source: bytes, stdin: str, args: list[str], *, limits: LimitsIn | None,
                runtime: str, ways: _Ways) -> Submission:
    config = request.app[ENGINE].config  # the runtime name is checked once, by Engine.submit
    resolved = resolve_limits(limits.requested() if limits else None, config.default_limits, config.maximum_limits)
    if ways.lint_only and ways.entrypoint is not None:
        raise InvalidInput("lint_only runs nothing, so entrypoint cannot be given with it",
                           details=[{"field": "entrypoint", "message": "not with lint_only"}])
    mode = LintMode.ONLY if ways.lint_only else LintMode.BEFORE if ways.lint else LintMode.OFF
    return Submission(code=source, stdin=stdin.encode("utf-8", "surrogatepass"), args=args, limits=resolved,
                      runtime=runtime, owner=caller_of(request).name, entrypoint=ways.entrypoint, lint=mode,
                      files=check_files(ways.files, config.files))


async def _accept(request: web.Request, submission: Submission, wait: bool) -> web.StreamResponse:
    engine = request.app[ENGINE]
    began = time.perf_counter()
    record = await engine.submit(submission)
    engine.metrics.submission_latency.observe(time.perf_counter() - began)
    if wait:
        record = await engine.wait(record.id, engine.config.wait_max_s, caller_of(request))
        if record.state.terminal:
            home = await engine.home_of(record.id, caller_of(request))
            if home is not None:  # it ran on another node (the shared queue): that node has its output
                return await forward(request, *home, by=engine.cluster.name, method="GET",
                                     path_qs=f"/status/{record.id}?include=output")
            return _json(await _detailed(request, record, include_output=True))
    location = f"/status/{record.id}"
    body = SubmitOut(id=record.id, state=record.state, status_url=location, output_url=f"/output/{record.id}")
    return _json(body, status=202, headers={"Location": location})


def _source_or_422(read: Any, field: str) -> bytes:
    try:
        source: bytes = read()
    except ValueError as exc:
        raise InvalidInput(f"{field}: {exc}", details=[{"field": field, "message": str(exc)}]) from None
    return source


async def run_json(request: web.Request) -> web.StreamResponse:
    if request.content_type != "application/json":
        raise UnsupportedMediaType(f"send the run as application/json, not {request.content_type or 'nothing'}")
    async with _body_deadline(request):
        raw = await request.read()  # over client_max_size → 413
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput("the body must be a JSON object")
    run = RunRequest.model_validate(data)
    source = _source_or_422(run.source, "code" if run.code is not None else "code_b64")
    wait = run.wait or _flag(request.query.get("wait"), "wait")
    files = [(f.path, decode_content(i, f.content, f.content_b64)) for i, f in enumerate(run.files)]
    ways = _Ways(entrypoint=run.entrypoint, lint=run.lint, lint_only=run.lint_only, files=files)
    submission = _submission(request, source, run.stdin, run.args, limits=run.limits, runtime=run.runtime,
                             ways=ways)
    return await _accept(request, submission, wait)


async def _read_parts(request: web.Request, cap: int) -> tuple[dict[str, bytes], list[tuple[str, bytes]]]:
    """The form's fields by name, and its `files` parts as (filename, content)."""
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, KeyError, HttpProcessingError) as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from None
    parts: dict[str, bytes] = {}
    files: list[tuple[str, bytes]] = []
    total = 0
    try:
        while (part := await reader.next()) is not None:
            name = getattr(part, "name", None)
            if name not in MULTIPART_FIELDS:
                raise InvalidInput(f"unknown form field {name!r}; expected {', '.join(sorted(MULTIPART_FIELDS))}")
            if name in parts and name not in REPEATABLE_FIELDS:
                raise InvalidInput(f"form field {name!r} given twice")
            filename = str(getattr(part, "filename", None) or "")
            if name in REPEATABLE_FIELDS and not filename:
                raise InvalidInput(f"each {name!r} part needs a filename: the path it gets in the working "
                                   "directory", details=[{"field": f"files[{len(files)}].path", "message": "missing"}])
            chunks = []
            while chunk := await part.read_chunk(1 << 16):  # type: ignore[union-attr]
                total += len(chunk)
                if total > cap:
                    raise PayloadTooLarge(f"the request body is over the {cap // 1024} KiB limit")
                chunks.append(chunk)
            if name in REPEATABLE_FIELDS:
                files.append((filename, b"".join(chunks)))
            else:
                parts[name] = b"".join(chunks)
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:
        raise BadRequest(f"malformed multipart body: {getattr(exc, 'message', None) or exc}") from None
    return parts, files


def _text_part(parts: dict[str, bytes], name: str) -> str | None:
    if name not in parts:
        return None
    try:
        return parts[name].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"form field {name!r} is not UTF-8 text") from None


def _json_part(parts: dict[str, bytes], name: str) -> Any:
    text = _text_part(parts, name)
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise InvalidInput(f"form field {name!r} is not valid JSON: {exc}") from None


async def run_file(request: web.Request) -> web.StreamResponse:
    if request.content_type != "multipart/form-data":
        raise UnsupportedMediaType(f"upload the file as multipart/form-data, not {request.content_type or 'nothing'}")
    engine = request.app[ENGINE]
    async with _body_deadline(request):
        parts, files = await _read_parts(request, engine.config.max_request_kb * 1024)
    if "file" not in parts:
        raise InvalidInput("the form has no 'file' part holding the Python source",
                           details=[{"field": "file", "message": "missing"}])
    source = _source_or_422(lambda: decode_source(parts["file"]), "file")
    args = _json_part(parts, "args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise InvalidInput("args must be a JSON list of strings",
                           details=[{"field": "args", "message": "not a list of strings"}])
    try:
        check_args(args)
        requested = _json_part(parts, "limits")
        limits = LimitsIn.model_validate({} if requested is None else requested)
    except ValidationError as exc:
        details = validation_details(exc, "limits.")
        raise InvalidInput("; ".join(f"{d['field']}: {d['message']}" for d in details), details=details) from None
    except ValueError as exc:
        raise InvalidInput(str(exc), details=[{"field": "args", "message": str(exc)}]) from None
    stdin = _text_part(parts, "stdin") or ""
    runtime = _text_part(parts, "runtime") or "default"
    wait = _flag(_text_part(parts, "wait"), "wait") or _flag(request.query.get("wait"), "wait")
    try:
        entrypoint = check_entrypoint(_text_part(parts, "entrypoint") or None)
    except ValueError as exc:
        raise InvalidInput(f"entrypoint: {exc}", details=[{"field": "entrypoint", "message": str(exc)}]) from None
    ways = _Ways(entrypoint=entrypoint, lint=_flag(_text_part(parts, "lint"), "lint"),
                 lint_only=_flag(_text_part(parts, "lint_only"), "lint_only"), files=files)
    submission = _submission(request, source, stdin, args, limits=limits, runtime=runtime, ways=ways)
    return await _accept(request, submission, wait)


async def _detailed(request: web.Request, record: RunRecord, *, include_output: bool) -> RunOut:
    """One run's full view: its result, diagnostics and files (and output) read from its directory."""
    details = await request.app[ENGINE].details(record, include_output=include_output)
    return RunOut.of(record, details)


async def status(request: web.Request) -> web.Response:
    record = await request.app[ENGINE].get(request.match_info["id"], caller_of(request))
    include = request.query.get("include")
    if include not in (None, "", "output"):
        raise InvalidInput("include must be 'output'", details=[{"field": "include", "message": "unknown value"}])
    return _json(await _detailed(request, record, include_output=include == "output"))


async def cancel(request: web.Request) -> web.Response:
    record, was_going = await request.app[ENGINE].cancel(request.match_info["id"], caller_of(request))
    return _json(_run_out(record), status=202 if was_going else 200)


async def list_runs(request: web.Request) -> web.Response:
    query = request.query
    state: RunState | None = None
    if query.get("state"):
        try:
            state = RunState(query["state"])
        except ValueError:
            raise InvalidInput(f"state must be one of {', '.join(s.value for s in RunState)}",
                               details=[{"field": "state", "message": "unknown state"}]) from None
    limit = _query_int(query.get("limit", "50"), "limit", MAX_PAGE)
    before = _query_int(query["cursor"], "cursor", MAX_CURSOR) if query.get("cursor") else None
    records = await request.app[ENGINE].page(state, limit + 1, before, caller_of(request))
    more = len(records) > limit
    records = records[:limit]
    cursor = str(records[-1].seq) if more and records else None
    return _json(RunsPage(runs=[_run_out(r) for r in records], next_cursor=cursor))


def _query_int(raw: str, name: str, maximum: int) -> int:
    """A positive integer query parameter, ≤ maximum, or a 422 naming it."""
    if not (raw.isascii() and raw.isdigit()):
        raise InvalidInput(f"{name} must be a positive integer, got {raw[:40]!r}",
                           details=[{"field": name, "message": "not a positive integer"}])
    value = int(raw) if len(raw) <= 20 else maximum + 1  # never parse a huge string
    if not 1 <= value <= maximum:
        raise InvalidInput(f"{name} must be between 1 and {maximum}",
                           details=[{"field": name, "message": "out of range"}])
    return value


async def runtimes(request: web.Request) -> web.Response:
    described = await request.app[ENGINE].runtimes()
    return _json(RuntimesOut(runtimes=[RuntimeOut(name=r.name, python=r.python, packages=r.packages)
                                       for r in described]))


async def limits(request: web.Request) -> web.Response:
    config = request.app[ENGINE].config
    return _json(ServerLimitsOut(defaults=LimitsOut.model_validate(config.default_limits.as_dict()),
                                 maxima=LimitsOut.model_validate(config.maximum_limits.as_dict())))


async def healthz(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    health = await engine.health()
    node = engine.cluster.name
    if not health.ok:
        return _json(HealthOut(status="unavailable", node=node, reason=health.reason), status=503)
    return _json(HealthOut(status="ok", node=node, systemd=health.systemd_version, running=engine.executing,
                           queued=engine.queue_depth))


async def nodes(request: web.Request) -> web.Response:
    """The nodes sharing this one's store (admins only): one, with a store of its own."""
    if not caller_of(request).admin:
        raise Forbidden("only an admin token may list the nodes")
    cluster = request.app[ENGINE].cluster
    found, now = await cluster.nodes(), time.time()
    return _json(NodesOut(queued=sum(n.queued for n in found), nodes=[
        NodeOut(name=n.name, url=n.url, capacity=n.capacity, running=n.running, queued=n.queued,
                started_at=n.started_at, heartbeat_at=n.heartbeat_at, alive=now - n.heartbeat_at < ALIVE_S,
                this=n.name == cluster.name) for n in found]))


async def metrics(request: web.Request) -> web.Response:
    """The engine's registry in the Prometheus text format, or in OpenMetrics
    when the scraper's Accept asks for it (the library negotiates)."""
    try:
        encode, content_type = choose_encoder(",".join(request.headers.getall(hdrs.ACCEPT, [])))
    except TypeError:  # prometheus_client compares a version it cannot parse ("version=1.x") and raises
        encode, content_type = generate_latest, CONTENT_TYPE_PLAIN_0_0_4
    return web.Response(body=encode(request.app[ENGINE].metrics.registry),
                        headers={hdrs.CONTENT_TYPE: content_type, "X-Content-Type-Options": "nosniff"})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


async def not_found(request: web.Request) -> web.Response:
    raise NotFound(f"no such path: {request.path}")
