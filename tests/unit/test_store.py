"""The run store's failures: whatever SQLite raises, and a store used after
close(), is Unavailable (a 503), never an exception that becomes a 500."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from unitbox.errors import Unavailable
from unitbox.limits import Limits
from unitbox.outcome import RunState
from unitbox.store import RunRecord
from unitbox.store.sqlite import SqliteStore

GARBAGE = b"this is no SQLite database\n" * 1000


def record(run_id: str) -> RunRecord:
    return RunRecord(id=run_id, state=RunState.QUEUED, created_at=1.0, limits=Limits())




async def test_a_file_that_is_no_database_cannot_be_opened(tmp_path: Path) -> None:
    path = tmp_path / "unitbox.db"
    path.write_bytes(GARBAGE)
    store = SqliteStore(path)
    with pytest.raises(Unavailable, match="not a database") as caught:
        await store.open()
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)
    with pytest.raises(Unavailable):
        await store.get("0" * 16)
    await store.close()


async def test_a_store_damaged_while_open_answers_unavailable(store: SqliteStore) -> None:
    await store.insert(record("a" * 16))
    # Overwritten in place, the WAL index too, as a bad disk or a stray `dd` would.
    for path in store.path.parent.glob(store.path.name + "*"):
        path.write_bytes(GARBAGE[:path.stat().st_size])
    for query in (store.get("a" * 16), store.insert(record("b" * 16)), store.finished_before(2.0)):
        with pytest.raises(Unavailable, match="damaged: file is not a database") as caught:
            await query
        assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)


async def test_a_refused_write_is_unavailable(store: SqliteStore) -> None:
    await store.insert(record("a" * 16))
    with pytest.raises(Unavailable, match="refused a change: UNIQUE constraint failed") as caught:
        await store.insert(record("a" * 16))
    assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)


async def test_a_closed_store_answers_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "unitbox.db")
    await store.open()
    await store.close()
    for call in (store.insert(record("a" * 16)), store.get("a" * 16), store.ping(), store.open()):
        with pytest.raises(Unavailable, match="the run store is closed"):
            await call
    await store.close()  # twice is fine


async def test_only_the_insert_that_accepts_a_run_waits_for_the_disk(store: SqliteStore) -> None:
    statements: list[str] = []
    assert store._db is not None
    store._db.set_trace_callback(statements.append)
    inserted = await store.insert(record("a" * 16))
    await store.update(inserted.evolve(state=RunState.RUNNING))
    inserts = [i for i, s in enumerate(statements) if s.startswith("INSERT")]
    updates = [i for i, s in enumerate(statements) if s.startswith("UPDATE")]
    assert len(inserts) == 1 and len(updates) == 1
    full = statements.index("PRAGMA synchronous=FULL")
    normal = statements.index("PRAGMA synchronous=NORMAL")
    commit = statements.index("COMMIT", inserts[0])
    assert full < inserts[0] < commit < normal < updates[0]
    assert statements.count("PRAGMA synchronous=FULL") == 1


async def test_known_ids_looks_up_more_ids_than_one_statement_takes(store: SqliteStore) -> None:
    recorded = ["a" * 16, "b" * 16]
    for run_id in recorded:
        await store.insert(record(run_id))
    asked = [f"{n:016x}" for n in range(1200)] + recorded
    assert await store.known_ids(asked) == set(recorded)
    assert await store.known_ids([]) == set()


async def test_writes_that_arrive_together_share_one_commit(store: SqliteStore) -> None:
    inserted = [await store.insert(record(f"{n:016x}")) for n in range(16)]
    statements: list[str] = []
    assert store._db is not None
    store._db.set_trace_callback(statements.append)
    await asyncio.gather(*(store.update(r.evolve(state=RunState.RUNNING, started_at=2.0)) for r in inserted))
    assert statements.count("COMMIT") <= 2  # the first alone, the others together
    assert [r.state for r in await store.page(None, 20, None)] == [RunState.RUNNING] * 16


async def test_one_refused_write_does_not_take_its_batch_down(store: SqliteStore) -> None:
    await store.insert(record("a" * 16))
    results = await asyncio.gather(store.insert(record("b" * 16)), store.insert(record("a" * 16)),
                                   store.insert(record("c" * 16)), return_exceptions=True)
    assert isinstance(results[1], Unavailable) and "UNIQUE" in results[1].message
    assert isinstance(results[1].__cause__, sqlite3.IntegrityError)
    assert await store.known_ids(["a" * 16, "b" * 16, "c" * 16]) == {"a" * 16, "b" * 16, "c" * 16}


@pytest.mark.parametrize(("started_at", "synced"), [(None, True), (2.0, False)])
async def test_a_final_record_is_synced_only_for_a_run_that_never_started(
        store: SqliteStore, started_at: float | None, synced: bool) -> None:
    """A started run's end is in its result file (recovery takes it from there);
    a run cancelled while queued has nothing else on disk."""
    inserted = await store.insert(record("a" * 16))
    statements: list[str] = []
    assert store._db is not None
    store._db.set_trace_callback(statements.append)
    await store.update(inserted.evolve(state=RunState.CANCELLED, started_at=started_at, finished_at=3.0))
    assert ("PRAGMA synchronous=FULL" in statements) is synced


async def test_writes_asked_for_before_close_are_made(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "unitbox.db")
    await store.open()
    writes = [asyncio.ensure_future(store.insert(record(f"{n:016x}"))) for n in range(5)]
    await asyncio.sleep(0)  # they are asked for
    await store.close()
    assert all(w.done() and not w.exception() for w in writes)
    reopened = SqliteStore(tmp_path / "unitbox.db")
    await reopened.open()
    assert len(await reopened.known_ids([f"{n:016x}" for n in range(5)])) == 5
    await reopened.close()


async def test_a_final_record_just_written_is_read_back_without_the_database_until_deleted(store: SqliteStore) -> None:
    record = await store.insert(RunRecord(id="0123456789abcdef", state=RunState.QUEUED, created_at=1.0,
                                          limits=Limits()))
    final = record.evolve(state=RunState.SUCCEEDED, started_at=2.0, finished_at=3.0, exit_code=0)
    await store.update(final)
    assert await store.get(record.id) == final
    reads = 0
    original = store._run

    async def counted(fn: Any) -> Any:
        nonlocal reads
        reads += 1
        return await original(fn)
    store._run = counted  # type: ignore[method-assign]
    assert await store.get(record.id) == final and reads == 0  # from memory: no thread hop
    await store.delete([record.id])
    assert await store.get(record.id) is None and reads == 1  # deleted: asked, and gone
