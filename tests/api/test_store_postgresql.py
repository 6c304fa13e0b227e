"""The daemon's API with `store = "postgresql://…"` (a real throw-away
server; systemd faked): runs recorded and read back in PostgreSQL, and a
server that goes down while runs execute: submissions 503, /healthz says
why, runs in progress finish and are recorded when it returns."""

from __future__ import annotations

from typing import Any

from tests.api.conftest import MakeClient
from tests.support.fake_systemd import FakeSystemd, until
from tests.support.postgres import Postgres
from unitbox.profile import unit_name


async def test_runs_are_recorded_and_listed_from_postgresql(make_client: MakeClient, postgres: Postgres) -> None:
    url = postgres.new_database()
    client = await make_client(store=url)
    answers = [await client.post("/run-json?wait=true", json={"code": f"print({n})"}) for n in range(3)]
    runs = [await answer.json() for answer in answers]
    assert [r["state"] for r in runs] == ["succeeded"] * 3
    listed = await (await client.get("/runs")).json()
    assert [r["id"] for r in listed["runs"]] == [r["id"] for r in reversed(runs)]
    assert (await client.get(f"/output/{runs[0]['id']}")).status == 200
    in_postgresql = postgres.psql("SELECT id || ' ' || state FROM runs ORDER BY seq", url.rsplit("/", 1)[1])
    assert in_postgresql.splitlines() == [f"{r['id']} succeeded" for r in runs]
    health = await (await client.get("/healthz")).json()
    assert health["status"] == "ok"


async def test_a_server_down_refuses_submissions_and_loses_no_run_in_progress(make_client: MakeClient,
                                                                             postgres: Postgres) -> None:
    fake = FakeSystemd(auto_finish=False)
    url = postgres.new_database()
    client = await make_client(fake, store=url)
    running: dict[str, Any] = await (await client.post("/run-json", json={"code": "print(1)"})).json()
    await until(lambda: fake._live(unit_name(running["id"])))
    postgres.stop("fast")
    try:
        refused = await client.post("/run-json", json={"code": "print(2)"})
        assert refused.status == 503
        assert "the run store cannot be reached" in (await refused.json())["error"]["message"]
        health = await client.get("/healthz")
        assert health.status == 503 and "run store cannot be reached" in (await health.json())["reason"]
        fake.finish(unit_name(running["id"]))  # the run ends while the server is down
        # Held in memory meanwhile (records.py), and served from there.
        status = await client.get(f"/status/{running['id']}")
        assert status.status == 200 and (await status.json())["state"] == "succeeded"
    finally:
        postgres.start()
    accepted = await client.post("/run-json", json={"code": "print(3)"})
    assert accepted.status == 202

    def recorded() -> bool:
        query = f"SELECT state FROM runs WHERE id = '{running['id']}'"
        return postgres.psql(query, url.rsplit("/", 1)[1]) == "succeeded"
    await until(recorded, within_s=10)  # written again every PERSIST_RETRY_S
