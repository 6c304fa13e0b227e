"""GET /output/<id> served from the files, streamed: exact JSON whatever the
chunking, raw bytes with Range, flags read from the files, errors."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientPayloadError, web
from aiohttp.test_utils import TestClient

from tests.api.conftest import MakeClient
from tests.support.fake_systemd import FakeSystemd
from unitbox.api import output
from unitbox.api.models import OutputOut
from unitbox.api.state import ENGINE
from unitbox.capture import stored_output, truncation_marker
from unitbox.store import RunRecord

Client = TestClient[Any, web.Application]


async def finished_run(client: Client) -> str:
    reply = await client.post("/run-json", json={"code": "x = 1", "wait": True})
    assert reply.status == 200
    run = await reply.json()
    assert run["state"] == "succeeded"
    return str(run["id"])


def stream_file(client: Client, run_id: str, stream: str = "stdout") -> Path:
    assert client.app is not None
    return client.app[ENGINE].run_dir(run_id).output(stream)


def old_json(run_id: str, state: str, stdout: bytes, stderr: bytes = b"", *, stdout_truncated: bool = False,
             stderr_truncated: bool = False) -> bytes:
    """What the handler that loaded everything answered: the model, serialised."""
    return OutputOut.model_validate({
        "id": run_id, "state": state, "stdout": stdout.decode("utf-8", "replace"),
        "stderr": stderr.decode("utf-8", "replace"), "stdout_truncated": stdout_truncated,
        "stderr_truncated": stderr_truncated}).model_dump_json().encode()


async def json_output(client: Client, run_id: str) -> bytes:
    reply = await client.get(f"/output/{run_id}")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json; charset=utf-8"
    return await reply.read()


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client(FakeSystemd(stdout=b""))


@pytest.mark.parametrize("char", ["é", "€", "😀"])
async def test_a_character_split_between_reads_stays_whole(client: Client, monkeypatch: pytest.MonkeyPatch,
                                                           char: str) -> None:
    monkeypatch.setattr(output, "READ_CHUNK", 8)
    run_id = await finished_run(client)
    for lead in range(12):  # the character's bytes at every position around the first two read boundaries
        text = "a" * lead + char + "b" * 9 + char
        stream_file(client, run_id).write_bytes(text.encode())
        body = await json_output(client, run_id)
        assert json.loads(body)["stdout"] == text
        assert body == old_json(run_id, "succeeded", text.encode())


async def test_quotes_backslashes_and_control_characters_are_escaped(client: Client,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "READ_CHUNK", 5)
    run_id = await finished_run(client)
    data = b'say "hi" \\ back\\slash ' + bytes(range(32)) + b"\x7f \xe2\x80\xa8 </script> end"
    stream_file(client, run_id, "stderr").write_bytes(data)
    body = await json_output(client, run_id)
    assert json.loads(body)["stderr"] == data.decode()
    assert body == old_json(run_id, "succeeded", b"", data)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 4096])
async def test_invalid_utf8_becomes_replacement_characters_as_in_one_decode(
        client: Client, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(output, "READ_CHUNK", chunk)
    run_id = await finished_run(client)
    noise = random.Random(chunk).randbytes(3000)
    data = b"ok \xff\xfe \xe2\x82x \xf0\x9f\x98 \xed\xa0\x80 " + noise + b" cut \xe2\x82"  # ends mid-character
    stream_file(client, run_id).write_bytes(data)
    body = await json_output(client, run_id)
    assert json.loads(body)["stdout"] == data.decode("utf-8", "replace")
    assert json.loads(body)["stdout"].startswith("ok \ufffd\ufffd \ufffdx \ufffd \ufffd\ufffd\ufffd ")
    assert body == old_json(run_id, "succeeded", data)


async def test_a_large_output_is_streamed_whole(client: Client) -> None:
    run_id = await finished_run(client)
    line = "line with ünïcödé, \"quotes\", a tab\t and 😀\n".encode()
    data = line * (5_000_000 // len(line))
    stream_file(client, run_id).write_bytes(data)
    stream_file(client, run_id, "stderr").write_bytes(data[:700_001])
    reply = await client.get(f"/output/{run_id}")
    assert reply.headers["Transfer-Encoding"] == "chunked"
    body = await reply.read()
    parsed = json.loads(body)
    assert parsed["stdout"] == data.decode() and parsed["stderr"] == data[:700_001].decode("utf-8", "replace")
    assert body == old_json(run_id, "succeeded", data, data[:700_001])
    raw = await client.get(f"/output/{run_id}?stream=stdout")
    assert await raw.read() == data


async def test_raw_stream_is_the_exact_bytes_with_headers(make_client: MakeClient) -> None:
    data = bytes(range(256)) * 40
    client = await make_client(FakeSystemd(stdout=data))
    run_id = await finished_run(client)
    reply = await client.get(f"/output/{run_id}?stream=stdout")
    assert reply.status == 200
    assert await reply.read() == data
    assert reply.headers["Content-Type"] == "application/octet-stream"
    assert reply.headers["Content-Length"] == str(len(data))
    assert reply.headers["X-Unitbox-Truncated"] == "false"
    assert reply.headers["X-Unitbox-State"] == "succeeded"
    stderr = await client.get(f"/output/{run_id}?stream=stderr")
    assert stderr.status == 200 and await stderr.read() == b""
    assert stderr.headers["Content-Type"] == "application/octet-stream"


@pytest.mark.parametrize(("spec", "first", "last"), [("bytes=100-199", 100, 199), ("bytes=10000-", 10000, 10239),
                                                     ("bytes=-40", 10200, 10239)])
async def test_a_range_request_gets_its_slice(make_client: MakeClient, spec: str, first: int, last: int) -> None:
    data = bytes(range(256)) * 40
    client = await make_client(FakeSystemd(stdout=data))
    run_id = await finished_run(client)
    reply = await client.get(f"/output/{run_id}?stream=stdout", headers={"Range": spec})
    assert reply.status == 206
    assert await reply.read() == data[first:last + 1]
    assert reply.headers["Content-Range"] == f"bytes {first}-{last}/{len(data)}"
    assert reply.headers["X-Unitbox-State"] == "succeeded"


async def test_empty_output_and_a_run_with_no_output_file_yet(make_client: MakeClient) -> None:
    client = await make_client(FakeSystemd(auto_finish=False, stdout=b""), max_concurrent=1)
    running = (await (await client.post("/run-json", json={"code": "x = 1"})).json())["id"]
    queued = (await (await client.post("/run-json", json={"code": "x = 2"})).json())["id"]
    assert not stream_file(client, queued).exists()
    for run_id, state in ((running, "running"), (queued, "queued")):
        body = json.loads(await json_output(client, run_id))
        assert body["stdout"] == body["stderr"] == "" and body["state"] in (state, "starting")
        raw = await client.get(f"/output/{run_id}?stream=stdout")
        assert raw.status == 200 and await raw.read() == b""
        assert raw.headers["X-Unitbox-Truncated"] == "false"


async def test_a_live_run_is_served_as_far_as_written_when_the_response_began(
        make_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    client = await make_client(FakeSystemd(auto_finish=False))
    run_id = (await (await client.post("/run-json", json={"code": "x = 1"})).json())["id"]
    with stream_file(client, run_id).open("ab") as out:
        out.write(b"so far")

    def measured_then_grown(path: Path) -> tuple[int, bool]:
        measured = stored_output(path)
        with path.open("ab") as late:
            late.write(b" and later")
        return measured

    monkeypatch.setattr(output, "READ_CHUNK", 2)
    monkeypatch.setattr(output, "stored_output", measured_then_grown)
    body = json.loads(await json_output(client, run_id))
    assert body["stdout"] == "so far" and body["state"] in ("starting", "running")
    assert stream_file(client, run_id).read_bytes() == b"so far and later"


async def test_truncated_is_read_from_the_marker_file(client: Client) -> None:
    run_id = await finished_run(client)
    stream_file(client, run_id).write_bytes(b"kept")
    truncation_marker(stream_file(client, run_id)).touch()
    body = json.loads(await json_output(client, run_id))
    assert (body["stdout_truncated"], body["stderr_truncated"]) == (True, False)
    stdout = await client.get(f"/output/{run_id}?stream=stdout")
    assert stdout.headers["X-Unitbox-Truncated"] == "true" and await stdout.read() == b"kept"
    stderr = await client.get(f"/output/{run_id}?stream=stderr")
    assert stderr.headers["X-Unitbox-Truncated"] == "false"


async def test_truncated_in_the_record_holds_without_the_marker(make_client: MakeClient) -> None:
    client = await make_client(FakeSystemd(stdout=b"x" * 3000))
    reply = await client.post("/run-json", json={"code": "x = 1", "wait": True, "limits": {"output_kb": 1}})
    run = await reply.json()
    assert run["stdout_truncated"] is True
    truncation_marker(stream_file(client, run["id"])).unlink()
    body = json.loads(await json_output(client, run["id"]))
    assert body["stdout_truncated"] is True and body["stdout"] == "x" * 1024
    raw = await client.get(f"/output/{run['id']}?stream=stdout")
    assert raw.headers["X-Unitbox-Truncated"] == "true"


async def test_a_bad_stream_is_422_naming_the_field(client: Client) -> None:
    run_id = await finished_run(client)
    reply = await client.get(f"/output/{run_id}?stream=both")
    assert reply.status == 422
    error = (await reply.json())["error"]
    assert error["code"] == "invalid_input" and error["details"] == [
        {"field": "stream", "message": "must be stdout or stderr"}]


@pytest.mark.parametrize("query", ["", "?stream=stdout", "?stream=both"])
async def test_an_unknown_run_is_404(client: Client, query: str) -> None:
    reply = await client.get(f"/output/nope{query}")
    assert reply.status == 404
    assert (await reply.json())["error"]["code"] == "not_found"


async def test_a_client_leaving_midway_logs_no_error(client: Client, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    assert client.server.runner is not None and client.server.runner.server is not None
    client.server.runner.server.handler_cancellation = False  # as the daemon serves (the test server cancels)
    run_id = await finished_run(client)
    stream_file(client, run_id).write_bytes(b"x" * 1_000_000)
    left = threading.Event()
    whole_body = output.json_body

    def held_after_the_head(record: RunRecord, *streams: output.StoredStream) -> Iterator[bytes]:
        pieces = whole_body(record, *streams)
        yield next(pieces)
        left.wait(10)  # in a worker thread, while the client goes away
        yield from pieces

    monkeypatch.setattr(output, "READ_CHUNK", 1000)
    monkeypatch.setattr(output, "json_body", held_after_the_head)
    caplog.set_level(logging.DEBUG, logger=output.__name__)
    reply = await client.get(f"/output/{run_id}")
    assert (await reply.content.readexactly(6)) == b'{"id":'
    reply.close()
    await asyncio.sleep(0.1)
    left.set()
    for _ in range(100):
        if any("the client left" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"the handler did not notice the client leaving: {caplog.records}")
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_failure_midway_cuts_the_body_off(client: Client, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    run_id = await finished_run(client)

    def failing(record: RunRecord, *streams: output.StoredStream) -> Iterator[bytes]:
        yield b'{"id":'
        raise OSError("disk gone")

    monkeypatch.setattr(output, "json_body", failing)
    reply = await client.get(f"/output/{run_id}")
    assert reply.status == 200
    with pytest.raises(ClientPayloadError):  # not a body that ends as if it were whole
        await reply.read()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        f"run {run_id}: sending its output failed midway"]
