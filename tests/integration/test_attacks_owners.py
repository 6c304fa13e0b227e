"""The attack catalogue, part 4: a token holder against other holders' runs,
and limits systemd cannot start a run with ("Hardening found by attacking
the running service", findings on run ownership and tasks).

The daemon here has two ordinary tokens (alice, bob) and an admin (ops).
Bob knows the id of alice's run (ids leak: logs, shared links, a shoulder):
every endpoint must answer him as if it did not exist."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.support.daemon import VENV_UNITBOX, Client, Daemon, serving
from tests.support.hostile import contained_afterwards, wait_output, wait_running
from tests.support.testhost import TestHost

SECRETS = {"alice": "alice-7f3a9c", "bob": "bob-51d0e2", "ops": "ops-c8b4aa"}
CONFIG = f"""
[tokens.alice]
secret = "{SECRETS['alice']}"
[tokens.bob]
secret = "{SECRETS['bob']}"
[tokens.ops]
secret = "{SECRETS['ops']}"
admin = true
"""
UNKNOWN = "0123456789abcdef"
SECRET_OUTPUT = "alice's confidential result"
LONG_RUN = f"import time\nprint({SECRET_OUTPUT!r}, flush=True)\ntime.sleep(60)\n"


@pytest.fixture(scope="module")
def owners_daemon(testhost: TestHost, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from serving(testhost, tmp_path_factory.mktemp("owners"), CONFIG, "owners")


@pytest.fixture(scope="module", autouse=True)
def _contained(owners_daemon: Daemon, testhost: TestHost) -> Iterator[None]:
    yield from contained_afterwards(owners_daemon, testhost)


def as_token(daemon: Daemon, name: str) -> Client:
    return Client(daemon.client.base_url, token=SECRETS[name])


@pytest.fixture
def alice(owners_daemon: Daemon) -> Client:
    return as_token(owners_daemon, "alice")


@pytest.fixture
def bob(owners_daemon: Daemon) -> Client:
    return as_token(owners_daemon, "bob")


@pytest.fixture
def ops(owners_daemon: Daemon) -> Client:
    return as_token(owners_daemon, "ops")


def listed(client: Client) -> set[str]:
    reply = client.get("/runs?limit=1000")
    assert reply.status == 200, reply.body
    return {run["id"] for run in reply.json()["runs"]}


def assert_looks_unknown(client: Client, method: str, path: str, run_id: str) -> None:
    reply = client.request(method, path.format(run_id))
    unknown = client.request(method, path.format(UNKNOWN))
    assert (reply.status, unknown.status) == (404, 404), (method, path, reply.status, reply.body[:300])
    assert reply.body.replace(run_id.encode(), b"ID") == unknown.body.replace(UNKNOWN.encode(), b"ID")
    assert SECRET_OUTPUT.encode() not in reply.body


def test_another_token_cannot_read_list_or_cancel_a_run(alice: Client, bob: Client, ops: Client) -> None:
    run_id = alice.submit(LONG_RUN, limits={"timeout_s": 30})
    wait_running(alice, run_id)
    wait_output(alice, run_id, SECRET_OUTPUT)
    for method, path in [("GET", "/output/{}"), ("GET", "/status/{}"), ("GET", "/output/{}?stream=stdout"),
                         ("GET", "/output/{}?stream=stderr"), ("POST", "/runs/{}/cancel"), ("DELETE", "/runs/{}")]:
        assert_looks_unknown(bob, method, path, run_id)
    assert run_id not in listed(bob)
    # Bob's cancels did nothing: the run is still going, its owner and an admin see it.
    assert alice.status(run_id)["state"] == "running"
    assert run_id in listed(alice) and run_id in listed(ops)
    assert ops.get(f"/output/{run_id}?stream=stdout").body.decode().startswith(SECRET_OUTPUT)
    assert ops.status(run_id)["owner"] == "alice"
    reply = alice.post_json(f"/runs/{run_id}/cancel", None)
    assert reply.status == 202, reply.body
    assert alice.wait(run_id)["state"] == "cancelled"


def test_a_finished_run_stays_its_owners(alice: Client, bob: Client, ops: Client) -> None:
    run = alice.run(f"print({SECRET_OUTPUT!r})")
    assert run["state"] == "succeeded" and run["stdout"] == SECRET_OUTPUT + "\n"
    assert_looks_unknown(bob, "GET", "/output/{}", run["id"])
    assert_looks_unknown(bob, "GET", "/status/{}", run["id"])
    assert run["id"] not in listed(bob)
    assert run["owner"] == "alice"
    assert ops.get(f"/output/{run['id']}").json()["stdout"] == SECRET_OUTPUT + "\n"


def test_runs_lists_each_token_only_its_own_and_an_admin_all(alice: Client, bob: Client, ops: Client) -> None:
    mine, theirs = alice.run("print(1)")["id"], bob.run("print(2)")["id"]
    assert mine in listed(alice) and theirs not in listed(alice)
    assert theirs in listed(bob) and mine not in listed(bob)
    assert {mine, theirs} <= listed(ops)
    newest_of_alice = alice.get("/runs?limit=1").json()["runs"]  # bob's newer run does not take the page
    assert [r["id"] for r in newest_of_alice] == [mine]


def test_an_admin_cancels_anyones_run(alice: Client, ops: Client) -> None:
    run_id = alice.submit(LONG_RUN, limits={"timeout_s": 30})
    wait_running(alice, run_id)
    assert ops.request("DELETE", f"/runs/{run_id}").status == 202
    assert alice.wait(run_id)["state"] == "cancelled"


def test_tasks_below_what_systemd_needs_is_a_422_naming_the_minimum(alice: Client) -> None:
    reply = alice.post_json("/run-json?wait=true", {"code": "print(1)", "limits": {"tasks": 1}})
    assert reply.status == 422, (reply.status, reply.body[:500])
    error = reply.json()["error"]
    assert error["details"] == [{"field": "limits.tasks", "message": error["details"][0]["message"]}]
    assert "at least 2" in error["message"]
    # The minimum is real: with 2, a program and a thread of it run.
    run = alice.run("import threading\nt = threading.Thread(target=print, args=('ok',))\nt.start(); t.join()\n",
                    limits={"tasks": 2})
    assert (run["state"], run["stdout"]) == ("succeeded", "ok\n"), run


def test_check_config_json_prints_no_secret(owners_daemon: Daemon, testhost: TestHost) -> None:
    out = testhost.run(str(VENV_UNITBOX), "--config", owners_daemon.config_path, "check-config", "--json").stdout
    tokens = json.loads(out)["tokens"]
    assert set(tokens) == {"alice", "bob", "ops"} and tokens["ops"]["admin"] is True
    for secret in SECRETS.values():
        assert secret not in out
