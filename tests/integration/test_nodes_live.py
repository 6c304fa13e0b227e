"""Three nodes sharing one PostgreSQL store, each the daemon as a real
service in a test host of its own (docs/operations.md "Several nodes").
Every request of a mixed load goes to the next node in turn (submissions,
status polls, cancels; 600 runs); a node whose slots are full queues what it accepts
for any node (the shared queue). Every run ends in its true state exactly
once, each run's unit ran on one host only, and every node gives every
run's record and output alike, even with one node's daemon killed -9
mid-load; a whole host lost ends its runs as `error` after the grace."""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Client, DaemonService, Response
from tests.support.load import Load, Outcome, wait_for, wrong_facts
from tests.support.postgres import Postgres
from tests.support.testhost import TestHost, booted

NODES = ("a", "b", "c")
RUNS = int(os.environ.get("UBX_CLUSTER_RUNS", "600"))  # the mixed load; a quarter of it around the kill
GRACE_S = 10
TOKEN = {name: name[0] * 32 for name in ("root", "alice", "bob")}
TOKENS = "".join(f'[tokens.{name}]\nsecret = "{secret}"\n' + ("admin = true\n" if name == "root" else "")
                 for name, secret in TOKEN.items())


class RoundRobin(Client):
    """Each request to the next node in turn."""

    def __init__(self, clients: list[Client]) -> None:
        super().__init__("")
        self.clients = clients
        self._next = itertools.count()

    def request(self, method: str, path: str, *args: Any, **kwargs: Any) -> Response:
        return self.clients[next(self._next) % len(self.clients)].request(method, path, *args, **kwargs)


@pytest.fixture(scope="module")
def hosts() -> Iterator[dict[str, TestHost]]:
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(booted(f"node{name}")) for name in NODES}


@pytest.fixture
def cluster(postgres: Postgres, hosts: dict[str, TestHost], tmp_path: Path) -> Iterator[dict[str, DaemonService]]:
    url = postgres.new_database()
    services: dict[str, DaemonService] = {}
    try:
        for name, host in hosts.items():
            services[name] = DaemonService(host, tmp_path, name=f"node{name}", config=(
                f'store = "{url}"\nnode = "{name}"\nmax_concurrent = 4\nnode_grace_s = {GRACE_S}\n{TOKENS}'))
            services[name].client.token = TOKEN["root"]  # the loads' client: an admin, it sees every run
            services[name].start()
        yield services
    finally:
        for service in services.values():
            service.stop()


def units_seen(hosts: dict[str, TestHost], run_ids: list[str]) -> dict[str, list[str]]:
    """For each run, the hosts whose journal names its unit."""
    seen: dict[str, list[str]] = {run_id: [] for run_id in run_ids}
    for name, host in hosts.items():
        journal = host.run("journalctl", "--no-pager", "-q", "-o", "cat", check=False).stdout
        for run_id in run_ids:
            if f"unitbox-run-{run_id}.service" in journal:
                seen[run_id].append(name)
    return seen


def every_node_agrees(services: dict[str, DaemonService], outcomes: list[Outcome]) -> None:
    """Each run's record, and its stdout, are the same from every node."""
    for outcome in outcomes:
        run_id = outcome.run["id"]
        records = {name: s.client.status(run_id) for name, s in services.items()}
        facts = {(r["state"], r["exit_code"], r["stdout_bytes"], r["node"]) for r in records.values()}
        assert len(facts) == 1 and next(iter(facts))[3] in NODES, (run_id, records)
        outputs = {name: s.client.get(f"/output/{run_id}?stream=stdout") for name, s in services.items()}
        assert {o.status for o in outputs.values()} == {200}, (run_id, {n: o.body[:200] for n, o in outputs.items()})
        assert {len(o.body) for o in outputs.values()} == {outcome.run["stdout_bytes"]}, run_id
        assert len({o.body for o in outputs.values()}) == 1, run_id


def none_lost_twice_or_misplaced(services: dict[str, DaemonService], hosts: dict[str, TestHost],
                                 outcomes: list[Outcome]) -> None:
    run_ids = [o.run["id"] for o in outcomes]
    for service in services.values():
        listed = [r["id"] for r in service.client.get(f"/runs?limit={len(run_ids) + 10}").json()["runs"]]
        assert sorted(listed) == sorted(run_ids), "a node lists other runs than those accepted"
    seen = units_seen(hosts, run_ids)
    # A run cancelled before it started may have had a unit (cancelled while it was being created) or not.
    started = {o.run["id"] for o in outcomes if o.run["started_at"] is not None}
    wrong = {run_id: where for run_id, where in seen.items() if len(where) > 1 or (run_id in started and not where)}
    assert not wrong, f"units not seen on exactly one host: {list(wrong.items())[:5]}"


def test_three_nodes_share_a_mixed_load_and_any_node_answers_for_any_run(
        cluster: dict[str, DaemonService], hosts: dict[str, TestHost]) -> None:
    client = RoundRobin([s.client for s in cluster.values()])
    outcomes = Load(client, RUNS, parallel=12, seed=11).run()
    problems = wrong_facts(outcomes)
    assert not problems, f"{len(problems)} wrong facts, e.g. {problems[:5]}"
    none_lost_twice_or_misplaced(cluster, hosts, outcomes)
    every_node_agrees(cluster, outcomes)
    nodes = cluster["a"].client.get("/nodes").json()["nodes"]
    assert [(n["name"], n["alive"]) for n in nodes] == [(name, True) for name in NODES]
    ran_on = units_seen(hosts, [o.run["id"] for o in outcomes if o.run["started_at"] is not None])
    assert {where[0] for where in ran_on.values()} == set(NODES), "a node ran none of the load"
    # 12 at a time on 3 nodes of 4 slots, with cancels and timeouts: nodes fill, and runs go through the shared queue.
    claimed = sum(s.journal().count("claimed from the shared queue") for s in cluster.values())
    assert claimed > 0, "no run went through the shared queue"


def test_one_node_killed_mid_load_loses_nothing_and_the_others_go_on(
        cluster: dict[str, DaemonService], hosts: dict[str, TestHost]) -> None:
    client = RoundRobin([s.client for s in cluster.values()])
    victim = cluster["b"]

    def kill_b(load: Load) -> None:
        assert wait_for(lambda: load.done >= RUNS // 12, 180)
        victim.crash()
    outcomes = Load(client, RUNS // 4, parallel=12, seed=12).run(during=kill_b)
    problems = wrong_facts(outcomes)
    assert not problems, f"{len(problems)} wrong facts, e.g. {problems[:5]}\n{victim.journal(100)}"
    assert "recovering run" in victim.journal()
    for name, service in cluster.items():
        if name != "b":
            assert "recovering run" not in service.journal(), f"node {name} recovered runs it did not have"
    none_lost_twice_or_misplaced(cluster, hosts, outcomes)
    every_node_agrees(cluster, outcomes)


def test_a_run_stays_its_owners_on_every_node(cluster: dict[str, DaemonService]) -> None:
    """A request for another token's run is relayed with the caller's own token, and the node
    that runs it answers as for an unknown id; its owner reads it from any node."""
    alice, bob = (Client(cluster["a"].client.base_url, TOKEN[name]) for name in ("alice", "bob"))
    run = alice.run("print('mine')")
    for node in cluster.values():
        as_alice = Client(node.client.base_url, TOKEN["alice"])
        as_bob = Client(node.client.base_url, TOKEN["bob"])
        assert as_alice.get(f"/output/{run['id']}?stream=stdout").body == b"mine\n"
        for path in (f"/status/{run['id']}", f"/output/{run['id']}", f"/runs/{run['id']}/code",
                     f"/runs/{run['id']}/events", f"/runs/{run['id']}/files"):
            refused = as_bob.get(path)
            unknown = as_bob.get(path.replace(run["id"], "0123456789abcdef"))
            assert (refused.status, refused.body) == (404, unknown.body.replace(b"0123456789abcdef", run["id"].encode()))
        assert as_bob.request("POST", f"/runs/{run['id']}/cancel").status == 404
        assert as_bob.get("/runs").json()["runs"] == [] and as_bob.get("/nodes").status == 403
    assert bob.get(f"/status/{run['id']}").status == 404


def test_a_whole_host_lost_for_good_ends_its_runs_as_error_after_the_grace(
        cluster: dict[str, DaemonService], hosts: dict[str, TestHost]) -> None:
    """Last in the module: it stops node c's test host for good."""
    doomed = [cluster["c"].client.submit("import time\ntime.sleep(120)") for _ in range(3)]
    assert wait_for(lambda: all(cluster["c"].client.status(r)["state"] == "running" for r in doomed), 60)
    elsewhere = Load(RoundRobin([cluster["a"].client, cluster["b"].client]), 40, parallel=8, seed=13)
    lost_at = time.monotonic()
    cluster.pop("c")
    hosts["c"].stop()  # the machine is gone: its daemon, its systemd, its units
    outcomes = elsewhere.run()
    problems = wrong_facts(outcomes)
    assert not problems, f"{len(problems)} wrong facts on the nodes left, e.g. {problems[:5]}"

    def settled_everywhere() -> bool:
        return all(s.client.status(r)["state"] == "error" for s in cluster.values() for r in doomed)
    assert wait_for(settled_everywhere, GRACE_S + 30), [cluster["a"].client.status(r) for r in doomed]
    nodes = {n["name"]: n for n in cluster["a"].client.get("/nodes").json()["nodes"]}
    assert {name: n["alive"] for name, n in nodes.items()} == {"a": True, "b": True, "c": False}
    for run_id in doomed:
        run = cluster["a"].client.status(run_id)
        assert run["error"] == f"node lost: c sent no heartbeat for {GRACE_S} s"
        ended = datetime.datetime.fromisoformat(run["finished_at"]).timestamp()
        assert ended - nodes["c"]["heartbeat_at"] >= GRACE_S  # not before the grace
    assert time.monotonic() - lost_at < GRACE_S + 30
    lost_output = cluster["a"].client.get(f"/output/{doomed[0]}")
    assert lost_output.status == 503 and b"node 'c'" in lost_output.body
