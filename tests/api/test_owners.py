"""Runs belong to the token that submitted them: every run endpoint answers
another token's run exactly like an unknown id (404, same body), /runs lists
only one's own (filtered before paging), an admin token sees everything, and
a server without tokens behaves as before owners existed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.api.conftest import MakeClient
from tests.support.fake_systemd import FakeSystemd, until
from unitbox.profile import unit_name

TOKENS = {"alice": {"secret": "alice-secret"}, "bob": {"secret": "bob-secret"},
          "ops": {"secret": "ops-secret", "admin": True}}
UNKNOWN = "0123456789abcdef"
Client = TestClient[Any, web.Application]


def as_(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}-secret"}


async def submit(client: Client, token: str, **extra: Any) -> str:
    reply = await client.post("/run-json", json={"code": "print(1)", **extra}, headers=as_(token))
    assert reply.status in (200, 202), await reply.text()
    run_id: str = (await reply.json())["id"]
    return run_id


async def looks_unknown(client: Client, method: str, path: str, run_id: str, token: str) -> None:
    """`path` about `run_id` answers `token` exactly as it would for an id that does not exist."""
    reply = await client.request(method, path.format(run_id), headers=as_(token))
    unknown = await client.request(method, path.format(UNKNOWN), headers=as_(token))
    assert (reply.status, unknown.status) == (404, 404)
    assert (await reply.text()).replace(run_id, "ID") == (await unknown.text()).replace(UNKNOWN, "ID")


READS = [("GET", "/status/{}"), ("GET", "/output/{}"), ("GET", "/output/{}?stream=stdout"), ("GET", "/runs/{}/code"),
         ("GET", "/output/{}?stream=stderr")]
CANCELS = [("POST", "/runs/{}/cancel"), ("DELETE", "/runs/{}")]


@pytest.mark.parametrize("finished", [False, True], ids=["running", "finished"])
async def test_another_tokens_run_is_404_on_every_endpoint_and_its_owner_and_admins_read_it(
        make_client: MakeClient, finished: bool) -> None:
    fake = FakeSystemd(auto_finish=finished)
    client = await make_client(fake, tokens=TOKENS)
    run_id = await submit(client, "alice", wait=finished)
    if not finished:
        await until(lambda: unit_name(run_id) in fake.units)
        fake.activate(unit_name(run_id))
    for method, path in READS + CANCELS:
        await looks_unknown(client, method, path, run_id, "bob")
    for token in ("alice", "ops"):
        for method, path in READS:
            reply = await client.request(method, path.format(run_id), headers=as_(token))
            assert reply.status == 200, (token, path, await reply.text())
    status = await (await client.get(f"/status/{run_id}", headers=as_("alice"))).json()
    assert status["owner"] == "alice"
    assert status["state"] == ("succeeded" if finished else "running")
    assert fake.stopped == [] and fake.killed == []  # bob's cancels touched nothing


async def test_a_cancel_by_another_token_is_404_and_the_run_keeps_running(make_client: MakeClient) -> None:
    fake = FakeSystemd(auto_finish=False)
    client = await make_client(fake, tokens=TOKENS)
    run_id = await submit(client, "alice")
    await until(lambda: unit_name(run_id) in fake.units)
    fake.activate(unit_name(run_id))
    for method, path in CANCELS:
        assert (await client.request(method, path.format(run_id), headers=as_("bob"))).status == 404
    await asyncio.sleep(0.05)
    assert (await (await client.get(f"/status/{run_id}", headers=as_("alice"))).json())["state"] == "running"
    assert fake.killed == [] and fake.stopped == []
    reply = await client.post(f"/runs/{run_id}/cancel", headers=as_("alice"))
    assert reply.status == 202
    await until(lambda: fake.killed == [(unit_name(run_id), 15)])


async def test_an_admin_cancels_anyones_run(make_client: MakeClient) -> None:
    fake = FakeSystemd(auto_finish=False)
    client = await make_client(fake, tokens=TOKENS)
    run_id = await submit(client, "alice")
    await until(lambda: unit_name(run_id) in fake.units)
    fake.activate(unit_name(run_id))
    assert (await client.delete(f"/runs/{run_id}", headers=as_("ops"))).status == 202


async def test_runs_lists_only_ones_own_filtered_before_paging(make_client: MakeClient) -> None:
    client = await make_client(tokens=TOKENS)
    mine = [await submit(client, "alice", wait=True) for _ in range(2)]
    theirs = [await submit(client, "bob", wait=True) for _ in range(3)]  # newer than all of alice's

    async def listed(token: str, query: str = "") -> tuple[list[str], str | None]:
        page = await (await client.get(f"/runs{query}", headers=as_(token))).json()
        return [run["id"] for run in page["runs"]], page["next_cursor"]

    assert (await listed("alice"))[0] == mine[::-1]
    assert (await listed("bob"))[0] == theirs[::-1]
    assert (await listed("ops"))[0] == (mine + theirs)[::-1]
    first, cursor = await listed("alice", "?limit=1")  # a page of alice's, not bob's newer ones dropped
    assert first == [mine[1]] and cursor is not None
    rest, cursor = await listed("alice", f"?limit=1&cursor={cursor}")
    assert rest == [mine[0]] and cursor is None
    assert (await listed("bob", "?state=succeeded&limit=10"))[0] == theirs[::-1]
    page = await (await client.get("/runs", headers=as_("ops"))).json()
    assert {run["owner"] for run in page["runs"]} == {"alice", "bob"}


async def test_a_waiting_submission_answers_its_own_run(make_client: MakeClient) -> None:
    client = await make_client(tokens=TOKENS)
    reply = await client.post("/run-json?wait=true", json={"code": "print(1)"}, headers=as_("bob"))
    assert reply.status == 200
    assert (await reply.json())["owner"] == "bob"


async def test_list_form_tokens_keep_todays_behaviour_every_holder_sees_every_run(
        make_client: MakeClient) -> None:
    client = await make_client(tokens=["first", "second"])
    reply = await client.post("/run-json?wait=true", json={"code": "x"}, headers={"Authorization": "Bearer first"})
    run_id = (await reply.json())["id"]
    other = {"Authorization": "Bearer second"}
    assert (await client.get(f"/output/{run_id}", headers=other)).status == 200
    status = await (await client.get(f"/status/{run_id}", headers=other)).json()
    assert status["owner"] == "token-1"
    assert [r["id"] for r in (await (await client.get("/runs", headers=other)).json())["runs"]] == [run_id]


async def test_without_tokens_every_run_is_everyones_and_has_no_owner(make_client: MakeClient) -> None:
    client = await make_client()
    reply = await client.post("/run-json?wait=true", json={"code": "x"})
    run = await reply.json()
    assert run["owner"] is None
    assert (await client.get(f"/status/{run['id']}")).status == 200
    assert [r["id"] for r in (await (await client.get("/runs")).json())["runs"]] == [run["id"]]


async def test_a_wrong_secret_is_401_and_healthz_stays_open(make_client: MakeClient) -> None:
    client = await make_client(tokens=TOKENS)
    for headers in ({}, {"Authorization": "Bearer alice"}, {"Authorization": "Basic alice-secret"}):
        assert (await client.get("/runs", headers=headers)).status == 401
    assert (await client.get("/healthz")).status == 200
