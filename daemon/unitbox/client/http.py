"""The HTTP API (docs/api.md) as the command-line client sees it: one aiohttp
session, every error answer turned into ApiError, a lost connection into
Unreachable, and a run's Server-Sent Events followed to their end across
dropped connections (Last-Event-ID: nothing twice, nothing missed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import aiohttp

DEFAULT_URL = "http://127.0.0.1:8080"
MAX_EVENT_BYTES = 16 << 20  # an event's line: a Run with a 1 MiB result and its files fits many times over
CONNECT_S = 10.0
READ_S = 60.0  # the server sends a keepalive every 15 s on an idle event stream
RECONNECT_FOR_S = 120.0  # how long a broken event stream is retried (a daemon restart takes seconds)

# Errors of the connection itself, as opposed to an answer: the server is down, restarting, or the network broke.
CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)


class Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


class ApiError(Exception):
    """The server answered with an error (docs/api.md#errors)."""

    def __init__(self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
                 retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.retry_after = retry_after


class Unreachable(Exception):
    """No answer from the server: refused, name unknown, timed out, cut off."""


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    id: str
    data: Any


class Api:
    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url.rstrip("/")  # a server behind a proxy may live under a path
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_S, sock_read=READ_S)
        self._session = aiohttp.ClientSession(headers=self.headers, timeout=timeout)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use Api as `async with`"
        return self._session

    async def _json(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        try:
            async with self.session.request(method, self.url + path, **kwargs) as reply:
                await _raise_for_error(reply)
                return reply.status, await reply.json(content_type=None)
        except CONNECTION_ERRORS as exc:
            raise Unreachable(_reason(exc)) from None
        except ValueError:  # a body that is not JSON: not a unitbox server, or a proxy's page
            raise Unreachable(f"{method} {path} got an answer that is not unitbox's JSON") from None

    async def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """POST /run-json: {"id", "state", …} (202), or the finished Run (200) when waited."""
        return dict((await self._json("POST", "/run-json", json=request))[1])

    async def status(self, run_id: str, *, include_output: bool = False) -> dict[str, Any]:
        params = {"include": "output"} if include_output else {}
        return dict((await self._json("GET", f"/status/{run_id}", params=params))[1])

    async def cancel(self, run_id: str) -> tuple[bool, dict[str, Any]]:
        """(whether the run was still going, the Run)."""
        status, run = await self._json("POST", f"/runs/{run_id}/cancel")
        return status == 202, dict(run)

    async def runs(self, state: str | None, limit: int) -> dict[str, Any]:
        params: dict[str, str | int] = {"limit": limit, **({"state": state} if state else {})}
        return dict((await self._json("GET", "/runs", params=params))[1])

    async def files(self, run_id: str) -> dict[str, Any]:
        return dict((await self._json("GET", f"/runs/{run_id}/files"))[1])

    async def copy(self, path: str, into: Sink, params: dict[str, str] | None = None) -> int:
        """The bytes served at `path` (an output stream, a file's url) into a file; how many."""
        copied = 0
        try:
            async with self.session.get(self.url + path, params=params) as reply:
                await _raise_for_error(reply)
                async for chunk in reply.content.iter_chunked(1 << 16):
                    into.write(chunk)
                    copied += len(chunk)
        except CONNECTION_ERRORS as exc:
            raise Unreachable(_reason(exc)) from None
        return copied

    async def events(self, run_id: str, last_event_id: str = "") -> AsyncGenerator[Event, None]:
        """One connection's events (docs/api.md#get-runsidevents); connection errors pass through."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        async with self.session.get(f"{self.url}/runs/{run_id}/events", headers=headers) as reply:
            await _raise_for_error(reply)
            async for event in _parse_events(reply.content):
                yield event

    async def follow(self, run_id: str, last_event_id: str = "") -> AsyncIterator[Event]:
        """The run's events until `end`, reconnecting from the last id whenever the
        stream breaks or closes early (a daemon that stops closes it without `end`)."""
        failing_since: float | None = None
        delay = 0.2
        while True:
            try:
                async with contextlib.aclosing(self.events(run_id, last_event_id)) as stream:
                    async for event in stream:
                        failing_since, delay = None, 0.2
                        last_event_id = event.id or last_event_id
                        yield event
                        if event.name == "end":
                            return
                reason = "the server closed the event stream"
            except CONNECTION_ERRORS as exc:
                reason = _reason(exc)
            now = time.monotonic()
            failing_since = failing_since if failing_since is not None else now
            if now - failing_since > RECONNECT_FOR_S:
                raise Unreachable(f"{reason}; gave up after {RECONNECT_FOR_S:.0f} s of trying again "
                                  f"(the run goes on: `unitbox logs --follow {run_id}`)")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _raise_for_error(reply: aiohttp.ClientResponse) -> None:
    if reply.status < 400:
        return
    try:
        error = (await reply.json(content_type=None))["error"]
        code, message, details = str(error["code"]), str(error["message"]), error.get("details")
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        code, message, details = "http_error", reply.reason or f"HTTP {reply.status}", None
    raise ApiError(reply.status, code, message, details if isinstance(details, list) else None,
                   reply.headers.get("Retry-After"))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    if isinstance(exc, aiohttp.ClientConnectorError):
        # asyncio's "Connect call failed (…)" hides the errno's own words
        return os.strerror(exc.os_error.errno) if exc.os_error.errno else str(exc.os_error)
    return str(exc) or type(exc).__name__


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Lines of any length up to MAX_EVENT_BYTES (aiohttp's readline caps them lower)."""
    pending = b""
    async for chunk in content.iter_any():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r")
        if len(pending) > MAX_EVENT_BYTES:
            raise aiohttp.ClientPayloadError(f"an event line over {MAX_EVENT_BYTES} bytes")
    if pending:
        yield pending


async def _parse_events(content: aiohttp.StreamReader) -> AsyncIterator[Event]:
    """The Server-Sent Events format: `field: value` lines, a blank line ends an event, `:` a comment."""
    fields: dict[str, str] = {}
    data: list[str] = []
    async for raw in _lines(content):
        line = raw.decode("utf-8", "replace")
        if not line:
            if data:
                try:
                    parsed = json.loads("\n".join(data))
                except ValueError:
                    raise Unreachable("the event stream holds data that is not unitbox's JSON") from None
                yield Event(fields.get("event", "message"), fields.get("id", ""), parsed)
            fields, data = {}, []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            else:
                fields[name] = value
