"""Schema 2: each run records its owner. An existing database of schema 1
is upgraded in place, its runs kept (owner NULL); listings filter by owner
in SQL."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from unitbox.limits import Limits
from unitbox.outcome import RunState
from unitbox.store import RunRecord
from unitbox.store.sqlite import MIGRATIONS, SqliteStore


def schema_1_database(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute("INSERT INTO runs (id, state, created_at, limits, runtime) VALUES (?, ?, ?, ?, ?)",
               ("a" * 16, "succeeded", 1.0, json.dumps(Limits().as_dict()), "default"))
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()


async def test_a_schema_1_database_is_upgraded_and_keeps_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "unitbox.db"
    schema_1_database(path)
    store = SqliteStore(path)
    await store.open()
    try:
        old = await store.get("a" * 16)
        assert old is not None and old.owner is None and old.state is RunState.SUCCEEDED
        await store.insert(RunRecord(id="b" * 16, state=RunState.QUEUED, created_at=2.0, limits=Limits(),
                                     owner="alice"))
        new = await store.get("b" * 16)
        assert new is not None and new.owner == "alice"
    finally:
        await store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 6
    assert "runs_owner" in {row[1] for row in db.execute("PRAGMA index_list(runs)")}
    db.close()
    reopened = SqliteStore(path)  # a second open migrates nothing and loses nothing
    await reopened.open()
    assert [r.id for r in await reopened.page(None, 10, None)] == ["b" * 16, "a" * 16]
    await reopened.close()


async def test_page_filters_by_owner_before_the_limit(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "unitbox.db")
    await store.open()
    try:
        for number, owner in enumerate(["alice", "bob", "bob", "bob", None]):
            await store.insert(RunRecord(id=f"{number:016x}", state=RunState.QUEUED, created_at=1.0,
                                         limits=Limits(), owner=owner))
        assert [r.id for r in await store.page(None, 1, None, owner="alice")] == [f"{0:016x}"]
        assert [r.owner for r in await store.page(None, 10, None, owner="bob")] == ["bob"] * 3
        assert len(await store.page(None, 10, None)) == 5
        assert await store.page(RunState.SUCCEEDED, 10, None, owner="alice") == []
    finally:
        await store.close()
