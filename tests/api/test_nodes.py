"""Two nodes sharing one PostgreSQL store (a real throw-away server; systemd
faked), each a real HTTP server: any node answers for any run. Status,
listings and waits come from the store; output, events, files, code and
cancel are relayed to the node the run is on."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.api.conftest import MakeNode
from tests.support.fake_systemd import FakeSystemd, until
from unitbox.api.state import ENGINE
from unitbox.profile import unit_name

Client = TestClient[Any, web.Application]


async def test_any_node_answers_for_a_run_of_another(make_node: MakeNode) -> None:
    a, b = await make_node("a"), await make_node("b")
    run = await (await a.post("/run-json?wait=true", json={"code": "print(1)"})).json()
    assert run["state"] == "succeeded"
    seen_from_b = await (await b.get(f"/status/{run['id']}")).json()
    assert {k: seen_from_b[k] for k in ("id", "state", "exit_code")} == {k: run[k] for k in ("id", "state", "exit_code")}
    assert [r["id"] for r in (await (await b.get("/runs")).json())["runs"]] == [run["id"]]
    for path in (f"/output/{run['id']}", f"/output/{run['id']}?stream=stdout", f"/runs/{run['id']}/code",
                 f"/runs/{run['id']}/files", f"/runs/{run['id']}/events"):
        here, there = await a.get(path), await b.get(path)
        assert (there.status, await there.read()) == (here.status, await here.read()), path
    assert (await b.get(f"/output/{run['id']}")).headers.get("Content-Type") == "application/json; charset=utf-8"
    cancelled = await b.post(f"/runs/{run['id']}/cancel")
    assert cancelled.status == 200  # already over: unchanged, as its own node answers
    assert (await b.get("/output/0123456789abcdef")).status == 404


async def test_a_live_run_s_events_stream_through_another_node_as_they_come(make_node: MakeNode) -> None:
    fake = FakeSystemd(auto_finish=False)
    a, b = await make_node("a", fake), await make_node("b")
    run = await (await a.post("/run-json", json={"code": "print(1)"})).json()
    await until(lambda: fake._live(unit_name(run["id"])))
    stream = await b.get(f"/runs/{run['id']}/events")
    assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
    first = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 5)  # while the run goes on
    assert first.startswith(b"event: state\nid: 0.0\n")
    fake.finish(unit_name(run["id"]))
    rest = await asyncio.wait_for(stream.content.read(), 10)
    assert b"event: end" in rest and b'"succeeded"' in rest


async def test_a_cancel_sent_to_another_node_reaches_the_run(make_node: MakeNode) -> None:
    fake = FakeSystemd(auto_finish=False)
    a, b = await make_node("a", fake), await make_node("b")
    run = await (await a.post("/run-json", json={"code": "import time; time.sleep(60)"})).json()
    await until(lambda: fake._live(unit_name(run["id"])))
    cancelled = await b.post(f"/runs/{run['id']}/cancel")
    assert cancelled.status == 202

    async def ended() -> bool:
        return bool((await (await b.get(f"/status/{run['id']}")).json())["state"] == "cancelled")
    for _ in range(100):
        if await ended():
            break
        await asyncio.sleep(0.05)
    assert await ended()


async def test_the_nodes_are_listed_with_their_load_for_admins_only(make_node: MakeNode) -> None:
    tokens = {"tokens": {"root": {"secret": "r" * 32, "admin": True}, "alice": {"secret": "a" * 32},
                         "bob": {"secret": "b" * 32}}}
    a, b = await make_node("a", **tokens), await make_node("b", **tokens)
    admin, user = {"Authorization": "Bearer " + "r" * 32}, {"Authorization": "Bearer " + "a" * 32}
    listed = await (await b.get("/nodes", headers=admin)).json()
    assert [(n["name"], n["alive"], n["this"]) for n in listed["nodes"]] == [("a", True, False), ("b", True, True)]
    assert {n["url"] for n in listed["nodes"]} == {str(a.make_url("")).rstrip("/"), str(b.make_url("")).rstrip("/")}
    assert all(n["capacity"] >= 1 and n["running"] == 0 for n in listed["nodes"])
    assert (await b.get("/nodes", headers=user)).status == 403
    assert (await (await a.get("/healthz")).json())["node"] == "a"
    # A run is another owner's on every node: 404 from the node it is not on, as from its own.
    mine = await (await a.post("/run-json?wait=true", json={"code": "print(1)"}, headers=user)).json()
    assert (await b.get(f"/output/{mine['id']}", headers=user)).status == 200
    bob = {"Authorization": "Bearer " + "b" * 32}
    for path in (f"/output/{mine['id']}", f"/runs/{mine['id']}/code", f"/status/{mine['id']}"):
        here, there = await a.get(path, headers=bob), await b.get(path, headers=bob)
        assert (here.status, await here.read()) == (there.status, await there.read()), path
        assert there.status == 404
    assert (await b.post(f"/runs/{mine['id']}/cancel", headers=bob)).status == 404
    assert (await b.get(f"/output/{mine['id']}", headers={"Authorization": "Bearer " + "x" * 32})).status == 401


async def test_a_node_that_cannot_be_reached_is_named_and_the_store_still_answers(make_node: MakeNode) -> None:
    a, b = await make_node("a"), await make_node("b")
    run = await (await a.post("/run-json?wait=true", json={"code": "print(1)"})).json()
    await a.server.close()  # node a is gone; its record stays in the store
    status = await b.get(f"/status/{run['id']}")
    assert status.status == 200 and (await status.json())["state"] == "succeeded"
    output = await b.get(f"/output/{run['id']}")
    assert output.status == 503
    message = json.loads(await output.read())["error"]["message"]
    assert f"run {run['id']} is on node 'a'" in message and "cannot be reached" in message


async def test_a_node_silent_for_its_grace_is_lost_and_its_runs_end_as_error(make_node: MakeNode) -> None:
    fake = FakeSystemd(auto_finish=False)
    a, b = await make_node("a", fake, node_grace_s=5), await make_node("b", node_grace_s=5)
    run = await (await a.post("/run-json", json={"code": "import time; time.sleep(60)"})).json()
    await until(lambda: fake._live(unit_name(run["id"])))
    silent = a.server.app[ENGINE].cluster

    async def no_heartbeat() -> None:
        pass
    silent.beat = no_heartbeat  # type: ignore[method-assign]  # a stops beating (as if cut off), its run goes on

    async def state_from_b() -> str:
        return str((await (await b.get(f"/status/{run['id']}")).json())["state"])
    for _ in range(200):
        if await state_from_b() == "error":
            break
        await asyncio.sleep(0.1)
    lost = await (await b.get(f"/status/{run['id']}")).json()
    assert lost["state"] == "error" and lost["error"] == "node lost: a sent no heartbeat for 5 s", lost
    nodes = {n["name"]: n for n in (await (await b.get("/nodes")).json())["nodes"]}
    assert nodes["a"]["alive"] is False and nodes["b"]["alive"] is True
    # a's run ends after all: what a writes does not change the settled end, on any node.
    fake.finish(unit_name(run["id"]))
    await until(lambda: run["id"] not in a.server.app[ENGINE].runner.runs)  # type: ignore[attr-defined]
    for node in (a, b):
        assert (await (await node.get(f"/status/{run['id']}")).json())["state"] == "error"


async def test_a_daemon_with_a_store_of_its_own_is_the_one_node(client: Client) -> None:
    listed = await (await client.get("/nodes")).json()
    assert [(n["name"], n["alive"], n["this"]) for n in listed["nodes"]] == [(socket.gethostname(), True, True)]
    assert listed["nodes"][0]["url"] == "http://127.0.0.1:8080"  # from `listen`, the default
    assert (await (await client.get("/healthz")).json())["node"] == socket.gethostname()
