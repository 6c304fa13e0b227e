"""The SQLite store (the default): WAL mode under the state directory, schema
versioned with PRAGMA user_version. One worker thread owns the connection, so the
event loop never waits on the disk. Whatever goes wrong in SQLite is a 503
(Unavailable), never a 500: the request may succeed later, or on a repaired
store.

Durability: the INSERT that accepts a run commits with synchronous=FULL (the
WAL is synced before the 202 is sent) and RunDir.create syncs the run's files,
so an acknowledged run survives a power loss. Later state changes commit with
NORMAL: a power loss may undo the last ones, and recovery re-derives them
from systemd and the result file. Cost (bench/durability.py, dev VM, ext4 on
virtio, medians of 300): INSERT 0.42 vs 0.32 ms (FULL vs NORMAL),
RunDir.create 0.65 vs 0.18 ms (fsync vs none): ≈0.6 ms per submission, so
it is always on. A disk with a slow cache flush pays that flush up to 7 times.

A final record is not synced before it is reported: committed (in the WAL,
so a daemon crash keeps it), and after a power loss recovery finds the run
unfinished and takes its end from the result file (Action.FINISH). Only a
run that never started has no result file to fall back on (cancelled while
queued, failed to launch): its final record is synced, or it would run again.

Writes are group-committed (`_write`): those that arrive while one commit is
under way share the next transaction. Measured (bench/per_run_cost.py, CPU
per run of insert + running + final, 2-core VM): 1-way ≈0.88 ms either way;
16-way 0.87 → 0.24 ms. Of one NORMAL update's ≈0.22 ms, SQLite is ≈0.05 ms;
the rest is the hop to the store's thread and back, which a batch shares.

Why not aiosqlite: it too runs one connection on a thread of its own, but
has no group commit and no way to switch synchronous=FULL around one
transaction; wrapping it would keep every line here and add a dependency."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from unitbox.errors import Unavailable
from unitbox.outcome import RunState
from unitbox.store import UNFINISHED, NodeInfo, RecentFinals, RunInputs, RunRecord, unavailable_message
from unitbox.store import schema as sql

T = TypeVar("T")

_IDS_PER_QUERY = 500  # bound parameters per statement (SQLite's limit was 999 before 3.32)

_INSERT = f"INSERT INTO runs ({', '.join(sql.COLUMNS)}) VALUES ({', '.join(':' + c for c in sql.COLUMNS)})"  # noqa: S608
_UPDATE = sql.update_query(":{}")
MIGRATIONS = sql.migrations("sqlite")


def _unavailable(exc: sqlite3.Error) -> Unavailable:
    """What went wrong, in words, for the 503's message."""
    if isinstance(exc, sqlite3.OperationalError):  # disk full, read-only, locked, I/O error
        problem = "cannot be read or written"
    elif isinstance(exc, sqlite3.IntegrityError):
        problem = "refused a change"
    elif isinstance(exc, sqlite3.DatabaseError):  # "file is not a database", "disk image is malformed"
        problem = "is damaged"
    else:
        problem = "failed"
    return Unavailable(unavailable_message(problem, exc))


def _caused(exc: sqlite3.Error) -> Unavailable:
    unavailable = _unavailable(exc)
    unavailable.__cause__ = exc
    return unavailable


_Write = tuple[Callable[[sqlite3.Connection], Any], bool, "asyncio.Future[Any]"]


class SqliteStore:
    def __init__(self, path: Path, *, node: str | None = None) -> None:
        self.path = path
        self.node = node
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unitbox-store")
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._recent = RecentFinals()
        self._writes: list[_Write] = []  # waiting for the next group commit
        self._writer: asyncio.Future[None] | None = None  # committing them

    # -- plumbing --------------------------------------------------------------
    async def _call(self, fn: Callable[[], T]) -> T:
        """`fn` on the store's thread, its SQLite errors turned into Unavailable."""
        if self._closed:  # the executor is shut down: it would raise RuntimeError
            raise Unavailable("the run store is closed")
        return await self._in_thread(fn)

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        def call() -> T:
            try:
                return fn()
            except sqlite3.Error as exc:
                raise _caused(exc) from exc
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn` (a read) in one transaction on the store's thread."""
        return await self._call(lambda: self._transaction(fn, durable=False))

    def _transaction(self, fn: Callable[[sqlite3.Connection], T], durable: bool) -> T:
        """`fn` in one transaction: committed, or rolled back on error.
        `durable`: the commit is on disk before this returns (synchronous=FULL)."""
        db = self._db
        if db is None:
            raise Unavailable("the run store is not open")
        if not durable:
            with db:
                return fn(db)
        # SQLite refuses to change the safety level inside a transaction:
        # set it around one (`with db:` begins it at the first write).
        db.execute("PRAGMA synchronous=FULL")
        try:
            with db:
                return fn(db)
        finally:
            db.execute("PRAGMA synchronous=NORMAL")

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        """`fn` in the next group commit: writes that arrive while one is
        being committed go together in the next transaction (FULL if any of
        them is `durable`). Returns once it is committed."""
        if self._closed:
            raise Unavailable("the run store is closed")
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._writes.append((fn, durable, done))
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._commit_writes())
        return await asyncio.shield(done)  # cancelled or not, the write is made: the caller cannot tell

    async def _commit_writes(self) -> None:
        batch: list[_Write] = []
        try:
            while self._writes:
                batch, self._writes = self._writes, []
                try:
                    results = await self._in_thread(functools.partial(self._commit, batch))
                except Exception as exc:  # each write of the batch gets it
                    results = [exc] * len(batch)
                for (_, _, done), result in zip(batch, results, strict=True):
                    if isinstance(result, BaseException):
                        done.set_exception(result)
                        done.exception()  # retrieved: a caller that went away leaves no warning
                    else:
                        done.set_result(result)
        finally:  # cancelled (the loop is closing): nobody waits forever
            for _, _, done in [*batch, *self._writes]:
                done.cancel()
            self._writes = []
            self._writer = None

    def _commit(self, batch: list[_Write]) -> list[Any]:
        """One transaction for the batch; if it fails, each write alone, so
        one bad write cannot take the others down with it."""
        durable = any(write[1] for write in batch)
        try:
            return self._transaction(lambda db: [fn(db) for fn, _, _ in batch], durable)
        except sqlite3.Error as exc:
            if len(batch) == 1:
                return [_caused(exc)]
        results: list[Any] = []
        for fn, durable, _ in batch:
            try:
                results.append(self._transaction(fn, durable))
            except sqlite3.Error as exc:
                results.append(_caused(exc))
        return results

    def _open(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                db.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")
            db.isolation_level = "DEFERRED"  # back to implicit transactions for `with db:`
            self.path.chmod(0o600)
        except BaseException:
            db.close()
            raise
        self._db = db

    async def open(self) -> None:
        await self._call(self._open)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # from now on calls answer Unavailable; those already queued run first
        if self._writer is not None:
            await asyncio.shield(self._writer)

        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
        await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown(wait=True)

    # -- runs ------------------------------------------------------------------
    async def insert(self, record: RunRecord) -> RunRecord:
        row = sql.to_row(record)

        def insert(db: sqlite3.Connection) -> int:
            return int(db.execute(_INSERT, row).lastrowid or 0)
        return record.evolve(seq=await self._write(insert, durable=True))

    async def update(self, record: RunRecord) -> None:
        row = sql.to_row(record) | {"lost": sql.LOST_PATTERN}
        never_started = record.state.terminal and record.started_at is None  # no result file behind it
        written = await self._write(lambda db: db.execute(_UPDATE, row).rowcount, durable=never_started)
        if written:  # not a run another node settled as lost: its row is what this node knows
            self._recent.written(record)

    async def get(self, run_id: str) -> RunRecord | None:
        if (recent := self._recent.get(run_id)) is not None:
            return recent  # a final record just written: what the store holds, without the thread hop

        def get(db: sqlite3.Connection) -> RunRecord | None:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            return sql.from_row(row) if row else None
        return await self._run(get)

    async def page(self, state: RunState | None, limit: int, before_seq: int | None,
                   owner: str | None = None) -> list[RunRecord]:
        """Newest first: up to `limit` runs older than `before_seq` (only `owner`'s, if given)."""
        query, params = sql.page_query(state, limit, before_seq, owner, mark="?")

        def page(db: sqlite3.Connection) -> list[RunRecord]:
            return [sql.from_row(r) for r in db.execute(query, params)]
        return await self._run(page)

    async def unfinished(self) -> list[RunRecord]:
        scope, mine = sql.node_scope(self.node, mark="?")
        states = [str(s) for s in UNFINISHED]

        def unfinished(db: sqlite3.Connection) -> list[RunRecord]:
            rows = db.execute(f"SELECT * FROM runs WHERE state IN (?, ?, ?){scope} ORDER BY seq", [*states, *mine])  # noqa: S608
            return [sql.from_row(r) for r in rows]
        return await self._run(unfinished)

    async def finished_before(self, cutoff: float) -> list[str]:
        scope, mine = sql.node_scope(self.node, mark="?")
        return await self._run(lambda db: [r[0] for r in db.execute(
            f"SELECT id FROM runs WHERE finished_at IS NOT NULL AND finished_at < ?{scope} ORDER BY seq",  # noqa: S608
            [cutoff, *mine])])

    async def finished_oldest_first(self) -> list[tuple[str, int]]:
        scope, mine = sql.node_scope(self.node, mark="?")
        return await self._run(lambda db: [(r[0], r[1]) for r in db.execute(
            f"SELECT id, stdout_bytes + stderr_bytes FROM runs WHERE finished_at IS NOT NULL{scope} ORDER BY seq",  # noqa: S608
            mine)])

    async def delete(self, run_ids: Sequence[str]) -> None:
        self._recent.deleted(run_ids)
        ids = [(i,) for i in run_ids]

        def delete(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM runs WHERE id = ?", ids)
            db.executemany("DELETE FROM run_inputs WHERE id = ?", ids)
        await self._write(delete)

    async def known_ids(self, run_ids: Collection[str]) -> set[str]:
        """Those of `run_ids` that have a record."""
        wanted = list(run_ids)

        def known(db: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(wanted), _IDS_PER_QUERY):
                chunk = wanted[start:start + _IDS_PER_QUERY]
                marks = ", ".join("?" * len(chunk))
                found.update(r[0] for r in db.execute(f"SELECT id FROM runs WHERE id IN ({marks})", chunk))  # noqa: S608
            return found
        return await self._run(known)

    async def heartbeat(self, node: NodeInfo) -> None:
        row = sql.node_row(node)
        await self._write(lambda db: db.execute(sql.heartbeat_query("?"), row))

    async def nodes(self) -> list[NodeInfo]:
        rows = "SELECT * FROM nodes ORDER BY name"
        return await self._run(lambda db: [sql.node_from_row(r) for r in db.execute(rows)])

    async def settle_lost(self, now: float, cutoff: float, grace_s: float) -> list[str]:
        me = self.node or ""
        params, requeue = sql.settle_lost_params(now, cutoff, me, grace_s), sql.requeue_lost_params(cutoff, me)

        def settle(db: sqlite3.Connection) -> list[str]:
            db.execute(sql.requeue_lost_query("?"), requeue).fetchall()
            return [r[0] for r in db.execute(sql.settle_lost_query("?"), params)]
        return await self._write(settle)

    # -- the shared queue: one node with SQLite, but the same contract ---------------
    async def enqueue(self, record: RunRecord, inputs: RunInputs) -> RunRecord:
        row, stored = sql.to_row(record), sql.inputs_row(record.id, inputs)

        def enqueue(db: sqlite3.Connection) -> int:
            seq = int(db.execute(_INSERT, row).lastrowid or 0)
            db.execute(sql.INPUTS_INSERT.format(m="?"), stored)
            return seq
        return record.evolve(seq=await self._write(enqueue, durable=True))

    async def claim(self, up_to: int) -> list[tuple[RunRecord, RunInputs]]:
        if up_to <= 0:
            return []
        params = [self.node or "", str(RunState.QUEUED), up_to]

        def claim(db: sqlite3.Connection) -> list[tuple[RunRecord, RunInputs]]:
            records = sorted((sql.from_row(r) for r in db.execute(sql.claim_query("?"), params).fetchall()),
                             key=lambda r: r.seq)
            found = []
            for record in records:
                row = db.execute("SELECT * FROM run_inputs WHERE id = ?", (record.id,)).fetchone()
                found.append((record, sql.inputs_from_row(row)))
            return found
        return await self._write(claim)

    async def inputs(self, run_id: str) -> RunInputs | None:
        def read(db: sqlite3.Connection) -> RunInputs | None:
            row = db.execute("SELECT * FROM run_inputs WHERE id = ?", (run_id,)).fetchone()
            return sql.inputs_from_row(row) if row else None
        return await self._run(read)

    async def forget_inputs(self) -> None:
        await self._write(lambda db: db.execute(sql.FORGET_INPUTS))

    async def cancel_unclaimed(self, run_id: str, now: float) -> RunRecord | None:
        params = [str(RunState.CANCELLED), now, self.node or "", run_id, str(RunState.QUEUED)]

        def cancel(db: sqlite3.Connection) -> RunRecord | None:
            row = db.execute(sql.cancel_unclaimed_query("?"), params).fetchone()
            return sql.from_row(row) if row else None
        record = await self._write(cancel, durable=True)
        if record is not None:
            self._recent.written(record)
        return record

    async def wait_for_work(self, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)  # no other node to hear from

    async def queued(self) -> int:
        return await self._run(lambda db: int(db.execute(
            "SELECT count(*) FROM runs WHERE state = ?", (str(RunState.QUEUED),)).fetchone()[0]))

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())
