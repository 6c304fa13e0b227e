"""The run store: one interface (RunStore), two engines behind it.

- `sqlite.py`, the default: a file under the state directory, nothing to
  set up (one node).
- `postgres.py`, for `store = "postgresql://…"`: a PostgreSQL database,
  the first step to nodes sharing one (docs/operations.md "PostgreSQL").

Both apply the same migrations (`schema.py`) and pass the same contract
tests (tests/unit/test_store_contract.py). Whatever goes wrong in either is
Unavailable (a 503), never a 500: the request may succeed later."""

from __future__ import annotations

import collections
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from unitbox.config import Config
from unitbox.errors import ConfigError
from unitbox.limits import Limits
from unitbox.outcome import RunState


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: str
    state: RunState
    created_at: float
    limits: Limits
    runtime: str = "default"
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    signal: str | None = None
    duration_ms: float | None = None
    cpu_ms: float | None = None
    memory_peak_bytes: int | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    error: str | None = None
    cancel_requested: bool = False
    owner: str | None = None  # the name of the token that submitted it; None without tokens
    entrypoint: str | None = None  # the function called (its value is the result); None: run as a script
    lint: str = "off"  # profile.LintMode: off, before (then run), only
    input_files: int = 0
    output_files: int | None = None  # files collected when it ended; None: none were there
    result_bytes: int | None = None  # size of the entrypoint's value as JSON; None: no value
    lint_findings: int | None = None  # None: no lint report
    unit: str | None = None  # the warm unit it was handed to (broker/warm.py); None: its own unitbox-run-<id>
    node: str | None = None  # the node that accepted and runs it (a PostgreSQL store); None: the only one
    seq: int = 0

    def evolve(self, **changes: Any) -> RunRecord:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A daemon sharing the store, as its last heartbeat told."""

    name: str
    url: str  # where the other nodes relay requests for its runs
    capacity: int  # max_concurrent
    running: int
    queued: int
    started_at: float
    heartbeat_at: float

    def evolve(self, **changes: Any) -> NodeInfo:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class RunInputs:
    """What RunDir.create writes: kept in a shared store for a queued run,
    so whichever node claims it can stage it."""

    code: bytes
    stdin: bytes
    args: list[str]
    entry: str | None = None  # "<function> <result cap>" (entrypoint runs)
    files: tuple[tuple[str, bytes], ...] = ()


class RunStore(Protocol):
    """What the engine, recovery and retention ask of a store. Every method
    raises Unavailable when the store cannot answer.

    `node`: the node this daemon is in a shared store (None: the store is its
    own). Recovery and retention see only that node's runs: another node's
    unfinished runs are its own to settle, its files are on its disk."""

    node: str | None

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...

    async def insert(self, record: RunRecord) -> RunRecord:
        """Records a new run, durably before it returns (the 202 follows);
        returns it with its `seq`."""
        ...

    async def update(self, record: RunRecord) -> None: ...
    async def get(self, run_id: str) -> RunRecord | None: ...

    async def page(self, state: RunState | None, limit: int, before_seq: int | None,
                   owner: str | None = None) -> list[RunRecord]:
        """Newest first: up to `limit` runs older than `before_seq` (only `owner`'s, if given)."""
        ...

    async def unfinished(self) -> list[RunRecord]:
        """This node's runs not in a terminal state, oldest first (for restart reconciliation)."""
        ...

    async def finished_before(self, cutoff: float) -> list[str]:
        """This node's runs that finished before `cutoff`, oldest first."""
        ...

    async def finished_oldest_first(self) -> list[tuple[str, int]]:
        """(id, stored output bytes) of every finished run of this node, oldest first."""
        ...

    async def delete(self, run_ids: Sequence[str]) -> None: ...

    async def known_ids(self, run_ids: Collection[str]) -> set[str]:
        """Those of `run_ids` that have a record."""
        ...

    async def heartbeat(self, node: NodeInfo) -> None:
        """Records (or refreshes) a node's row."""
        ...

    async def nodes(self) -> list[NodeInfo]:
        """Every node that ever beat, by name."""
        ...

    async def queued(self) -> int:
        """Runs queued on any node."""
        ...

    async def settle_lost(self, now: float, cutoff: float, grace_s: float) -> list[str]:
        """For every other node whose last heartbeat is older than `cutoff`:
        its queued runs whose inputs are in the store go back to the shared
        queue; its other unfinished runs end as `error` ("node lost: …").
        The ids of those ended. A run so ended keeps that end: its node's
        later updates leave it alone."""
        ...

    # -- the shared queue (several nodes) --------------------------------------
    async def enqueue(self, record: RunRecord, inputs: RunInputs) -> RunRecord:
        """Records a run that no node has taken yet (`node` None), with its
        inputs, durably; wakes the nodes waiting for work."""
        ...

    async def claim(self, up_to: int) -> list[tuple[RunRecord, RunInputs]]:
        """Takes up to `up_to` unclaimed queued runs for this node, oldest
        first; none is ever taken by two nodes."""
        ...

    async def inputs(self, run_id: str) -> RunInputs | None: ...

    async def forget_inputs(self) -> None:
        """Drops the inputs of finished runs (the node that ran them staged them)."""
        ...

    async def cancel_unclaimed(self, run_id: str, now: float) -> RunRecord | None:
        """Cancels a run no node has taken yet (then it is this node's); None
        if it was taken (or is not queued) meanwhile."""
        ...

    async def wait_for_work(self, timeout_s: float) -> None:
        """Returns when a run was queued for any node to take (or after
        `timeout_s`: the nodes also look now and then)."""
        ...


UNFINISHED = (RunState.QUEUED, RunState.STARTING, RunState.RUNNING)
RECENT_FINAL = 1024


class RecentFinals:
    """The last final records written: the reads that follow a run's end (a
    held `wait`, then its output) are answered from here. A final record
    changes only through update() and delete(), which keep this true."""

    def __init__(self) -> None:
        self._records: collections.OrderedDict[str, RunRecord] = collections.OrderedDict()

    def written(self, record: RunRecord) -> None:
        if record.state.terminal:
            self._records[record.id] = record
            if len(self._records) > RECENT_FINAL:
                self._records.popitem(last=False)

    def get(self, run_id: str) -> RunRecord | None:
        return self._records.get(run_id)

    def deleted(self, run_ids: Sequence[str]) -> None:
        for run_id in run_ids:
            self._records.pop(run_id, None)


def unavailable_message(problem: str, exc: BaseException | str) -> str:
    """The 503's message, the same words for either engine."""
    return f"the run store {problem}: {exc}"


def ensure_store_support(config: Config) -> None:
    """At start: a PostgreSQL store needs psycopg to find libpq, a Debian
    package of its own (the .deb only suggests it)."""
    if config.store is None:
        return
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"store = {config.store!r} needs PostgreSQL's client library: apt install libpq5 "
                          f"({exc})") from exc


def open_store(config: Config) -> RunStore:
    """The store `config.store` names: SQLite under the state directory
    unless it is a PostgreSQL URL."""
    if config.store is None:
        from unitbox.store.sqlite import SqliteStore
        return SqliteStore(config.database_path)
    from unitbox.store.postgres import PostgresStore  # psycopg (and libpq) only when asked for
    return PostgresStore(config.store, node=config.node_name)
