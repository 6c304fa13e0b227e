"""The runs table, for both engines: one list of migrations, written once
with three words that differ between SQLite and PostgreSQL, and the mapping
between a RunRecord and a row."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Literal

from unitbox.limits import Limits
from unitbox.outcome import RunState
from unitbox.store import UNFINISHED, NodeInfo, RunInputs, RunRecord

Dialect = Literal["sqlite", "postgresql"]

# {serial}: the run's order of arrival; {real}: seconds and milliseconds; {int}: counts and
# bytes (memory peaks pass 2^31: PostgreSQL's INTEGER is 32 bits, SQLite's 64).
_WORDS: dict[Dialect, dict[str, str]] = {
    "sqlite": {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL", "int": "INTEGER", "blob": "BLOB"},
    "postgresql": {"serial": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "real": "DOUBLE PRECISION",
                   "int": "BIGINT", "blob": "BYTEA"},
}

_MIGRATIONS: list[str] = [
    # 1: the runs table
    """
    CREATE TABLE runs (
        seq {serial},
        id TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,
        created_at {real} NOT NULL,
        limits TEXT NOT NULL,
        runtime TEXT NOT NULL,
        started_at {real}, finished_at {real},
        exit_code {int}, signal TEXT,
        duration_ms {real}, cpu_ms {real}, memory_peak_bytes {int},
        stdout_bytes {int} NOT NULL DEFAULT 0, stderr_bytes {int} NOT NULL DEFAULT 0,
        stdout_truncated INTEGER NOT NULL DEFAULT 0, stderr_truncated INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX runs_state ON runs(state, seq);
    CREATE INDEX runs_finished ON runs(finished_at);
    """,
    # 2: who submitted each run (a token's name); runs from before stay NULL: only admins see them
    """
    ALTER TABLE runs ADD COLUMN owner TEXT;
    CREATE INDEX runs_owner ON runs(owner, seq);
    """,
    # 3: the ways to run (API v1.1): entrypoint, lint, files in and out
    """
    ALTER TABLE runs ADD COLUMN entrypoint TEXT;
    ALTER TABLE runs ADD COLUMN lint TEXT NOT NULL DEFAULT 'off';
    ALTER TABLE runs ADD COLUMN input_files {int} NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN output_files {int};
    ALTER TABLE runs ADD COLUMN result_bytes {int};
    ALTER TABLE runs ADD COLUMN lint_findings {int};
    """,
    # 4: warm units: the unit a run was handed to, when it is not its own
    """
    ALTER TABLE runs ADD COLUMN unit TEXT;
    """,
    # 5: nodes sharing a PostgreSQL store: the node each run is on, and each node's heartbeat
    """
    ALTER TABLE runs ADD COLUMN node TEXT;
    CREATE INDEX runs_node ON runs(node, state);
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        capacity {int} NOT NULL, running {int} NOT NULL, queued {int} NOT NULL,
        started_at {real} NOT NULL, heartbeat_at {real} NOT NULL
    );
    """,
    # 6: the shared queue: a queued run's inputs, for the node that claims it (files: JSON, base64)
    """
    CREATE TABLE run_inputs (
        id TEXT PRIMARY KEY,
        code {blob} NOT NULL, stdin {blob} NOT NULL, args TEXT NOT NULL, entry TEXT, files TEXT NOT NULL
    );
    CREATE INDEX runs_unclaimed ON runs(seq) WHERE state = 'queued' AND node IS NULL;
    """,
]


def migrations(dialect: Dialect) -> list[str]:
    """Migration N (1-based) is element N-1; a store at version V applies those after it."""
    return [script.format(**_WORDS[dialect]) for script in _MIGRATIONS]


COLUMNS = [f.name for f in fields(RunRecord) if f.name != "seq"]
_FLAGS = ("stdout_truncated", "stderr_truncated", "cancel_requested")


def to_row(record: RunRecord) -> dict[str, Any]:
    row = {name: getattr(record, name) for name in COLUMNS}  # not asdict(): it deep-copies, 7 times slower
    row["limits"] = json.dumps(record.limits.as_dict())
    row["state"] = str(record.state)
    for flag in _FLAGS:  # INTEGER columns in both: PostgreSQL would refuse a boolean
        row[flag] = int(row[flag])
    return row


def from_row(row: Mapping[str, Any]) -> RunRecord:
    values = dict(row)
    values["limits"] = Limits(**json.loads(values["limits"]))
    values["state"] = RunState(values["state"])
    for flag in _FLAGS:
        values[flag] = bool(values[flag])
    return RunRecord(**values)


def page_query(state: RunState | None, limit: int, before_seq: int | None, owner: str | None,
               *, mark: str) -> tuple[str, list[Any]]:
    """A page of the listing, newest first, with `mark` for a parameter (`?` or `%s`)."""
    query = f"SELECT * FROM runs WHERE seq < {mark}"  # noqa: S608 (marks only; values are parameters)
    params: list[Any] = [before_seq if before_seq is not None else 2**62]
    if owner is not None:
        query += f" AND owner = {mark}"
        params.append(owner)
    if state is not None:
        query += f" AND state = {mark}"
        params.append(str(state))
    return query + f" ORDER BY seq DESC LIMIT {mark}", [*params, limit]


def node_scope(node: str | None, *, mark: str) -> tuple[str, list[Any]]:
    """The condition (`AND …`) that keeps a query to `node`'s runs; none for a store of one node."""
    return ("", []) if node is None else (f" AND node = {mark}", [node])


NODE_COLUMNS = [f.name for f in fields(NodeInfo)]


def heartbeat_query(mark: str) -> str:
    """Insert or refresh a node's row (the same statement in SQLite >= 3.24 and PostgreSQL)."""
    marks = ", ".join([mark] * len(NODE_COLUMNS))
    refresh = ", ".join(f"{c} = excluded.{c}" for c in NODE_COLUMNS if c != "name")
    return (f"INSERT INTO nodes ({', '.join(NODE_COLUMNS)}) VALUES ({marks}) "  # noqa: S608
            f"ON CONFLICT (name) DO UPDATE SET {refresh}")


def node_row(node: NodeInfo) -> list[Any]:
    return [getattr(node, c) for c in NODE_COLUMNS]


def node_from_row(row: Mapping[str, Any]) -> NodeInfo:
    return NodeInfo(**{c: row[c] for c in NODE_COLUMNS})


# A run of a node silent for longer than `node_grace_s` ends `error` with this (cluster.py). Its
# node's own later writes leave such a run as it is: a final state does not change.
NODE_LOST = "node lost"


def update_query(mark: str) -> str:
    """A run's row, written by its node, unless another node settled it as lost (`lost` is the LIKE pattern)."""
    changes = ", ".join(f"{c} = {mark.format(c)}" for c in COLUMNS if c != "id")
    return (f"UPDATE runs SET {changes} WHERE id = {mark.format('id')} "  # noqa: S608
            f"AND (error IS NULL OR error NOT LIKE {mark.format('lost')})")


LOST_PATTERN = NODE_LOST + ":%"


def requeue_lost_query(mark: str) -> str:
    """The queued runs of nodes whose last heartbeat is older than the cutoff (not this one), whose
    inputs are in the store: back to the shared queue."""
    return (f"UPDATE runs SET node = NULL WHERE state = {mark} AND node IN "  # noqa: S608
            f"(SELECT name FROM nodes WHERE heartbeat_at < {mark} AND name <> {mark}) "
            "AND id IN (SELECT id FROM run_inputs) RETURNING id")


def requeue_lost_params(cutoff: float, me: str) -> list[Any]:
    return [str(RunState.QUEUED), cutoff, me]


def claim_query(mark: str) -> str:
    """Up to N unclaimed queued runs, oldest first, for this node. `skip_locked`: PostgreSQL's
    FOR UPDATE SKIP LOCKED (SQLite has one writer at a time: nothing to skip)."""
    lock = " FOR UPDATE SKIP LOCKED" if mark == "%s" else ""
    return (f"UPDATE runs SET node = {mark} WHERE seq IN (SELECT seq FROM runs "  # noqa: S608
            f"WHERE state = {mark} AND node IS NULL ORDER BY seq LIMIT {mark}{lock}) RETURNING *")


def cancel_unclaimed_query(mark: str) -> str:
    return (f"UPDATE runs SET state = {mark}, finished_at = {mark}, cancel_requested = 1, node = {mark} "  # noqa: S608
            f"WHERE id = {mark} AND state = {mark} AND node IS NULL RETURNING *")


def inputs_row(run_id: str, inputs: RunInputs) -> list[Any]:
    files = json.dumps([[path, base64.b64encode(content).decode()] for path, content in inputs.files])
    return [run_id, inputs.code, inputs.stdin, json.dumps(inputs.args), inputs.entry, files]


def inputs_from_row(row: Mapping[str, Any]) -> RunInputs:
    files = tuple((path, base64.b64decode(content)) for path, content in json.loads(row["files"]))
    return RunInputs(code=bytes(row["code"]), stdin=bytes(row["stdin"]), args=json.loads(row["args"]),
                     entry=row["entry"], files=files)


# The inputs of finished runs: kept while a run may still need a node (a lost node's queued runs
# go back to the queue), then dropped; the table stays as small as the queue.
FORGET_INPUTS = ("DELETE FROM run_inputs WHERE id IN (SELECT r.id FROM runs r JOIN run_inputs i ON i.id = r.id "
                 "WHERE r.finished_at IS NOT NULL)")
INPUTS_INSERT = "INSERT INTO run_inputs (id, code, stdin, args, entry, files) VALUES ({m}, {m}, {m}, {m}, {m}, {m})"


def settle_lost_query(mark: str) -> str:
    """The unfinished runs of nodes whose last heartbeat is older than the cutoff (not this one): `error`."""
    return (f"UPDATE runs SET state = {mark}, finished_at = {mark}, error = {mark} || node || {mark} "  # noqa: S608
            f"WHERE state IN ({mark}, {mark}, {mark}) AND node IN "
            f"(SELECT name FROM nodes WHERE heartbeat_at < {mark} AND name <> {mark}) RETURNING id")


def settle_lost_params(now: float, cutoff: float, me: str, grace_s: float) -> list[Any]:
    return [str(RunState.ERROR), now, f"{NODE_LOST}: ", f" sent no heartbeat for {grace_s:g} s",
            *(str(s) for s in UNFINISHED), cutoff, me]
