"""The shared queue of nodes on one PostgreSQL store (claims.py; a real
throw-away server, systemd faked): a node whose slots are all taken queues
what it accepts for any node; the first node with a free slot claims it,
oldest first; any node answers for it meanwhile and after."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.api.conftest import MakeNode
from tests.support.fake_systemd import FakeSystemd, until
from unitbox.profile import unit_name
from unitbox.rundir import RunDir

BUSY = {"max_concurrent": 1}


async def status(node: Any, run_id: str) -> dict[str, Any]:
    result: dict[str, Any] = await (await node.get(f"/status/{run_id}")).json()
    return result


async def eventually(node: Any, run_id: str, check: Any, within_s: float = 10) -> dict[str, Any]:
    for _ in range(int(within_s / 0.05)):
        run = await status(node, run_id)
        if check(run):
            return run
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} never got there: {await status(node, run_id)}")


async def test_a_busy_node_s_run_is_claimed_and_run_by_a_free_one(make_node: MakeNode) -> None:
    held = FakeSystemd(auto_finish=False)
    a, _ = await make_node("a", held, **BUSY), await make_node("b")
    first = await (await a.post("/run-json", json={"code": "print(1)"})).json()
    await until(lambda: held._live(unit_name(first["id"])))
    second = await (await a.post("/run-json", json={"code": "print(2)"})).json()  # a is full: the shared queue
    ran = await eventually(a, second["id"], lambda r: r["state"] == "succeeded")
    assert ran["node"] == "b" and (await status(a, first["id"]))["node"] == "a"
    output = await (await a.get(f"/output/{second['id']}")).json()  # relayed from b
    assert output["stdout"] == "fake output\n"
    assert (await a.get(f"/runs/{second['id']}/code")).status == 200


async def test_a_waiting_client_gets_the_run_that_another_node_ran_with_its_output(make_node: MakeNode) -> None:
    held = FakeSystemd(auto_finish=False)
    a, _ = await make_node("a", held, **BUSY), await make_node("b")
    first = await (await a.post("/run-json", json={"code": "print(1)"})).json()
    await until(lambda: held._live(unit_name(first["id"])))
    answer = await a.post("/run-json?wait=true", json={"code": "print(2)"})
    run = await answer.json()
    assert answer.status == 200 and run["state"] == "succeeded" and run["node"] == "b"
    assert run["stdout"] == "fake output\n"


async def test_the_oldest_queued_run_is_claimed_first_and_an_unclaimed_one_cancels(make_node: MakeNode) -> None:
    held_a, held_b = FakeSystemd(auto_finish=False), FakeSystemd(auto_finish=False)
    a, b = await make_node("a", held_a, **BUSY), await make_node("b", held_b, **BUSY)
    busy = [await (await node.post("/run-json", json={"code": "pass"})).json() for node in (a, b)]
    await until(lambda: held_a._live(unit_name(busy[0]["id"])) and held_b._live(unit_name(busy[1]["id"])))
    queued = [await (await a.post("/run-json", json={"code": f"print({n})"})).json() for n in range(3)]
    assert [(await status(b, q["id"]))["node"] for q in queued] == [None] * 3
    code = await b.get(f"/runs/{queued[2]['id']}/code")  # no node has it: from the store
    assert code.status == 200 and await code.read() == b"print(2)"
    cancelled = await b.post(f"/runs/{queued[1]['id']}/cancel")  # no node has it: cancelled where asked
    assert cancelled.status == 202 and (await cancelled.json())["state"] == "cancelled"
    held_b.finish(unit_name(busy[1]["id"]))  # b has a free slot: it takes the oldest
    taken = await eventually(a, queued[0]["id"], lambda r: r["node"] is not None)
    assert taken["node"] == "b"
    assert (await status(a, queued[2]["id"]))["node"] is None  # b has one slot: the next waits
    assert (await status(a, queued[1]["id"]))["state"] == "cancelled"


async def test_a_stream_of_a_queued_run_waits_for_its_node_and_follows_it_there(make_node: MakeNode) -> None:
    held_a, held_b = FakeSystemd(auto_finish=False), FakeSystemd(auto_finish=False)
    a, b = await make_node("a", held_a, **BUSY), await make_node("b", held_b, **BUSY)
    busy = [await (await node.post("/run-json", json={"code": "pass"})).json() for node in (a, b)]
    await until(lambda: held_a._live(unit_name(busy[0]["id"])) and held_b._live(unit_name(busy[1]["id"])))
    queued = await (await b.post("/run-json", json={"code": "print(1)"})).json()
    stream = asyncio.ensure_future(a.get(f"/runs/{queued['id']}/events"))
    await asyncio.sleep(0.5)
    assert not stream.done()  # no node has it yet: the stream waits
    held_b.finish(unit_name(busy[1]["id"]))
    await until(lambda: held_b._live(unit_name(queued["id"])))  # b took it
    held_b.finish(unit_name(queued["id"]))
    body = await asyncio.wait_for((await asyncio.wait_for(stream, 10)).read(), 10)
    assert b"event: end" in body and b'"node":"b"' in body and b'"succeeded"' in body


async def test_a_waiting_client_gets_its_run_when_its_own_node_claims_it_later(make_node: MakeNode) -> None:
    held_a, held_b = FakeSystemd(auto_finish=False), FakeSystemd(auto_finish=False)
    a, b = await make_node("a", held_a, **BUSY), await make_node("b", held_b, **BUSY)
    busy = [await (await node.post("/run-json", json={"code": "pass"})).json() for node in (a, b)]
    await until(lambda: held_a._live(unit_name(busy[0]["id"])) and held_b._live(unit_name(busy[1]["id"])))
    waiting = asyncio.ensure_future(a.post("/run-json?wait=true", json={"code": "print(2)"}))
    await asyncio.sleep(0.3)
    held_a.auto_finish = True
    held_a.finish(unit_name(busy[0]["id"]))  # a's slot frees: a takes its own queued run
    answer = await asyncio.wait_for(waiting, 10)
    run = await answer.json()
    assert answer.status == 200 and run["state"] == "succeeded" and run["node"] == "a", run
    assert run["stdout"] == "fake output\n"


async def test_a_cancel_that_arrives_while_the_claiming_node_stages_the_run_still_cancels_it(
        make_node: MakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the claim (in the store) and the run being in the claiming node's runner, its
    inputs are written to disk: a cancel then must wait for them, not answer "already over"."""
    held_a, held_b = FakeSystemd(auto_finish=False), FakeSystemd(auto_finish=False)
    a, b = await make_node("a", held_a, **BUSY), await make_node("b", held_b, **BUSY)
    busy = [await (await node.post("/run-json", json={"code": "pass"})).json() for node in (a, b)]
    await until(lambda: held_a._live(unit_name(busy[0]["id"])) and held_b._live(unit_name(busy[1]["id"])))
    queued = await (await a.post("/run-json", json={"code": "import time; time.sleep(60)"})).json()
    create = RunDir.create

    def slow_create(self: RunDir, *args: Any, **kwargs: Any) -> None:
        time.sleep(1.0)  # in the staging thread: the claim is made, the run not yet handed to the runner
        create(self, *args, **kwargs)
    monkeypatch.setattr(RunDir, "create", slow_create)
    held_b.finish(unit_name(busy[1]["id"]))  # b frees a slot and claims the queued run
    await eventually(a, queued["id"], lambda r: r["node"] == "b")
    cancelled = await a.post(f"/runs/{queued['id']}/cancel")  # relayed to b, which is staging it
    assert cancelled.status == 202, await cancelled.text()
    final = await eventually(a, queued["id"], lambda r: r["state"] != "queued" and r["state"] != "starting"
                             and r["state"] != "running")
    assert final["state"] == "cancelled", final
