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
SLOTS = os.cpu_count() or 1  # each node's max_concurrent (the default)
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


def log_after(path: Path, offset: int) -> str:
    with path.open() as log:
        log.seek(offset)
        return log.read()


def phase(server: Postgres, database: str, daemons: list[Any], clients: list[Any], *, runs: int, ways: int,
          beat_calls_s: float, beat_ms_s: float) -> dict[str, Any]:
    """`runs` trivial runs, wait=true, each to the next node, `ways` at a time: the database's cost per run
    (the heartbeats' share taken out), and how many went through the shared queue."""
    reset(server, database)
    mark, marks = server.log.stat().st_size, [d.log.stat().st_size for d in daemons]
    cpu_before, started = cpu_s(server), time.perf_counter()
    order = itertools.cycle(clients)
    with ThreadPoolExecutor(ways) as pool:
        replies = list(pool.map(lambda c: c.post_json("/run-json?wait=true", {"code": "pass"}, timeout=120),
                                [next(order) for _ in range(runs)]))
    elapsed, cpu_used = time.perf_counter() - started, cpu_s(server) - cpu_before
    busy, busy_logged = statements(server, database), logged(server, mark)
    failed = [(r.status, r.body[:300]) for r in replies if r.status != 200 or r.json()["state"] != "succeeded"]
    assert not failed, f"{len(failed)} runs did not succeed, e.g. {failed[:3]}"
    queued = sum(log_after(d.log, m).count("claimed from the shared queue") for d, m in zip(daemons, marks,
                                                                                         strict=True))
    return {"ways": ways, "runs_per_s": runs / elapsed, "through_the_queue": queued / runs,
            "statements": (sum(busy_logged.values()) - beat_calls_s * elapsed) / runs,
            "by_kind": {kind: round(count / runs, 2) for kind, count in sorted(busy_logged.items())},
            "server_exec_ms": (busy["exec_ms"] - beat_ms_s * elapsed) / runs,
            "server_cpu_ms": cpu_used * 1000 / runs}


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
            phases = {}
            for name, ways in (("direct", len(NODES) * SLOTS), ("through the queue", 2 * len(NODES) * SLOTS)):
                print(f"==> {args.runs} trivial runs, wait=true, each to the next node, {ways} at a time ({name})")
                phases[name] = phase(server, database, daemons, clients, runs=args.runs, ways=ways,
                                     beat_calls_s=beat_calls_per_node_s * len(NODES),
                                     beat_ms_s=beat_ms_per_node_s * len(NODES))
            print(f"==> claim latency: {args.claims} runs of 0.3 s to node a only, {SLOTS * 2 + 1} at a time")
            marks = [d.log.stat().st_size for d in daemons]
            with ThreadPoolExecutor(SLOTS * 2 + 1) as pool:
                sleepers = list(pool.map(lambda _: clients[0].post_json(
                    "/run-json?wait=true", {"code": "import time\ntime.sleep(0.3)"}, timeout=120), range(args.claims)))
            claims = sorted(float(ms) for d, mark in zip(daemons, marks, strict=True) for ms in re.findall(
                r"claimed from the shared queue, ([0-9.]+) ms after", log_after(d.log, mark)))
        failed = [(r.status, r.body[:300]) for r in sleepers if r.status != 200 or r.json()["state"] != "succeeded"]
        assert not failed, f"{len(failed)} runs did not succeed, e.g. {failed[:3]}"
    finally:
        server.destroy()
    per_run = phases["through the queue"]
    direct = phases["direct"]
    per_core = {name: 1000 / ph["server_cpu_ms"] for name, ph in phases.items()}
    claim_ms = {"n": len(claims), "p50": claims[len(claims) // 2] if claims else None,
                "p99": claims[min(len(claims) - 1, len(claims) * 99 // 100)] if claims else None}
    result.update({"claim_latency_ms": claim_ms, "runs": args.runs, "per_run": phases,
                   "heartbeat_per_node_s": {"statements": beat_calls_per_node_s, "server_exec_ms": beat_ms_per_node_s},
                   "runs_per_s_per_postgresql_core": per_core,
                   "nodes_per_postgresql_core": {k: v / NODE_RUNS_PER_S for k, v in per_core.items()}})
    s1, s16 = stores["1-way"], stores["16-way"]

    def row(name: str, ph: dict[str, Any]) -> str:
        kinds = ", ".join(f"{k} {v:g}" for k, v in ph["by_kind"].items())
        return (f"| {name} ({ph['ways']} at a time, {ph['through_the_queue']:.0%} through the queue, "
                f"{ph['runs_per_s']:.1f} runs/s) | {ph['statements']:.1f} ({kinds}) | {2 * ph['statements']:.1f} | "
                f"{ph['server_exec_ms']:.2f} ms | {ph['server_cpu_ms']:.2f} ms | "
                f"≈{1000 / ph['server_cpu_ms']:.0f} runs/s, "
                f"≈{1000 / ph['server_cpu_ms'] / NODE_RUNS_PER_S:.0f} nodes |")
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
        f"Three nodes ({SLOTS} slots each), {args.runs} trivial runs each way (wait=true, each to the next node). "
        "Per run, heartbeats taken out: statements (each its own transaction, by kind, from the server's log), "
        "round trips (the pool checks each connection it hands out with an empty query, which the log does "
        "not show), the server's execution time and its processes' CPU, and what one PostgreSQL core takes "
        f"at that cost (nodes of {NODE_RUNS_PER_S} runs/s, a 2-core node's full-profile rate):",
        "",
        "| load | statements | round trips | execution | CPU | one core takes |",
        "|---|---|---:|---:|---:|---|",
        row("direct", direct),
        row("through the queue", per_run),
        "",
        f"A node's heartbeat: {beat_calls_per_node_s:.1f} statements/s, "
        f"{beat_ms_per_node_s:.2f} ms/s of server time.",
        "",
        f"Claim latency, from queued on a busy node to claimed by a free one ({claim_ms['n']} of {args.claims} "
        f"runs sent to node a alone went through the shared queue): p50 **{claim_ms['p50'] or 0:.1f} ms**, "
        f"p99 **{claim_ms['p99'] or 0:.1f} ms**.",
    ]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
