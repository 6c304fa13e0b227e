"""Hostile HTTP at the API tier: out-of-range query values, stalled bodies,
and resource exhaustion (EMFILE, ENOMEM, ENOSPC…) on the request path:
always a clean 4xx or 503 + Retry-After, never a 500, never a stuck run."""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.api.conftest import MakeClient
from unitbox.api.state import ENGINE
from unitbox.rundir import RunDir

Client = TestClient[Any, web.Application]


@pytest.mark.parametrize("cursor", ["99999999999999999999", "9223372036854775808", "1" * 5000, "-1", "0",
                                    "1e3", " 7", "٣", "0x10"])
async def test_a_malformed_or_out_of_range_cursor_is_422_naming_cursor(client: Client, cursor: str) -> None:
    reply = await client.get("/runs", params={"cursor": cursor})
    assert reply.status == 422, await reply.text()
    body = await reply.json()
    assert body["error"]["details"] == [{"field": "cursor", "message": body["error"]["details"][0]["message"]}]
    assert "cursor" in body["error"]["message"]


async def test_the_largest_cursor_sqlite_holds_is_accepted(client: Client) -> None:
    reply = await client.get("/runs", params={"cursor": str(2**63 - 1)})
    assert reply.status == 200
    assert (await reply.json())["runs"] == []


@pytest.mark.parametrize("limit", ["1001", "-5", "abc", "99999999999999999999999"])
async def test_a_bad_limit_is_422_naming_limit(client: Client, limit: str) -> None:
    reply = await client.get("/runs", params={"limit": limit})
    assert reply.status == 422
    assert (await reply.json())["error"]["details"][0]["field"] == "limit"


@pytest.mark.parametrize(("path", "content_type"), [("/run-json", "application/json"),
                                                    ("/run-file", "multipart/form-data; boundary=xyz")])
async def test_a_stalled_request_body_is_cut_with_408(make_client: MakeClient, path: str, content_type: str) -> None:
    client = await make_client(body_timeout_s=0.5)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                 "Content-Length: 1000\r\n\r\n--xyz\r\n{\"code\"".encode())
    await writer.drain()
    began = asyncio.get_running_loop().time()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert 0.4 < asyncio.get_running_loop().time() - began < 5
    writer.close()
    assert client.app[ENGINE].queue_depth == 0


def _raise(code: int) -> Any:
    def fail(*_: Any, **__: Any) -> Any:
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC])
async def test_running_out_of_resources_while_submitting_is_503_and_leaves_no_run(
        client: Client, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    # Runtime discovery (a directory scan) is the first I/O of a submission.
    monkeypatch.setattr("unitbox.runtimes.discover", _raise(code))
    reply = await client.post("/run-json", json={"code": "print(1)"})
    assert reply.status == 503, await reply.text()
    assert reply.headers["Retry-After"].isdigit()
    assert os.strerror(code) in (await reply.json())["error"]["message"]
    assert (await client.get("/runtimes")).status == 503
    monkeypatch.undo()
    # Writing the run's files (the next step) fails the same way, and nothing is left behind.
    monkeypatch.setattr(RunDir, "create", _raise(code))
    reply = await client.post("/run-json", json={"code": "print(1)", "wait": True})
    assert reply.status == 503
    engine = client.app[ENGINE]
    assert (engine.queue_depth, engine.executing) == (0, 0)
    assert (await (await client.get("/runs")).json())["runs"] == []
    assert list(engine.config.runs_dir.iterdir()) == []


async def test_memory_exhaustion_in_a_handler_is_503(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*_: Any) -> Any:
        raise MemoryError
    monkeypatch.setattr("unitbox.api.handlers.RunOut.of", no_memory)
    submitted = await (await client.post("/run-json", json={"code": "print(1)"})).json()
    reply = await client.get(f"/status/{submitted['id']}")
    assert reply.status == 503
    assert reply.headers["Retry-After"].isdigit()
