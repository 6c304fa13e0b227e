"""GET /runs/<id>/events: a run as Server-Sent Events (docs/api.md), read
through follow.py.

    event: state    data: the Run (GET /status's body): first, then at each change of state
    event: stdout   data: {"text": "…"}  output as written, decoded as UTF-8
    event: stderr   data: {"text": "…"}
    event: end      data: the final Run; then the response ends

Every event has `id: <stdout offset>.<stderr offset>`: the bytes of each
stream sent so far. A client that comes back with that id as Last-Event-ID
(or `?last_event_id=`, for clients that cannot set headers; the header wins,
because EventSource keeps the URL it began with and sends the newer id as
the header) gets the bytes after it: nothing twice, nothing missed.

Writes await the client (aiohttp's write drains above 64 KiB), so one that
stops reading holds a bounded buffer; one that takes no bytes for
WRITE_STALL_S is dropped. A daemon that stops ends every stream at once
(without `end`: the run goes on, and a client may come back later)."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from unitbox.api.auth import caller_of
from unitbox.api.models import RunOut
from unitbox.api.state import ENGINE
from unitbox.errors import InvalidInput
from unitbox.follow import Follower, StreamCursor, cursors
from unitbox.leftovers import RunDetails
from unitbox.lifecycle import STREAMS
from unitbox.outcome import RunState
from unitbox.store import RunRecord

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0  # a comment line when nothing else was sent: proxies keep idle streams open about 30-60 s
WRITE_STALL_S = 60.0  # a client that takes no bytes for this long is dropped
HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
           "X-Accel-Buffering": "no"}  # nginx: pass events on as they come
_EVENT_ID = re.compile(r"(\d{1,19})\.(\d{1,19})")


def resume_point(request: web.Request) -> tuple[tuple[int, int], str]:
    """The offsets to start from (Last-Event-ID: the header, else the query;
    or the start), and the name they were given by."""
    raw, field = request.headers.get("Last-Event-ID"), "Last-Event-ID"
    if not raw:
        raw, field = request.query.get("last_event_id"), "last_event_id"
    if not raw:  # an empty id is no id (the SSE spec sends none then)
        return (0, 0), field
    match = _EVENT_ID.fullmatch(raw.strip())
    if match is None:
        raise InvalidInput(f"{field} must be an event id of this stream, <stdout bytes>.<stderr bytes>, "
                           f"got {raw[:40]!r}", details=[{"field": field, "message": "not <int>.<int>"}])
    return (int(match[1]), int(match[2])), field


def _check_within(stream_cursors: dict[str, StreamCursor], field: str) -> None:
    """An id past what was kept was never sent (kept output only grows): another run's, or made up."""
    for stream, cursor in stream_cursors.items():
        if cursor.offset > (size := cursor.size()):
            raise InvalidInput(f"{field} is past the end of the run's {stream} ({size} bytes)",
                               details=[{"field": field, "message": f"past the end of {stream}"}])


def _text(text: str) -> bytes:
    return json.dumps({"text": text}, ensure_ascii=False).encode()


class EventWriter:
    def __init__(self, response: web.StreamResponse, run: Follower, stream_cursors: dict[str, StreamCursor],
                 details: Callable[[RunRecord], Awaitable[RunDetails]] | None = None) -> None:
        self.response = response
        self.follower = run
        self.cursors = stream_cursors
        self.details = details  # the final Run carries its result, diagnostics and files, as GET /status

    async def send(self, event: str, data: bytes) -> None:
        event_id = ".".join(str(self.cursors[stream].offset) for stream in STREAMS)
        await self._write(b"event: %s\nid: %s\ndata: %s\n\n" % (event.encode(), event_id.encode(), data))

    async def run(self, record: RunRecord, event: str = "state") -> RunState:
        details = await self.details(record) if event == "end" and self.details is not None else None
        await self.send(event, RunOut.of(record, details).model_dump_json().encode())
        return record.state

    async def output(self, *, final: bool) -> None:
        """Everything new in each stream, stdout first."""
        for stream, cursor in self.cursors.items():
            while (data := self.follower.read(cursor, final=final, render=_text)) is not None:
                await self.send(stream, data)
                await asyncio.sleep(0)  # a long replay takes turns with the rest of the daemon

    async def keepalive(self) -> None:
        await self._write(b": keepalive\n\n")

    async def _write(self, data: bytes) -> None:
        async with asyncio.timeout(WRITE_STALL_S):
            await self.response.write(data)


async def follow(writer: EventWriter) -> None:
    """The events of docs/api.md until the run ends (or the daemon stops)."""
    run = writer.follower
    record = await run.record()
    sent = await writer.run(record)
    while not record.state.terminal:
        await writer.output(final=False)
        if run.closing:
            return
        if not await run.changed(HEARTBEAT_S):
            await writer.keepalive()
        record = await run.record()
        if not record.state.terminal and record.state is not sent:
            sent = await writer.run(record)
    await writer.output(final=True)  # a final record means the output is all in the files
    if record.state is not sent:
        await writer.run(record)
    await writer.run(record, "end")


async def events(request: web.Request) -> web.StreamResponse:
    start, field = resume_point(request)
    engine = request.app[ENGINE]
    async with engine.follow(request.match_info["id"], caller_of(request)) as run:
        stream_cursors = cursors(run.dir, start)
        _check_within(stream_cursors, field)
        response = web.StreamResponse(headers=HEADERS)
        try:
            await response.prepare(request)
            details = functools.partial(engine.details, include_output=False)
            await follow(EventWriter(response, run, stream_cursors, details))
        except (ConnectionError, TimeoutError) as exc:  # the client left, or stopped reading
            log.debug("run %s: an event stream ended early: %r", run.id, exc)
            if request.transport is not None:
                request.transport.close()
        except Exception:
            log.exception("run %s: its event stream failed midway", run.id)
            if request.transport is not None:  # a cut-off stream, never one that looks ended
                request.transport.close()
    return response
