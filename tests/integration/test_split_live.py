"""The packaged split on a real systemd (the shipped units in a test host):
either part restarts alone and loses nothing — a run started before ends
with its true outcome and its whole output."""

from __future__ import annotations

import time

import pytest

from tests.support.daemon import warm_ready
from tests.support.split import Split
from tests.support.testhost import wait_until

SLOW = "import time\nprint('before', flush=True)\ntime.sleep(4)\nprint('after')\n"


def _broker_unit(split: Split) -> str:
    assert wait_until(lambda: len(split.brokers()) == 1, 10), split.brokers()
    return split.brokers()[0]


@pytest.mark.parametrize("how", ["restart the daemon", "kill the broker", "stop the broker"])
def test_either_part_restarted_alone_loses_no_run(split: Split, how: str) -> None:
    client = split.client
    assert wait_until(lambda: warm_ready(client) >= 1, 30)  # the split's config has a pool: the run is handed one
    run_id = client.submit(SLOW)
    assert wait_until(lambda: client.status(run_id)["state"] == "running", 15)
    assert client.status(run_id)["unit"].startswith("unitbox-warm-"), client.status(run_id)
    broker = _broker_unit(split)
    match how:
        case "restart the daemon":
            split.host.run("systemctl", "restart", "unitbox.service")
        case "kill the broker":
            split.host.run("systemctl", "kill", "-s", "KILL", broker)
        case "stop the broker":
            split.host.run("systemctl", "stop", broker)
    split.wait_healthy()
    run = client.wait(run_id, timeout=60)
    assert (run["state"], run["exit_code"]) == ("succeeded", 0), (run, split.journal())
    assert client.get(f"/output/{run_id}").json()["stdout"] == "before\nafter\n"
    # A broker of the daemon's new connection serves the next run; the old one is gone.
    assert wait_until(lambda: split.brokers() and split.brokers() != [broker], 15), split.brokers()
    assert client.run("print('next')")["stdout"] == "next\n"
    time.sleep(0.1)
    assert len(split.brokers()) == 1, split.brokers()


def test_the_packaged_broker_answers_a_pooled_run_at_its_program_s_exit(split: Split) -> None:
    """Its own unit's sandbox still lets it hear systemd's PropertiesChanged and see the run's box."""
    client = split.client
    assert wait_until(lambda: warm_ready(client) >= 1, 30)
    reply = client.post_json("/run-json?wait=true", {"code": "print('x')"})
    answer = reply.json()
    assert answer["unit"].startswith("unitbox-warm-") and answer["stdout"] == "x\n", answer
    assert answer["state"] == "succeeded" and answer["cpu_ms"] is None, answer  # before the unit's end
    assert client.complete(answer)["cpu_ms"] is not None
