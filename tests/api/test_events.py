"""GET /runs/<id>/events: state changes, output as written, the end; an ended
run replayed; resuming by Last-Event-ID exactly; characters never split;
bad ids, other tokens' runs, heartbeats and shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from tests.api.conftest import MakeClient
from tests.support.fake_systemd import FakeSystemd, until
from unitbox import follow
from unitbox.api import events
from unitbox.api.state import ENGINE
from unitbox.profile import unit_name

Client = TestClient[Any, web.Application]
TOKENS = {"alice": {"secret": "alice-secret"}, "bob": {"secret": "bob-secret"}}
MIXED = "aé€😀\n" * 7 + "end"  # 1-, 2-, 3- and 4-byte characters


@dataclass
class Event:
    name: str
    id: str
    data: Any


class Events:
    """An SSE reader: the events (and comments) of one response, as they come."""

    def __init__(self, reply: ClientResponse) -> None:
        assert reply.status == 200, reply.status
        assert reply.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        self.reply = reply
        self.comments: list[str] = []

    async def next(self, within_s: float = 5.0) -> Event | None:
        """The next event; None at the end of the response."""
        fields: dict[str, str] = {}
        while True:
            line = (await asyncio.wait_for(self.reply.content.readline(), within_s)).decode()
            if not line:
                assert not fields, f"the response ended inside an event: {fields}"
                return None
            line = line.rstrip("\n")
            if line.startswith(":"):
                self.comments.append(line)
            elif line:
                name, _, value = line.partition(": ")
                assert name not in fields, f"{name} twice in one event"
                fields[name] = value
            elif fields:
                return Event(fields["event"], fields["id"], json.loads(fields["data"]))

    async def rest(self) -> list[Event]:
        found = []
        while (event := await self.next()) is not None:
            found.append(event)
        return found


def text_of(found: list[Event], stream: str = "stdout") -> str:
    return "".join(e.data["text"] for e in found if e.name == stream)


async def open_events(client: Client, run_id: str, **headers: str) -> Events:
    return Events(await client.get(f"/runs/{run_id}/events", headers=headers))


async def ended_run(client: Client) -> str:
    reply = await client.post("/run-json", json={"code": "x", "wait": True})
    assert reply.status == 200
    return str((await reply.json())["id"])


async def test_a_live_run_gives_its_states_and_output_in_order_then_end(make_client: MakeClient) -> None:
    fake = FakeSystemd(auto_finish=False, stdout=b"")
    client = await make_client(fake, max_concurrent=1)
    first = (await (await client.post("/run-json", json={"code": "x"})).json())["id"]  # holds the only slot
    run_id = (await (await client.post("/run-json", json={"code": "x"})).json())["id"]
    stream = await open_events(client, run_id)
    assert [(e.name, e.data["state"], e.id) for e in [await stream.next()]] == [("state", "queued", "0.0")]
    await until(lambda: unit_name(first) in fake.units)
    fake.finish(unit_name(first))
    assert (event := await stream.next()) and (event.name, event.data["state"]) == ("state", "starting")
    await until(lambda: unit_name(run_id) in fake.units)
    unit = fake.units[unit_name(run_id)]
    fake.activate(unit_name(run_id))
    assert (event := await stream.next()) and (event.name, event.data["state"]) == ("state", "running")
    assert event.data["started_at"] is not None
    os.write(unit.fds["output"], b"hello\n")
    assert (event := await stream.next()) and (event.name, event.data, event.id) == (
        "stdout", {"text": "hello\n"}, "6.0")
    os.write(unit.fds["error"], b"oops\n")
    assert (event := await stream.next()) and (event.name, event.data, event.id) == (
        "stderr", {"text": "oops\n"}, "6.5")
    os.write(unit.fds["output"], b"bye\n")
    fake.finish(unit_name(run_id))
    rest = await stream.rest()
    assert [(e.name, e.data.get("state")) for e in rest] == [("stdout", None), ("state", "succeeded"),
                                                              ("end", "succeeded")]
    assert rest[0].data == {"text": "bye\n"} and [e.id for e in rest] == ["10.5"] * 3
    assert rest[-1].data == await (await client.get(f"/status/{run_id}")).json()


async def test_an_ended_run_is_replayed_and_the_stream_closes(make_client: MakeClient) -> None:
    client = await make_client(FakeSystemd(stdout=b"line 1\nline 2\n"))
    run_id = await ended_run(client)
    found = await (await open_events(client, run_id)).rest()
    assert [e.name for e in found] == ["state", "stdout", "end"]
    status = await (await client.get(f"/status/{run_id}")).json()
    assert found[0].data == found[2].data == status
    assert found[1].data == {"text": "line 1\nline 2\n"}
    assert [e.id for e in found] == ["0.0", "14.0", "14.0"]


@pytest.mark.parametrize("chunk", [4, 5, 6, 7, 9])
async def test_resuming_from_every_id_gives_exactly_the_rest(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch,
                                                             chunk: int) -> None:
    monkeypatch.setattr(follow, "READ_CHUNK", chunk)  # many events, characters cut by every read boundary
    client = await make_client(FakeSystemd(stdout=MIXED.encode()))
    run_id = await ended_run(client)
    assert client.app is not None
    client.app[ENGINE].run_dir(run_id).output("stderr").write_bytes(("ß!" * 3).encode())
    whole = await (await open_events(client, run_id)).rest()
    assert text_of(whole) == MIXED and text_of(whole, "stderr") == "ß!" * 3
    assert all("\ufffd" not in e.data["text"] for e in whole if e.name in ("stdout", "stderr"))
    for index, event in enumerate(whole):
        by_header = await (await open_events(client, run_id, **{"Last-Event-ID": event.id})).rest()
        by_query = await Events(await client.get(f"/runs/{run_id}/events?last_event_id={event.id}")).rest()
        rest = [(e.name, e.data) for e in whole[index + 1:] if e.name in ("stdout", "stderr")]
        for resumed in (by_header, by_query):
            assert resumed[0].name == "state" and resumed[0].id == event.id
            assert [(e.name, e.data) for e in resumed[1:]] == [*rest, ("end", whole[-1].data)]


async def test_the_header_wins_over_the_query_as_eventsource_reconnects(make_client: MakeClient) -> None:
    client = await make_client(FakeSystemd(stdout=b"0123456789"))
    run_id = await ended_run(client)
    reply = await client.get(f"/runs/{run_id}/events?last_event_id=2.0", headers={"Last-Event-ID": "7.0"})
    assert text_of(await Events(reply).rest()) == "789"


async def test_a_character_split_between_writes_comes_whole(make_client: MakeClient) -> None:
    fake = FakeSystemd(auto_finish=False, stdout=b"")
    client = await make_client(fake)
    run_id = (await (await client.post("/run-json", json={"code": "x"})).json())["id"]
    await until(lambda: unit_name(run_id) in fake.units)
    fake.activate(unit_name(run_id))
    stream = await open_events(client, run_id)
    assert (await stream.next()) is not None  # state
    fd = fake.units[unit_name(run_id)].fds["output"]
    for char in ("é", "€", "😀"):
        raw = char.encode()
        for cut in range(1, len(raw)):
            os.write(fd, b"x" + raw[:cut])  # the follower wakes with part of the character written
            assert (event := await stream.next()) and event.data == {"text": "x"}
            os.write(fd, raw[cut:])
            assert (event := await stream.next()) and event.data == {"text": char}
    os.write(fd, b"\xe2\x82")  # an incomplete character the run never finishes: U+FFFD at the end
    fake.finish(unit_name(run_id))
    rest = await stream.rest()
    assert rest[0].data == {"text": "\ufffd"} and rest[-1].name == "end"


@pytest.mark.parametrize("raw", ["abc", "1", "1.2.3", "-1.0", "1.-2", "1. 2", "0x1.0", "1" * 20 + ".0"])
async def test_a_malformed_last_event_id_is_a_422_naming_it(client: Client, raw: str) -> None:
    run_id = await ended_run(client)
    reply = await client.get(f"/runs/{run_id}/events", headers={"Last-Event-ID": raw})
    assert reply.status == 422
    body = await reply.json()
    assert body["error"]["details"][0]["field"] == "Last-Event-ID" and "Last-Event-ID" in body["error"]["message"]
    reply = await client.get(f"/runs/{run_id}/events", params={"last_event_id": raw})
    assert reply.status == 422
    assert (await reply.json())["error"]["details"][0]["field"] == "last_event_id"


async def test_an_id_past_the_output_is_a_422(client: Client) -> None:
    run_id = await ended_run(client)  # "fake output\n": 12 bytes of stdout, none of stderr
    assert (await client.get(f"/runs/{run_id}/events", headers={"Last-Event-ID": "12.0"})).status == 200
    for raw in ("13.0", "0.1"):
        reply = await client.get(f"/runs/{run_id}/events", headers={"Last-Event-ID": raw})
        assert reply.status == 422 and "past the end" in (await reply.json())["error"]["message"]


@pytest.mark.parametrize("finished", [False, True], ids=["running", "finished"])
async def test_another_tokens_run_is_404_like_an_unknown_id(make_client: MakeClient, finished: bool) -> None:
    fake = FakeSystemd(auto_finish=finished)
    client = await make_client(fake, tokens=TOKENS)
    reply = await client.post("/run-json", json={"code": "x", "wait": finished},
                              headers={"Authorization": "Bearer alice-secret"})
    run_id = (await reply.json())["id"]
    bob = {"Authorization": "Bearer bob-secret"}
    theirs = await client.get(f"/runs/{run_id}/events", headers=bob)
    unknown = await client.get("/runs/0123456789abcdef/events", headers=bob)
    assert (theirs.status, unknown.status) == (404, 404)
    assert (await theirs.text()).replace(run_id, "ID") == (await unknown.text()).replace("0123456789abcdef", "ID")
    mine = await open_events(client, run_id, Authorization="Bearer alice-secret")
    assert (event := await mine.next()) and event.data["owner"] == "alice"


async def test_a_quiet_run_gets_heartbeats(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "HEARTBEAT_S", 0.05)
    fake = FakeSystemd(auto_finish=False)
    client = await make_client(fake)
    run_id = (await (await client.post("/run-json", json={"code": "x"})).json())["id"]
    stream = await open_events(client, run_id)
    assert (await stream.next()) is not None
    await asyncio.sleep(0.3)
    fake.finish(unit_name(run_id))
    assert [e.name for e in await stream.rest()][-1] == "end"
    assert len(stream.comments) >= 3 and set(stream.comments) == {": keepalive"}


async def test_a_shutdown_ends_every_stream_at_once(make_client: MakeClient) -> None:
    fake = FakeSystemd(auto_finish=False)
    client = await make_client(fake)
    run_ids = [(await (await client.post("/run-json", json={"code": "x"})).json())["id"] for _ in range(3)]
    streams = [await open_events(client, run_id) for run_id in run_ids for _ in range(2)]
    for stream in streams:
        assert (await stream.next()) is not None
    assert client.app is not None
    client.app[ENGINE].begin_shutdown()
    for stream in streams:
        assert [e.name for e in await asyncio.wait_for(stream.rest(), 1.0)] == []  # closed, and no `end`


async def test_a_follower_that_stops_reading_holds_a_bounded_buffer_then_is_dropped(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "WRITE_STALL_S", 0.5)
    written = [0]
    write = events.EventWriter._write

    async def counted(self: events.EventWriter, data: bytes) -> None:
        written[0] += len(data)
        await write(self, data)
    monkeypatch.setattr(events.EventWriter, "_write", counted)
    run_id = await ended_run(client)
    assert client.app is not None
    engine = client.app[ENGINE]
    engine.run_dir(run_id).output("stdout").write_bytes(b"x" * (32 << 20))  # far more than socket buffers hold
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (client.host, client.port))
    try:
        await asyncio.get_running_loop().sock_sendall(sock, f"GET /runs/{run_id}/events HTTP/1.1\r\n"
                                                            f"Host: x\r\n\r\n".encode())
        await until(lambda: engine._followers._feeds, 5)  # following, and writing into a full socket
        await until(lambda: not engine._followers._feeds, 10)  # no bytes taken for WRITE_STALL_S: dropped
        assert written[0] < 8 << 20  # it stopped reading the output when the client stopped taking it
    finally:
        sock.close()


async def test_a_final_state_is_never_shown_without_the_result_it_carries(make_client: MakeClient) -> None:
    """The final record is published once its leftovers (result, lint, files) are in it."""
    fake = FakeSystemd(auto_finish=False, stdout=b"")
    fake.leftovers = {"return.json": b"[1, 2]"}
    client = await make_client(fake)
    run_id = (await (await client.post("/run-json", json={"code": "x", "entrypoint": "main"})).json())["id"]
    stream = await open_events(client, run_id)
    await until(lambda: unit_name(run_id) in fake.units)
    fake.finish(unit_name(run_id))
    found = [await stream.next(), *await stream.rest()]
    final = [e for e in found if e and e.name in ("state", "end") and e.data["state"] == "succeeded"]
    assert [e.name for e in final] == ["state", "end"]
    assert [e.data["result_bytes"] for e in final] == [6, 6] and final[-1].data["result"] == [1, 2]
