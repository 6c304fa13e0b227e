"""What only the PostgreSQL store has to get right, on a real server: a
server that goes away and comes back, and nodes that start together."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from tests.support.postgres import REQUIRED, Postgres
from unitbox.config import load_config
from unitbox.errors import ConfigError, Unavailable
from unitbox.limits import Limits
from unitbox.outcome import RunState
from unitbox.store import RunRecord, ensure_store_support
from unitbox.store.schema import migrations

if not REQUIRED:  # psycopg needs Debian's libpq5; `make test` installs it (with the server)
    pytest.importorskip("psycopg", reason="psycopg cannot load libpq5 (make test installs it)")
import psycopg

from unitbox.store.postgres import PostgresStore


def record(run_id: str) -> RunRecord:
    return RunRecord(id=run_id, state=RunState.QUEUED, created_at=1.0, limits=Limits())


async def test_a_restarted_server_costs_answers_only_while_it_is_down(postgres: Postgres) -> None:
    store = PostgresStore(postgres.new_database())
    await store.open()
    try:
        accepted = await store.insert(record("a" * 16))
        postgres.stop("fast")
        try:
            for call in (store.insert(record("b" * 16)), store.get("a" * 16), store.ping()):
                with pytest.raises(Unavailable, match="the run store cannot be reached") as caught:
                    await call
                assert isinstance(caught.value.__cause__, psycopg.OperationalError)
        finally:
            postgres.start()
        # The pool's connections died with the server: each is checked before use, so not one
        # request after the restart fails for it.
        for _ in range(20):
            assert await store.get("a" * 16) == accepted
        await store.insert(record("c" * 16))
        assert await store.known_ids(["a" * 16, "b" * 16, "c" * 16]) == {"a" * 16, "c" * 16}
    finally:
        await store.close()


async def test_a_server_that_is_not_there_is_unavailable_at_open(postgres: Postgres) -> None:
    store = PostgresStore(postgres.url("no_such_database"))
    with pytest.raises(Unavailable, match=r'the run store cannot be reached: .*"no_such_database" does not exist'):
        await store.open()
    await store.close()


async def test_nodes_that_start_together_migrate_once(postgres: Postgres) -> None:
    url = postgres.new_database()
    stores = [PostgresStore(url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        await asyncio.gather(*(s.insert(record(f"{n:016x}")) for n, s in enumerate(stores)))
        assert postgres.psql("SELECT version FROM unitbox_schema", url.rsplit("/", 1)[1]) == str(len(migrations(
            "postgresql")))
        assert postgres.psql("SELECT count(*) FROM unitbox_schema", url.rsplit("/", 1)[1]) == "1"
        assert len(await stores[0].page(None, 10, None)) == 4
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_only_the_insert_and_a_never_started_end_wait_for_the_disk(postgres: Postgres) -> None:
    """As SQLite's FULL/NORMAL: the other writes go through connections with synchronous_commit
    off. Seen in the server's own log: which backend (PID) ran each statement, and which set it
    off. And each write is one statement, no BEGIN/COMMIT around it."""
    url = postgres.new_database()
    postgres.psql(f"ALTER DATABASE {url.rsplit('/', 1)[1]} SET log_statement = 'all'")
    logged_before = postgres.log.stat().st_size
    store = PostgresStore(url)
    await store.open()
    try:
        inserted = await store.insert(record("a" * 16))
        await store.update(inserted.evolve(state=RunState.RUNNING, started_at=2.0))
        await store.update(inserted.evolve(state=RunState.SUCCEEDED, started_at=2.0, finished_at=3.0))
        never = await store.insert(record("b" * 16))
        await store.update(never.evolve(state=RunState.CANCELLED, finished_at=3.0))
    finally:
        await store.close()
    with postgres.log.open() as log:
        log.seek(logged_before)
        lines = re.findall(r"\[(\d+)\] LOG:  (?:statement|execute [^:]*): (.*)", log.read())
    fast = {pid for pid, statement in lines if statement == "SET synchronous_commit TO off"}
    writes = [(statement.split()[0], pid in fast) for pid, statement in lines
              if statement.startswith(("INSERT INTO runs ", "UPDATE runs "))]
    assert writes == [("INSERT", False), ("UPDATE", True), ("UPDATE", True), ("INSERT", False), ("UPDATE", False)]
    assert not [s for _, s in lines if s in ("BEGIN", "COMMIT")][2:]  # only the migration's transaction


def test_a_machine_without_libpq_is_told_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as `import psycopg` fails without libpq5
    config = load_config(Path("/dev/null"), environ={}, cli={"store": "postgresql:///unitbox",
                                                              "state_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="apt install libpq5"):
        ensure_store_support(config)
    ensure_store_support(load_config(Path("/dev/null"), environ={}, cli={"state_dir": str(tmp_path)}))  # SQLite


def test_a_store_that_is_not_a_postgresql_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a PostgreSQL URL"):
        load_config(Path("/dev/null"), environ={}, cli={"store": "mysql://x", "state_dir": str(tmp_path)})
