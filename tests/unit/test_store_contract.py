"""The store's contract, run against both engines: SQLite in a file, and a
real PostgreSQL server (tests/support/postgres.py). Whatever the engine, the
engine, recovery and retention get the same answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from unitbox.errors import Unavailable
from unitbox.limits import Limits
from unitbox.outcome import RunState
from unitbox.store import NodeInfo, RunInputs, RunRecord, RunStore
from unitbox.store.schema import migrations
from unitbox.store.sqlite import SqliteStore

MakeStore = Callable[..., RunStore]


def record(run_id: str, **fields: object) -> RunRecord:
    return RunRecord(id=run_id, state=RunState.QUEUED, created_at=1.0, limits=Limits()).evolve(**fields)


def rid(number: int) -> str:
    return f"{number:016x}"


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> MakeStore:
    """A factory of stores on one empty database: each call, a new store on it (as a restarted
    daemon, or with `node=`, another node sharing it)."""
    if request.param == "sqlite":
        return lambda node=None: SqliteStore(tmp_path / "unitbox.db", node=node)
    url = request.getfixturevalue("postgres").new_database()  # skipped here without a server to start
    from unitbox.store.postgres import PostgresStore  # psycopg needs libpq5, which the server brings
    return lambda node=None: PostgresStore(url, node=node)


@pytest.fixture
async def nodes(make_store: MakeStore) -> AsyncIterator[tuple[RunStore, RunStore]]:
    """Two nodes, a and b, on one database."""
    a, b = make_store(node="a"), make_store(node="b")
    await a.open()
    await b.open()
    yield a, b
    await a.close()
    await b.close()


@pytest.fixture
async def store(make_store: MakeStore) -> AsyncIterator[RunStore]:
    opened = make_store()
    await opened.open()
    yield opened
    await opened.close()


EVERY_FIELD = dict(
    state=RunState.SUCCEEDED, runtime="science", started_at=2.5, finished_at=3.75, exit_code=0, signal="SIGKILL",
    duration_ms=1250.5, cpu_ms=99.25, memory_peak_bytes=6 * 2**30, stdout_bytes=3 * 2**30, stderr_bytes=7,
    stdout_truncated=True, stderr_truncated=False, error="node lost", cancel_requested=True, owner="alice",
    entrypoint="main", lint="before", input_files=3, output_files=2, result_bytes=17, lint_findings=4,
    unit="unitbox-warm-0001.service", node="node-a",
)


async def test_a_record_comes_back_as_it_was_written_every_field(store: RunStore) -> None:
    inserted = await store.insert(record(rid(1), limits=Limits(timeout_s=3.5, memory_mb=64)))
    assert inserted.seq > 0
    assert await store.get(rid(1)) == inserted
    final = inserted.evolve(**EVERY_FIELD)
    await store.update(final)
    assert await store.get(rid(1)) == final
    assert await store.get(rid(2)) is None


async def test_every_field_survives_a_restart(make_store: MakeStore) -> None:
    """Read by a new store (no memory of the write): a value above 2^31 included."""
    first = make_store()
    await first.open()
    final = (await first.insert(record(rid(1)))).evolve(**EVERY_FIELD)
    await first.update(final)
    await first.close()
    second = make_store()
    await second.open()
    try:
        assert await second.get(rid(1)) == final
    finally:
        await second.close()


async def test_seq_follows_arrival_and_pages_go_newest_first(store: RunStore) -> None:
    owners = ["alice", "bob", "bob", "bob", None, "alice"]
    inserted = [await store.insert(record(rid(n), owner=owner)) for n, owner in enumerate(owners)]
    assert [r.seq for r in inserted] == sorted({r.seq for r in inserted})
    await store.update(inserted[2].evolve(state=RunState.FAILED, finished_at=5.0))
    everything = await store.page(None, 10, None)
    assert [r.id for r in everything] == [rid(n) for n in reversed(range(6))]
    first, second = await store.page(None, 4, None), await store.page(None, 4, inserted[2].seq)
    assert [r.id for r in first + second] == [r.id for r in everything]
    assert [r.id for r in await store.page(None, 10, None, owner="bob")] == [rid(3), rid(2), rid(1)]
    assert [r.id for r in await store.page(None, 1, None, owner="alice")] == [rid(5)]
    assert [r.id for r in await store.page(RunState.FAILED, 10, None)] == [rid(2)]
    assert await store.page(RunState.FAILED, 10, None, owner="alice") == []


async def test_unfinished_runs_are_listed_oldest_first(store: RunStore) -> None:
    states = [RunState.RUNNING, RunState.SUCCEEDED, RunState.QUEUED, RunState.CANCELLED, RunState.STARTING]
    for number, state in enumerate(states):
        inserted = await store.insert(record(rid(number)))
        await store.update(inserted.evolve(state=state, finished_at=2.0 if state.terminal else None))
    assert [r.id for r in await store.unfinished()] == [rid(0), rid(2), rid(4)]


async def test_retention_finds_finished_runs_by_age_and_size_and_deletes_them(store: RunStore) -> None:
    for number, finished in enumerate([5.0, None, 3.0, 9.0]):
        inserted = await store.insert(record(rid(number)))
        if finished is not None:
            await store.update(inserted.evolve(state=RunState.SUCCEEDED, finished_at=finished,
                                               stdout_bytes=100 * number, stderr_bytes=number))
    assert await store.finished_before(6.0) == [rid(0), rid(2)]  # by arrival, not by end
    assert await store.finished_oldest_first() == [(rid(0), 0), (rid(2), 202), (rid(3), 303)]
    await store.delete([rid(0), rid(2)])
    assert await store.get(rid(0)) is None and await store.get(rid(2)) is None  # the recent final too
    assert await store.known_ids([rid(n) for n in range(4)]) == {rid(1), rid(3)}
    await store.delete([])


async def test_known_ids_answers_for_many_ids_at_once(store: RunStore) -> None:
    for number in (7, 1100):
        await store.insert(record(rid(number)))
    assert await store.known_ids([rid(n) for n in range(1200)]) == {rid(7), rid(1100)}
    assert await store.known_ids([]) == set()


async def test_a_second_insert_of_an_id_is_refused_and_harms_nothing(store: RunStore) -> None:
    first = await store.insert(record(rid(1)))
    results = await asyncio.gather(store.insert(record(rid(2))), store.insert(record(rid(1))),
                                   store.insert(record(rid(3))), return_exceptions=True)
    refused = results[1]
    assert isinstance(refused, Unavailable) and "the run store refused a change" in refused.message
    assert await store.get(rid(1)) == first
    assert await store.known_ids([rid(1), rid(2), rid(3)]) == {rid(1), rid(2), rid(3)}


async def test_many_writes_at_once_all_land(store: RunStore) -> None:
    inserted = await asyncio.gather(*(store.insert(record(rid(n))) for n in range(64)))
    assert len({r.seq for r in inserted}) == 64
    await asyncio.gather(*(store.update(r.evolve(state=RunState.RUNNING, started_at=2.0)) for r in inserted))
    assert {r.state for r in await store.page(None, 100, None)} == {RunState.RUNNING}


async def test_a_closed_store_answers_unavailable(make_store: MakeStore) -> None:
    store = make_store()
    await store.open()
    await store.close()
    calls: list[Awaitable[object]] = [store.insert(record(rid(1))), store.get(rid(1)), store.ping(), store.open(),
                                      store.page(None, 1, None)]
    for call in calls:
        with pytest.raises(Unavailable, match="the run store is closed"):
            await call
    await store.close()  # twice is fine


async def test_a_reopened_store_migrates_nothing_and_loses_nothing(make_store: MakeStore) -> None:
    for number in range(2):
        store = make_store()
        await store.open()
        await store.insert(record(rid(number)))
        assert [r.id for r in await store.page(None, 10, None)] == [rid(n) for n in reversed(range(number + 1))]
        await store.close()


async def test_a_node_recovers_and_retains_only_its_own_runs_and_reads_them_all(nodes: tuple[RunStore, RunStore]) -> None:
    a, b = nodes
    for number, (store, state) in enumerate([(a, RunState.RUNNING), (b, RunState.RUNNING),
                                             (a, RunState.SUCCEEDED), (b, RunState.SUCCEEDED)]):
        inserted = await store.insert(record(rid(number), node=store.node))
        await store.update(inserted.evolve(state=state, finished_at=2.0 if state.terminal else None,
                                           stdout_bytes=number))
    assert [r.id for r in await a.unfinished()] == [rid(0)]
    assert [r.id for r in await b.unfinished()] == [rid(1)]
    assert await a.finished_before(3.0) == [rid(2)] and await a.finished_oldest_first() == [(rid(2), 2)]
    assert await b.finished_before(3.0) == [rid(3)] and await b.finished_oldest_first() == [(rid(3), 3)]
    for store in (a, b):  # reads see every node's runs
        assert [r.id for r in await store.page(None, 10, None)] == [rid(n) for n in (3, 2, 1, 0)]
        assert (await store.get(rid(1)), await store.get(rid(2))) != (None, None)
        assert await store.queued() == 0


async def test_nodes_heartbeat_and_are_listed_by_name(store: RunStore) -> None:
    beat = NodeInfo(name="b", url="http://b:8080", capacity=2, running=1, queued=3, started_at=1.0,
                    heartbeat_at=2.0)
    await store.heartbeat(beat)
    await store.heartbeat(beat.evolve(name="a", url="http://a:8080"))
    await store.heartbeat(beat.evolve(running=0, queued=0, heartbeat_at=4.5))  # b again: refreshed, not added
    assert await store.nodes() == [beat.evolve(name="a", url="http://a:8080"),
                                   beat.evolve(running=0, queued=0, heartbeat_at=4.5)]
    await store.insert(record(rid(1)))
    assert await store.queued() == 1


def test_both_engines_have_the_same_migrations() -> None:
    sqlite, postgresql = migrations("sqlite"), migrations("postgresql")
    assert len(sqlite) == len(postgresql) == 6
    for mine, theirs in zip(sqlite, postgresql, strict=True):
        assert mine.count("ADD COLUMN") == theirs.count("ADD COLUMN")
        assert mine.count("CREATE INDEX") == theirs.count("CREATE INDEX")


async def test_the_runs_of_a_silent_node_are_settled_once_and_stay_so(nodes: tuple[RunStore, RunStore]) -> None:
    a, b = nodes
    beat = NodeInfo(name="a", url="http://a", capacity=1, running=1, queued=1, started_at=1.0, heartbeat_at=10.0)
    await a.heartbeat(beat)
    await b.heartbeat(beat.evolve(name="b", url="http://b", heartbeat_at=100.0))
    running = await a.insert(record(rid(1), node="a"))
    await a.update(running.evolve(state=RunState.RUNNING, started_at=11.0))
    await a.insert(record(rid(2), node="a"))  # queued
    done = await a.insert(record(rid(3), node="a"))
    await a.update(done.evolve(state=RunState.SUCCEEDED, started_at=11.0, finished_at=12.0))
    await b.insert(record(rid(4), node="b"))
    assert sorted(await b.settle_lost(now=101.0, cutoff=50.0, grace_s=50)) == [rid(1), rid(2)]
    lost = await b.get(rid(1))
    assert lost is not None and lost.state is RunState.ERROR and lost.finished_at == 101.0
    assert lost.error == "node lost: a sent no heartbeat for 50 s"
    assert (await b.get(rid(2))).state is RunState.ERROR  # type: ignore[union-attr]
    assert (await b.get(rid(3))).state is RunState.SUCCEEDED  # type: ignore[union-attr]
    assert (await b.get(rid(4))).state is RunState.QUEUED  # type: ignore[union-attr]  # its own node's
    assert await a.settle_lost(now=102.0, cutoff=50.0, grace_s=50) == []  # none of b's; a's own: never
    assert await b.settle_lost(now=103.0, cutoff=50.0, grace_s=50) == []  # settled once
    # a comes back and writes what it knew: the settled end stays.
    await a.update(running.evolve(state=RunState.SUCCEEDED, started_at=11.0, finished_at=104.0, exit_code=0))
    for store in (a, b):
        again = await store.get(rid(1))
        assert again is not None and again.state is RunState.ERROR and again.error == lost.error


INPUTS = RunInputs(code=b"print('hi')\n", stdin=b"\x00\xffbytes", args=["--n", "3"], entry="main 1024",
                   files=(("data/in.csv", b"a,b\n"), ("x.bin", bytes(range(256)))))


async def test_the_shared_queue_is_claimed_oldest_first_with_the_inputs(nodes: tuple[RunStore, RunStore]) -> None:
    a, b = nodes
    queued = [await a.enqueue(record(rid(n)), INPUTS) for n in range(5)]
    assert [r.node for r in queued] == [None] * 5 and await a.queued() == 5
    assert await a.inputs(rid(0)) == INPUTS
    first = await b.claim(2)
    assert [(r.id, r.node) for r, _ in first] == [(rid(0), "b"), (rid(1), "b")]
    assert all(inputs == INPUTS for _, inputs in first)
    assert [r.id for r, _ in await a.claim(10)] == [rid(2), rid(3), rid(4)]
    assert await b.claim(10) == [] and await a.claim(0) == []
    assert [r.id for r in await b.unfinished()] == [rid(0), rid(1)]  # claimed: the claimer's to run


async def test_a_queued_run_is_cancelled_only_while_no_node_has_it(nodes: tuple[RunStore, RunStore]) -> None:
    a, b = nodes
    await a.enqueue(record(rid(1)), INPUTS)
    await a.enqueue(record(rid(2)), INPUTS)
    cancelled = await b.cancel_unclaimed(rid(1), now=5.0)
    assert cancelled is not None and cancelled.state is RunState.CANCELLED and cancelled.node == "b"
    assert cancelled.cancel_requested and cancelled.finished_at == 5.0
    assert await a.get(rid(1)) == cancelled
    assert await b.finished_before(6.0) == [rid(1)]  # the canceller's, for its retention
    assert [r.id for r, _ in await a.claim(5)] == [rid(2)]
    assert await b.cancel_unclaimed(rid(2), now=6.0) is None  # a has it: a cancels it
    assert await b.cancel_unclaimed(rid(1), now=6.0) is None
    await a.delete([rid(1), rid(2)])
    assert await a.inputs(rid(2)) is None


async def test_a_lost_node_s_unstarted_runs_go_back_to_the_queue(nodes: tuple[RunStore, RunStore]) -> None:
    a, b = nodes
    beat = NodeInfo(name="a", url="http://a", capacity=1, running=1, queued=1, started_at=1.0, heartbeat_at=10.0)
    await a.heartbeat(beat)
    await b.heartbeat(beat.evolve(name="b", url="http://b", heartbeat_at=100.0))
    await a.enqueue(record(rid(1)), INPUTS)
    await a.enqueue(record(rid(2)), INPUTS)
    (running, _), _claimed = await a.claim(2)
    await a.update(running.evolve(state=RunState.RUNNING, started_at=11.0))
    local = await a.insert(record(rid(3), node="a"))  # accepted by a with a free slot: inputs on a's disk only
    assert sorted(await b.settle_lost(now=101.0, cutoff=50.0, grace_s=50)) == [rid(1), rid(3)]
    requeued = await b.get(rid(2))
    assert requeued is not None and requeued.state is RunState.QUEUED and requeued.node is None
    assert [(r.id, r.node) for r, _ in await b.claim(5)] == [(rid(2), "b")]
    assert (await b.get(local.id)).state is RunState.ERROR  # type: ignore[union-attr]


async def test_many_nodes_claiming_at_once_never_take_a_run_twice(make_store: MakeStore) -> None:
    stores = [make_store(node=f"n{n}") for n in range(4)]
    for store in stores:
        await store.open()
    try:
        for n in range(60):
            await stores[0].enqueue(record(rid(n)), INPUTS)

        async def take(store: RunStore) -> list[str]:
            taken: list[str] = []
            while claimed := await store.claim(3):
                taken += [r.id for r, _ in claimed]
            return taken
        shares = await asyncio.gather(*(take(s) for s in stores))
        everything = [run_id for share in shares for run_id in share]
        assert sorted(everything) == [rid(n) for n in range(60)]  # each once
        for store, share in zip(stores, shares, strict=True):
            assert [r.node for r in [await store.get(i) for i in share]] == [store.node] * len(share)
    finally:
        for store in stores:
            await store.close()


async def test_the_inputs_of_finished_runs_are_forgotten(store: RunStore) -> None:
    queued = await store.enqueue(record(rid(1)), INPUTS)
    await store.enqueue(record(rid(2)), INPUTS)
    await store.update(queued.evolve(state=RunState.SUCCEEDED, started_at=2.0, finished_at=3.0))
    await store.forget_inputs()
    assert await store.inputs(rid(1)) is None and await store.inputs(rid(2)) == INPUTS
