"""Nodes sharing PostgreSQL (docs/operations.md "Several nodes"): what one
run costs the database, and what a node's heartbeat costs.

Round trips are counted from the server's log (log_statement = all).

1. The store alone (no systemd, no HTTP): the three writes of a run's life
   (accepted, running, final) through the SQLite and the PostgreSQL store,
   one run at a time (ms per run, the coordination on a run's path) and 16
   at a time (runs/s).
2. Three nodes in three test hosts on one throw-away PostgreSQL server (with
   pg_stat_statements): N trivial runs, wait=true, each to the next node,
   12 at a time. Per run: the statements the server executed (each a round
   trip, BEGIN and COMMIT included), its transactions, the server's
   execution time, and the CPU its processes used (from /proc). Before it,
   an idle spell gives a node's heartbeat cost per second.
3. The claim latency: runs sent to node a only, 5 at a time, each
   sleeping 0.3 s: a's slots fill, the rest go to the shared queue, and b
   and c (free) claim them. From the nodes' logs: how long after it was
   queued each run was claimed (NOTIFY, the claim, p50 and p99).
4. From those: how many nodes one PostgreSQL core serves.

    sudo .venv/bin/python bench/cluster.py [--runs 300] [--out bench/results/cluster]

`make bench-cluster` runs it. Not part of `make test` or `make bench`; run
it on a quiet machine."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "daemon"))

from unitbox.limits import Limits  # noqa: E402
from unitbox.outcome import RunState  # noqa: E402
from unitbox.store import RunRecord, RunStore  # noqa: E402
from unitbox.store.postgres import PostgresStore  # noqa: E402
from unitbox.store.sqlite import SqliteStore  # noqa: E402

from tests.support.daemon import serving  # noqa: E402
from tests.support.postgres import Postgres, server_binaries  # noqa: E402
from tests.support.testhost import booted  # noqa: E402

NODES = ("a", "b", "c")
NODE_RUNS_PER_S = 20  # one node on 2 cores, full profile (README "Performance")
IDLE_S = 20


async def store_cost(store: RunStore, runs: int, ways: int) -> float:
    """Seconds for `runs` run lives (insert, running, final), `ways` at a time."""
    await store.open()
    counter = itertools.count()

    async def life() -> None:
        record = await store.insert(RunRecord(id=f"{next(counter):016x}", state=RunState.QUEUED,
                                              created_at=time.time(), limits=Limits(), node=store.node))
        running = record.evolve(state=RunState.RUNNING, started_at=time.time())
        await store.update(running)
        await store.update(running.evolve(state=RunState.SUCCEEDED, finished_at=time.time(), exit_code=0))

    async def worker(share: int) -> None:
        for _ in range(share):
            await life()
    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker(runs // ways) for _ in range(ways)))
        return time.perf_counter() - started
    finally:
        await store.close()


def cpu_s(server: Postgres) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in server.processes():
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def logged(server: Postgres, since: int) -> dict[str, int]:
    """Statements the server logged (log_statement = all) after byte `since` of its log, by first word:
    each one a round trip from a node (pg_stat_statements leaves some utility statements out)."""
    with server.log.open() as log:
        log.seek(since)
        found = re.findall(r"LOG:  (?:statement|execute [^:]*): (\w+)", log.read())
    return dict(collections.Counter(word.upper() for word in found))


def statements(server: Postgres, database: str) -> dict[str, Any]:
    """Server execution time since the last reset, in `database`, with the statements that took it."""
    rows = server.psql("SELECT calls, total_exec_time, regexp_replace(query, '\\s+', ' ', 'g') FROM "
                       "pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = "
                       "current_database()) AND query NOT LIKE '%pg_stat_statements%' ORDER BY calls DESC",
                       database).splitlines()
    parsed = [(int(c), float(t), q) for c, t, q in (row.split("|", 2) for row in rows)]
    return {"exec_ms": sum(t for _, t, _ in parsed),
            "top": [{"calls": c, "exec_ms": round(t, 1), "query": q[:100]} for c, t, q in parsed[:8]]}


def reset(server: Postgres, database: str) -> None:
    server.psql("SELECT pg_stat_statements_reset()", database)


def main() -> None:  # noqa: PLR0915 (one measurement after the other, as the docstring lists them)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--store-runs", type=int, default=960)
    parser.add_argument("--claims", type=int, default=120)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/cluster")
    args = parser.parse_args()
    bindir = server_binaries()
    if bindir is None:
        sys.exit("bench/cluster.py needs Debian's postgresql package (make bench-cluster installs it)")
    load = os.getloadavg()
    server = Postgres(bindir, settings={"shared_preload_libraries": "pg_stat_statements"})
    result: dict[str, Any] = {"load_at_start": load, "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        server.create()
        print("==> the store alone: a run's three writes, SQLite and PostgreSQL, 1 and 16 at a time")
        stores: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="unitbox-bench-cluster-") as tmp:
            for ways in (1, 16):
                sqlite = asyncio.run(store_cost(SqliteStore(Path(tmp) / f"s{ways}.db"), args.store_runs, ways))
                postgres = asyncio.run(store_cost(PostgresStore(server.new_database(), node="a"),
                                                  args.store_runs, ways))
                stores[f"{ways}-way"] = {"sqlite_ms_per_run": sqlite * 1000 / args.store_runs,
                                         "postgresql_ms_per_run": postgres * 1000 / args.store_runs,
                                         "sqlite_runs_per_s": args.store_runs / sqlite,
                                         "postgresql_runs_per_s": args.store_runs / postgres}
                print(f"    {ways:2}-way: SQLite {stores[f'{ways}-way']['sqlite_ms_per_run']:.2f} ms/run, "
                      f"PostgreSQL {stores[f'{ways}-way']['postgresql_ms_per_run']:.2f} ms/run")
        result["store"] = stores

        url = server.new_database()
        database = url.rsplit("/", 1)[1]
        server.psql("CREATE EXTENSION pg_stat_statements", database)
        server.psql(f"ALTER DATABASE {database} SET log_statement = 'all'", database)
        print("==> three nodes in three test hosts on that server")
        with tempfile.TemporaryDirectory(prefix="unitbox-bench-cluster-") as tmp, contextlib.ExitStack() as stack:
            hosts = [stack.enter_context(booted(f"bench-node{n}")) for n in NODES]
            daemons = [stack.enter_context(contextlib.contextmanager(serving)(
                host, Path(tmp), f'store = "{url}"\nnode = "{name}"\n', f"node{name}"))
                for host, name in zip(hosts, NODES, strict=True)]
            clients = [d.client for d in daemons]
            for client in clients:  # warm the caches and connections
                for _ in range(5):
                    assert client.post_json("/run-json?wait=true", {"code": "pass"}).status == 200
            print(f"==> idle for {IDLE_S} s: the heartbeats alone")
            reset(server, database)
            mark = server.log.stat().st_size
            time.sleep(IDLE_S)
            idle, idle_logged = statements(server, database), logged(server, mark)
            beat_calls_per_node_s = sum(idle_logged.values()) / len(NODES) / IDLE_S
            beat_ms_per_node_s = idle["exec_ms"] / len(NODES) / IDLE_S
            print(f"==> {args.runs} trivial runs, wait=true, each to the next node, 12 at a time")
            reset(server, database)
            mark = server.log.stat().st_size
            cpu_before, started = cpu_s(server), time.perf_counter()
            order = itertools.cycle(clients)
            with ThreadPoolExecutor(12) as pool:
                replies = list(pool.map(lambda c: c.post_json("/run-json?wait=true", {"code": "pass"}, timeout=120),
                                        [next(order) for _ in range(args.runs)]))
            elapsed, cpu_used = time.perf_counter() - started, cpu_s(server) - cpu_before
            busy, busy_logged = statements(server, database), logged(server, mark)
            print(f"==> claim latency: {args.claims} runs of 0.3 s to node a only, 5 at a time")
            with ThreadPoolExecutor(5) as pool:
                sleepers = list(pool.map(lambda _: clients[0].post_json(
                    "/run-json?wait=true", {"code": "import time\ntime.sleep(0.3)"}, timeout=120), range(args.claims)))
            claims = sorted(float(ms) for d in daemons for ms in re.findall(
                r"claimed from the shared queue, ([0-9.]+) ms after", d.log.read_text()))
        assert all(r.status == 200 and r.json()["state"] == "succeeded" for r in replies + sleepers), \
            "a run did not succeed"
    finally:
        server.destroy()
    beats = beat_calls_per_node_s * len(NODES) * elapsed
    per_run = {"statements": (sum(busy_logged.values()) - beats) / args.runs,
               "by_kind": {kind: round(count / args.runs, 2) for kind, count in busy_logged.items()},
               "explicit_transactions": busy_logged.get("COMMIT", 0) / args.runs,
               "server_exec_ms": (busy["exec_ms"] - beat_ms_per_node_s * len(NODES) * elapsed) / args.runs,
               "server_cpu_ms": cpu_used * 1000 / args.runs}
    per_core = 1000 / per_run["server_cpu_ms"]
    claim_ms = {"n": len(claims), "p50": claims[len(claims) // 2] if claims else None,
                "p99": claims[min(len(claims) - 1, len(claims) * 99 // 100)] if claims else None}
    result.update({"claim_latency_ms": claim_ms, "runs": args.runs, "elapsed_s": elapsed,
                   "runs_per_s": args.runs / elapsed, "per_run": per_run,
                   "heartbeat_per_node_s": {"statements": beat_calls_per_node_s, "server_exec_ms": beat_ms_per_node_s},
                   "top_statements": busy["top"], "runs_per_s_per_postgresql_core": per_core,
                   "nodes_per_postgresql_core": per_core / NODE_RUNS_PER_S})
    s1, s16 = stores["1-way"], stores["16-way"]
    lines = [
        "# Nodes sharing PostgreSQL: the database's cost per run (bench/cluster.py)",
        "",
        f"{result['at']}, load average at the start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; the server, "
        "the three test hosts and the client on one 2-core VM; PostgreSQL over loopback TCP.",
        "",
        "The store alone, a run's three writes (accepted, running, final):",
        "",
        "| | SQLite | PostgreSQL |",
        "|---|---:|---:|",
        f"| 1 at a time, ms per run | {s1['sqlite_ms_per_run']:.2f} | {s1['postgresql_ms_per_run']:.2f} |",
        f"| 16 at a time, runs/s | {s16['sqlite_runs_per_s']:.0f} | {s16['postgresql_runs_per_s']:.0f} |",
        "",
        f"Three nodes, {args.runs} trivial runs (wait=true, round-robin, 12 at a time, "
        f"{args.runs / elapsed:.1f} runs/s on this one machine), per run:",
        "",
        f"- statements: **{per_run['statements']:.1f}**, each its own transaction "
        f"({', '.join(f'{k} {v:g}' for k, v in sorted(per_run['by_kind'].items()))}, heartbeats included); "
        f"round trips: **{2 * per_run['statements']:.1f}** (the pool checks each connection it hands out "
        "with an empty query, which the log does not show);",
        f"- server execution time: **{per_run['server_exec_ms']:.2f} ms**; "
        f"PostgreSQL's CPU: **{per_run['server_cpu_ms']:.2f} ms**;",
        f"- a node's heartbeat: {beat_calls_per_node_s:.1f} statements/s, "
        f"{beat_ms_per_node_s:.2f} ms/s of server time.",
        "",
        f"Claim latency (queued on a busy node to claimed by a free one, {claim_ms['n']} of {args.claims} runs "
        f"went through the shared queue): p50 **{claim_ms['p50'] or 0:.1f} ms**, "
        f"p99 **{claim_ms['p99'] or 0:.1f} ms**.",
        "",
        f"One PostgreSQL core takes ≈{per_core:.0f} runs/s: ≈**{per_core / NODE_RUNS_PER_S:.0f} nodes** of "
        f"{NODE_RUNS_PER_S} runs/s each (a 2-core node's full-profile rate).",
    ]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
