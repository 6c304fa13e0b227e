"""The PostgreSQL store (`store = "postgresql://…"`): the same runs table as
SQLite's (schema.py), over psycopg 3's asyncio connections from two
psycopg_pool pools, so the event loop never waits on the server.

Why psycopg 3: it speaks libpq, so a URL, a Unix socket, a ~/.pgpass, TLS
and peer authentication work as for psql, with Debian's libpq5 (security
updates from Debian, as for python3-lxml). Its pool checks a connection
before handing it out, so a restarted server costs no request an error.
asyncpg would bring its own protocol code and no libpq.

Every call is one statement, and the connections autocommit: one round
trip each (bench/cluster.py measured 11 per run with a transaction around
each statement and `SET LOCAL` in it; 3 now, plus the pool's check).

Durability as in SQLite (store/sqlite.py): the INSERT that accepts a run
commits with the server's synchronous_commit (on by default), as does the
final record of a run that never started: those go through the durable
pool. Other writes and the reads go through the fast pool, whose
connections have synchronous_commit off (PostgreSQL's group commit: a crash
of the server may undo the last ones, which recovery re-derives from
systemd and the result file).

The schema's version is in the table unitbox_schema; nodes that start
together migrate one at a time, under an advisory lock."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolClosed

from unitbox.errors import Unavailable
from unitbox.outcome import RunState
from unitbox.store import UNFINISHED, NodeInfo, RecentFinals, RunInputs, RunRecord, unavailable_message
from unitbox.store import schema as sql

T = TypeVar("T")
Connection = psycopg.AsyncConnection[DictRow]

POOL_SIZE = 8  # fast connections per node: the writes of many runs in flight at once
DURABLE_POOL_SIZE = 4  # and durable ones: accepting runs
CONNECT_TIMEOUT_S = 5  # libpq's connect_timeout: a server that does not answer is a 503 soon
# For a free connection from the pool, or a new one: a request waits no longer when the server has
# just gone away (then the next ones fail fast: see _connected_pools). Statements take milliseconds:
# only thousands of writes at once would make a request wait this long on a healthy server.
WAIT_S = 2.0
MIGRATION_LOCK = 0x756E6974626F78  # "unitbox": the advisory lock nodes migrate under
QUEUE_CHANNEL = "unitbox_queue"  # NOTIFY: a run was queued for any node to take
_WAKE = f"SELECT pg_notify('{QUEUE_CHANNEL}', '')"

_INSERT = (f"INSERT INTO runs ({', '.join(sql.COLUMNS)}) "  # noqa: S608
           f"VALUES ({', '.join(f'%({c})s' for c in sql.COLUMNS)}) RETURNING seq")
_UPDATE = sql.update_query("%({})s")


def _unavailable(exc: psycopg.Error) -> Unavailable:
    """What went wrong, in words, for the 503's message (the pool's
    timeout is an OperationalError too)."""
    if isinstance(exc, psycopg.OperationalError):  # down, unreachable, restarting, refused the login
        problem = "cannot be reached"
    elif isinstance(exc, psycopg.IntegrityError):
        problem = "refused a change"
    else:
        problem = "failed"
    unavailable = Unavailable(unavailable_message(problem, str(exc).strip() or type(exc).__name__))
    unavailable.__cause__ = exc
    return unavailable


class PostgresStore:
    def __init__(self, url: str, *, node: str | None = None, pool_size: int = POOL_SIZE) -> None:
        self.url = url
        self.node = node
        self._pool_size = pool_size
        self._pools: dict[bool, AsyncConnectionPool[Connection]] = {}
        self._closed = False
        self._recent = RecentFinals()
        self._lost = False  # a connection failed: make sure of the server before the next request
        self._reconnecting = asyncio.Lock()
        self._writing: dict[str, asyncio.Task[Any]] = {}  # each run's last write, by id
        self._listener: Connection | None = None  # LISTENs for queued runs (wait_for_work)
        self._connect_args: dict[str, Any] = {"row_factory": dict_row, "connect_timeout": CONNECT_TIMEOUT_S,
                                              "application_name": "unitbox", "autocommit": True}

    # -- plumbing --------------------------------------------------------------
    async def _statement(self, fn: Callable[[Connection], Awaitable[T]], *, durable: bool = False) -> T:
        """`fn`, one statement (a transaction of its own: the connections
        autocommit, so it costs one round trip) on a connection of the
        durable or the fast pool."""
        try:
            while True:
                pools = await self._connected_pools()
                try:
                    async with pools[durable].connection() as conn:
                        return await fn(conn)
                except PoolClosed:
                    if self._closed or pools is self._pools:
                        raise
                    # Replaced by new pools (the server came back) after we took the old ones: no
                    # statement was sent on it, so it goes to the new ones.
        except psycopg.OperationalError as exc:  # the server went away, or the pool found none
            self._lost = True
            raise _unavailable(exc) from exc
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc

    async def _connected_pools(self) -> dict[bool, AsyncConnectionPool[Connection]]:
        """The pools (by durable); after a lost connection, new pools once the
        server answers again. psycopg_pool would retry with a backoff that
        grows to minutes and hold each request WAIT_S meanwhile; one direct
        connection says at once whether the server is back, and if not, why."""
        if self._closed:
            raise Unavailable("the run store is closed")
        if not self._pools:
            raise Unavailable("the run store is not open")
        if self._lost:
            async with self._reconnecting:  # one attempt at a time; those waiting see its outcome
                if self._lost:
                    await self._connect_once()
                    old, self._pools = self._pools, await self._new_pools()
                    self._lost = False
                    await asyncio.gather(*(pool.close() for pool in old.values()))
        return self._pools

    async def _check(self, conn: Connection) -> None:
        """The pool's look at a connection before handing it out (an empty
        query): a dead one means the server went away or restarted."""
        try:
            await AsyncConnectionPool.check_connection(conn)
        except psycopg.Error:
            self._lost = True
            raise

    async def _connect_once(self, then: Callable[[Connection], Awaitable[None]] | None = None) -> None:
        async with await Connection.connect(self.url, **self._connect_args) as conn, conn.transaction():
            if then is not None:
                await then(conn)

    async def _new_pools(self) -> dict[bool, AsyncConnectionPool[Connection]]:
        async def fast(conn: Connection) -> None:  # each new connection of the fast pool
            await conn.execute("SET synchronous_commit TO off")
        pools: dict[bool, AsyncConnectionPool[Connection]] = {}
        try:
            for durable, size in ((True, DURABLE_POOL_SIZE), (False, self._pool_size)):
                pools[durable] = AsyncConnectionPool(
                    self.url, connection_class=Connection, min_size=1, max_size=size, open=False,
                    timeout=WAIT_S, check=self._check, kwargs=self._connect_args,
                    configure=None if durable else fast, name=f"unitbox-store-{'durable' if durable else 'fast'}")
                await pools[durable].open(wait=True, timeout=WAIT_S + CONNECT_TIMEOUT_S)
        except BaseException:
            await asyncio.gather(*(pool.close() for pool in pools.values()))
            raise
        return pools

    async def _write(self, run_id: str, fn: Callable[[Connection], Awaitable[T]], *, durable: bool) -> T:
        """`fn` once the earlier writes of the same run are committed: with
        several connections, a run's `running` could otherwise commit after
        its end. Made even if the caller is cancelled, as SQLite's writes."""
        previous = self._writing.get(run_id)

        async def write() -> T:
            if previous is not None:
                await asyncio.wait([previous])  # its outcome is its own caller's
            return await self._statement(fn, durable=durable)
        task = asyncio.ensure_future(write())
        self._writing[run_id] = task

        def done(task: asyncio.Task[T]) -> None:
            if self._writing.get(run_id) is task:
                del self._writing[run_id]
            if not task.cancelled():
                task.exception()  # retrieved: a caller that went away leaves no warning
        task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _rows(self, query: str, params: Sequence[Any] = ()) -> list[DictRow]:
        async def fetch(conn: Connection) -> list[DictRow]:
            return await (await conn.execute(query, params)).fetchall()
        return await self._statement(fetch)

    async def _migrate(self, conn: Connection) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute("CREATE TABLE IF NOT EXISTS unitbox_schema (version INTEGER NOT NULL)")
        row = await (await conn.execute("SELECT version FROM unitbox_schema")).fetchone()
        if row is None:
            await conn.execute("INSERT INTO unitbox_schema (version) VALUES (0)")
        version = row["version"] if row else 0
        scripts = sql.migrations("postgresql")
        for script in scripts[version:]:
            await conn.execute(script)  # no parameters: several statements in one go
        if version < len(scripts):
            await conn.execute("UPDATE unitbox_schema SET version = %s", (len(scripts),))

    async def open(self) -> None:
        """Migrates on a connection of its own first: a server that refuses
        (down, no such database, the login refused) says why at once, where
        the pool would only retry until its timeout."""
        if self._closed:
            raise Unavailable("the run store is closed")
        try:
            await self._connect_once(then=self._migrate)
            self._pools = await self._new_pools()
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc

    async def close(self) -> None:
        if self._closed:
            return
        await asyncio.gather(*self._writing.values(), return_exceptions=True)  # asked for before close: made
        if self._closed:  # by another close() meanwhile
            return
        self._closed = True
        pools, self._pools = self._pools, {}
        await asyncio.gather(*(pool.close() for pool in pools.values()))
        if self._listener is not None:
            await self._listener.close()
            self._listener = None

    async def ping(self) -> None:
        await self._rows("SELECT 1")

    # -- runs ------------------------------------------------------------------
    async def insert(self, record: RunRecord) -> RunRecord:
        row = sql.to_row(record)

        async def insert(conn: Connection) -> int:
            inserted = await (await conn.execute(_INSERT, row)).fetchone()
            assert inserted is not None  # RETURNING gives a row
            return int(inserted["seq"])
        return record.evolve(seq=await self._write(record.id, insert, durable=True))

    async def update(self, record: RunRecord) -> None:
        row = sql.to_row(record) | {"lost": sql.LOST_PATTERN}
        never_started = record.state.terminal and record.started_at is None  # no result file behind it

        async def update(conn: Connection) -> int:
            return (await conn.execute(_UPDATE, row)).rowcount
        if await self._write(record.id, update, durable=never_started):  # not settled as lost by another node
            self._recent.written(record)

    async def get(self, run_id: str) -> RunRecord | None:
        if (recent := self._recent.get(run_id)) is not None:
            return recent
        rows = await self._rows("SELECT * FROM runs WHERE id = %s", (run_id,))
        return sql.from_row(rows[0]) if rows else None

    async def page(self, state: RunState | None, limit: int, before_seq: int | None,
                   owner: str | None = None) -> list[RunRecord]:
        query, params = sql.page_query(state, limit, before_seq, owner, mark="%s")
        return [sql.from_row(r) for r in await self._rows(query, params)]

    async def unfinished(self) -> list[RunRecord]:
        scope, mine = sql.node_scope(self.node, mark="%s")
        rows = await self._rows(f"SELECT * FROM runs WHERE state = ANY(%s){scope} ORDER BY seq",  # noqa: S608
                                [[str(s) for s in UNFINISHED], *mine])
        return [sql.from_row(r) for r in rows]

    async def finished_before(self, cutoff: float) -> list[str]:
        scope, mine = sql.node_scope(self.node, mark="%s")
        rows = await self._rows(
            f"SELECT id FROM runs WHERE finished_at IS NOT NULL AND finished_at < %s{scope} ORDER BY seq",  # noqa: S608
            [cutoff, *mine])
        return [r["id"] for r in rows]

    async def finished_oldest_first(self) -> list[tuple[str, int]]:
        scope, mine = sql.node_scope(self.node, mark="%s")
        rows = await self._rows(f"SELECT id, stdout_bytes + stderr_bytes AS stored FROM runs "  # noqa: S608
                                f"WHERE finished_at IS NOT NULL{scope} ORDER BY seq", mine)
        return [(r["id"], int(r["stored"])) for r in rows]

    async def delete(self, run_ids: Sequence[str]) -> None:
        self._recent.deleted(run_ids)
        ids = list(run_ids)

        async def delete(conn: Connection) -> None:
            await conn.execute("DELETE FROM runs WHERE id = ANY(%s)", (ids,))
            await conn.execute("DELETE FROM run_inputs WHERE id = ANY(%s)", (ids,))
        await self._statement(delete)

    async def known_ids(self, run_ids: Collection[str]) -> set[str]:
        if not run_ids:
            return set()
        return {r["id"] for r in await self._rows("SELECT id FROM runs WHERE id = ANY(%s)", (list(run_ids),))}

    async def heartbeat(self, node: NodeInfo) -> None:
        row = sql.node_row(node)

        async def beat(conn: Connection) -> None:
            await conn.execute(sql.heartbeat_query("%s"), row)
        await self._statement(beat)

    async def nodes(self) -> list[NodeInfo]:
        return [sql.node_from_row(r) for r in await self._rows("SELECT * FROM nodes ORDER BY name")]

    async def settle_lost(self, now: float, cutoff: float, grace_s: float) -> list[str]:
        me = self.node or ""
        params, requeue = sql.settle_lost_params(now, cutoff, me, grace_s), sql.requeue_lost_params(cutoff, me)

        async def settle(conn: Connection) -> list[str]:
            if await (await conn.execute(sql.requeue_lost_query("%s"), requeue)).fetchall():
                await conn.execute(_WAKE)
            return [r["id"] for r in await (await conn.execute(sql.settle_lost_query("%s"), params)).fetchall()]
        return await self._statement(settle)

    # -- the shared queue --------------------------------------------------------
    async def enqueue(self, record: RunRecord, inputs: RunInputs) -> RunRecord:
        row, stored = sql.to_row(record), sql.inputs_row(record.id, inputs)

        async def enqueue(conn: Connection) -> int:
            async with conn.transaction():  # the run, its inputs and the wake-up, together
                inserted = await (await conn.execute(_INSERT, row)).fetchone()
                await conn.execute(sql.INPUTS_INSERT.format(m="%s"), stored)
                await conn.execute(_WAKE)
            assert inserted is not None
            return int(inserted["seq"])
        return record.evolve(seq=await self._write(record.id, enqueue, durable=True))

    async def claim(self, up_to: int) -> list[tuple[RunRecord, RunInputs]]:
        if up_to <= 0:
            return []
        params = [self.node or "", str(RunState.QUEUED), up_to]

        async def claim(conn: Connection) -> list[tuple[RunRecord, RunInputs]]:
            claimed = await (await conn.execute(sql.claim_query("%s"), params)).fetchall()
            records = sorted((sql.from_row(r) for r in claimed), key=lambda r: r.seq)
            if not records:
                return []
            rows = await (await conn.execute("SELECT * FROM run_inputs WHERE id = ANY(%s)",
                                             ([r.id for r in records],))).fetchall()
            stored = {row["id"]: sql.inputs_from_row(row) for row in rows}
            return [(record, stored[record.id]) for record in records]
        return await self._statement(claim, durable=True)

    async def inputs(self, run_id: str) -> RunInputs | None:
        rows = await self._rows("SELECT * FROM run_inputs WHERE id = %s", (run_id,))
        return sql.inputs_from_row(rows[0]) if rows else None

    async def forget_inputs(self) -> None:
        async def forget(conn: Connection) -> None:
            await conn.execute(sql.FORGET_INPUTS)
        await self._statement(forget)

    async def cancel_unclaimed(self, run_id: str, now: float) -> RunRecord | None:
        params = [str(RunState.CANCELLED), now, self.node or "", run_id, str(RunState.QUEUED)]

        async def cancel(conn: Connection) -> RunRecord | None:
            row = await (await conn.execute(sql.cancel_unclaimed_query("%s"), params)).fetchone()
            return sql.from_row(row) if row else None
        record = await self._write(run_id, cancel, durable=True)
        if record is not None:
            self._recent.written(record)
        return record

    async def wait_for_work(self, timeout_s: float) -> None:
        """On a connection of its own that LISTENs; a lost one is made again
        at the next call (meanwhile the caller's timeout is the wake-up)."""
        try:
            if self._listener is None or self._listener.closed:
                self._listener = await Connection.connect(self.url, **self._connect_args)
                await self._listener.execute(f"LISTEN {QUEUE_CHANNEL}")
            async for _ in self._listener.notifies(timeout=timeout_s, stop_after=1):
                pass
        except psycopg.Error:
            if self._listener is not None:
                await self._listener.close()
            self._listener = None
            await asyncio.sleep(timeout_s)

    async def queued(self) -> int:
        rows = await self._rows("SELECT count(*) AS queued FROM runs WHERE state = %s", (str(RunState.QUEUED),))
        return int(rows[0]["queued"])
