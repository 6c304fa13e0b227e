"""A damaged run store makes the API answer 503 with Retry-After, never 500."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.api.conftest import MakeClient
from unitbox.api.state import ENGINE

GARBAGE = b"this is no SQLite database\n" * 1000


def damage(database: Path) -> None:
    """Overwrite the database, its WAL and WAL index in place, as a bad disk would."""
    for path in database.parent.glob(database.name + "*"):
        path.write_bytes(GARBAGE[:path.stat().st_size])


async def assert_unavailable(reply: Any) -> None:
    assert reply.status == 503
    assert reply.headers["Retry-After"].isdigit()
    body = await reply.json()
    assert body["error"]["code"] == "unavailable"
    assert "the run store is damaged: file is not a database" in body["error"]["message"]


async def test_a_damaged_store_answers_503(make_client: MakeClient) -> None:
    client: TestClient[Any, web.Application] = await make_client()
    engine = client.app[ENGINE]
    finished = await (await client.post("/run-json", json={"code": "print(1)", "wait": True})).json()
    assert finished["state"] == "succeeded"  # served from the store from now on
    damage(engine.config.database_path)

    await assert_unavailable(await client.get("/runs"))  # a read the store must make
    reply = await client.get(f"/status/{finished['id']}")  # its final record, just written: known in memory
    assert reply.status == 200 and (await reply.json())["state"] == "succeeded"
    await assert_unavailable(await client.post("/run-json", json={"code": "print(2)"}))
    # The refused submission left no files behind.
    assert {p.name for p in engine.config.runs_dir.iterdir()} == {finished["id"]}
