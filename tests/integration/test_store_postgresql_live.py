"""The daemon as a real service in a test host, its run records in
PostgreSQL (`store = "postgresql://…"`: a throw-away server of Debian's
package on this machine, reached over loopback). Under a mixed load, with
the database server restarted mid-load, every run still ends in its true
state exactly once, and the database holds what the API says. (A daemon
killed -9 on PostgreSQL: tests/integration/test_nodes_live.py.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_lifecycle_live import FAULT_RUNS, none_lost_or_twice, settled
from tests.support.daemon import DaemonService
from tests.support.load import Load, wait_for, wrong_facts
from tests.support.postgres import Postgres
from tests.support.testhost import TestHost, booted


@pytest.fixture(scope="module")
def host() -> Iterator[TestHost]:
    with booted("pg") as testhost:
        yield testhost


def service_on(postgres: Postgres, host: TestHost, tmp_path: Path, name: str) -> tuple[DaemonService, str]:
    url = postgres.new_database()
    service = DaemonService(host, tmp_path, name=name, config=f'max_concurrent = 8\nstore = "{url}"\n')
    service.start()
    return service, url.rsplit("/", 1)[1]


def database_agrees(postgres: Postgres, database: str, service: DaemonService) -> None:
    """Every run the API lists is a row of the same state and exit code, and no other row exists."""
    listed = {r["id"]: r for r in service.client.get("/runs?limit=1000").json()["runs"]}
    rows = postgres.psql("SELECT id, state, coalesce(exit_code::text, '') FROM runs", database).splitlines()
    stored = {row.split("|")[0]: row.split("|")[1:] for row in rows}
    assert stored.keys() == listed.keys()
    for run_id, (state, exit_code) in stored.items():
        expected = listed[run_id]["exit_code"]
        assert (state, exit_code) == (listed[run_id]["state"], "" if expected is None else str(expected)), run_id


def test_postgresql_restarted_mid_load_refuses_then_loses_nothing(postgres: Postgres, host: TestHost,
                                                                   tmp_path: Path) -> None:
    service, database = service_on(postgres, host, tmp_path, "pgdown")
    try:
        down_for = 3.0

        def restart_the_database(load: Load) -> None:
            assert wait_for(lambda: load.done >= FAULT_RUNS / 4, 120)
            postgres.stop("fast")
            try:
                time.sleep(down_for)
            finally:
                postgres.start()
        load = Load(service.client, FAULT_RUNS, parallel=12, seed=6)
        outcomes = load.run(during=restart_the_database)
        problems = wrong_facts(outcomes)
        assert not problems, f"{len(problems)} wrong facts, e.g. {problems[:5]}\n{service.journal(100)}"
        assert load.refusals > 0, "no submission was refused while the database was down"
        assert "the run store cannot be reached" in service.journal()
        none_lost_or_twice(service.client, outcomes)
        settled(service)
        # Ends seen while it was down were held and written once it was back (records.py).
        assert wait_for(lambda: postgres.psql("SELECT count(*) FROM runs WHERE state IN "
                                              "('queued', 'starting', 'running')", database) == "0", 30)
        database_agrees(postgres, database, service)
    finally:
        service.stop()
