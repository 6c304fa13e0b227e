"""GET /output/<id>: a run's captured stdout and stderr, served without
loading them, so that many readers of big outputs cost the daemon a few
buffers each rather than the outputs' size.

- `?stream=stdout|stderr`: the raw bytes as application/octet-stream, sent by
  sendfile (web.FileResponse); Range and conditional requests work. No
  output file yet is an empty body.
- Otherwise the JSON object of docs/api.md, byte for byte what serialising
  `OutputOut` would give, written in pieces (chunked transfer): each stream
  is read READ_CHUNK bytes at a time in a worker thread, decoded by an
  incremental UTF-8 decoder (a character split between two reads stays
  whole; invalid bytes become U+FFFD) and JSON-escaped.

Each stream is served up to the size it had when the response began (the
raw form: FileResponse's fstat), so a live run's growing output comes out as
a consistent prefix. The truncation flags are read from the files too
(capture.stored_output), so a live run shows its flag as soon as it passes
its cap, not only once it has ended.

Errors before the response begins (unknown id, bad `stream`, an unreadable
file) are raised and become the usual JSON error. Once the JSON body has
begun there is no answering with an error any more: a client that leaves is
ordinary (logged at debug level); any other failure is logged and the
connection aborted, so the client sees a cut-off body, never a wrong one."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from unitbox.api.auth import caller_of
from unitbox.api.state import ENGINE
from unitbox.capture import stored_output
from unitbox.errors import InvalidInput
from unitbox.lifecycle import STREAMS
from unitbox.store import RunRecord

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 16  # per read: bounds what a request holds at a time (its bytes, text, escaped text)


@dataclass(frozen=True, slots=True)
class StoredStream:
    """One captured stream as it was when the response began."""

    size: int
    truncated: bool
    file: BinaryIO | None  # None: no output file (yet)

    @classmethod
    def open(cls, path: Path, truncated: bool) -> StoredStream:
        """Blocking: call from a worker thread. `truncated`: the record's flag."""
        size, marked = stored_output(path)
        try:
            file = path.open("rb")
        except FileNotFoundError:
            return cls(0, truncated or marked, None)
        return cls(size, truncated or marked, file)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def json_text(stream: StoredStream) -> Iterator[bytes]:
    """The stream's first `size` bytes as the inside of a JSON string, UTF-8
    encoded, in pieces of about READ_CHUNK bytes. Blocking reads."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    left = stream.size
    while left > 0 and stream.file is not None:
        data = stream.file.read(min(READ_CHUNK, left))
        if not data:  # shorter than measured, which an append-only capture never gets: stop, never spin
            break
        left -= len(data)
        yield _escaped(decoder.decode(data))
    yield _escaped(decoder.decode(b"", final=True))  # an incomplete character at the very end: U+FFFD


def _escaped(text: str) -> bytes:
    # Not ASCII-escaped: the bytes pydantic's model_dump_json gives, and an emoji costs 4 bytes, not 12.
    return json.dumps(text, ensure_ascii=False)[1:-1].encode()


def json_body(record: RunRecord, stdout: StoredStream, stderr: StoredStream) -> Iterator[bytes]:
    """The JSON object of docs/api.md (field order and spacing of `OutputOut`), in
    pieces. Blocking reads: step it in a worker thread."""
    head = {"id": record.id, "state": record.state}
    yield (_compact(head)[:-1] + ',"stdout":"').encode()
    yield from json_text(stdout)
    yield b'","stderr":"'
    yield from json_text(stderr)
    tail = {"stdout_truncated": stdout.truncated, "stderr_truncated": stderr.truncated, "encoding": "utf-8"}
    yield ('",' + _compact(tail)[1:]).encode()


def _compact(value: Mapping[str, object]) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


async def output(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    record = await engine.get(request.match_info["id"], caller_of(request))
    run_dir = engine.run_dir(record.id)
    stream = request.query.get("stream")
    if stream is None:
        return await _send_json(request, record, [run_dir.output(s) for s in STREAMS])
    if stream not in STREAMS:
        raise InvalidInput(f"stream must be stdout or stderr, got {stream!r}",
                           details=[{"field": "stream", "message": "must be stdout or stderr"}])
    return await _raw(record, run_dir.output(stream), _record_truncated(record, stream))


def _record_truncated(record: RunRecord, stream: str) -> bool:
    return record.stdout_truncated if stream == "stdout" else record.stderr_truncated


async def _raw(record: RunRecord, path: Path, truncated: bool) -> web.StreamResponse:
    size, marked = await asyncio.get_running_loop().run_in_executor(None, stored_output, path)
    headers = {"Content-Type": "application/octet-stream",  # set, so FileResponse guesses nothing from the name
               "X-Unitbox-Truncated": str(truncated or marked).lower(), "X-Unitbox-State": str(record.state)}
    if size == 0:  # maybe no file at all yet, which FileResponse would answer with 404
        return web.Response(body=b"", headers=headers)
    return web.FileResponse(path, headers=headers)


async def _send_json(request: web.Request, record: RunRecord, paths: list[Path]) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    with contextlib.ExitStack() as files:
        stdout, stderr = [files.enter_context(contextlib.closing(await loop.run_in_executor(
            None, StoredStream.open, path, _record_truncated(record, name))))
            for name, path in zip(STREAMS, paths, strict=True)]
        response = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
        pieces = json_body(record, stdout, stderr)
        try:
            await response.prepare(request)
            while (piece := await loop.run_in_executor(None, next, pieces, None)) is not None:
                if piece:
                    await response.write(piece)
        except ConnectionError:  # ClientConnectionResetError included: the client left, nothing to answer
            log.debug("run %s: the client left while its output was being sent", record.id)
        except Exception:
            log.exception("run %s: sending its output failed midway", record.id)
            if request.transport is not None:  # a cut-off chunked body, never one that looks complete
                request.transport.close()
    return response
