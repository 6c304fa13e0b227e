"""The attack catalogue, part 4: filling the daemon's disk and flooding the
kernel with OOM kills (findings 5 and 6 of "Hardening found by attacking the
running service"). Each attack goes through the HTTP API to a real daemon on
the systemd test host; what is measured is the state directory as it lies on
disk, the answers the attacker gets, and the kernel's own OOM kill count."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Client, Daemon, Response
from tests.support.hostile import MiB, contained_afterwards, run_hostile
from tests.support.testhost import TestHost, wait_until


@pytest.fixture(scope="module", autouse=True)
def _contained(daemon: Daemon, testhost: TestHost) -> Iterator[None]:
    yield from contained_afterwards(daemon, testhost)


def stored_bytes(runs_dir: Path) -> int:
    """Everything stored under the run directories, as the disk has it now."""
    total = 0
    for parent, _, files in os.walk(runs_dir):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except FileNotFoundError:
                continue
    return total


class PeakSampler:
    """Samples stored_bytes every 50 ms in the background; remembers the peak."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = runs_dir
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, stored_bytes(self.runs_dir))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def submit_until_accepted(client: Client, payload: dict[str, Any], refusals: list[Response],
                          timeout: float = 30) -> dict[str, Any]:
    """Submit (waiting for the result) like a client that honours 503s; every refusal is kept."""
    deadline = time.monotonic() + timeout
    while True:
        reply = client.post_json("/run-json?wait=true", payload)
        if reply.status == 200:
            run: dict[str, Any] = reply.json()
            return run
        assert reply.status == 503, (reply.status, reply.body)
        refusals.append(reply)
        assert time.monotonic() < deadline, f"still refused after {timeout} s: {reply.body!r}"
        time.sleep(0.1)


def assert_budget_refusals(refusals: list[Response]) -> None:
    assert refusals, "no submission was refused although the budget was used up"
    for reply in refusals:
        error = reply.json()["error"]
        assert error["code"] == "unavailable" and "Retry-After" in reply.headers, reply.body
        assert "retention.max_total_mb" in error["message"], error


@pytest.fixture
def budget_daemon(testhost: TestHost, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    config, name = request.param
    server = Daemon(testhost, tmp_path, config=config, name=name)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        testhost.sh(f"rm -rf {server.state_dir}", check=False)


FLOOD = (
    "import os\n"
    "chunk = b'x' * (1 << 20)\n"
    "for _ in range(64):\n"
    "    os.write(1, chunk)\n"
    "    os.write(2, chunk)\n"
)


@pytest.mark.parametrize("budget_daemon", [("[retention]\nmax_total_mb = 100\n", "budget")], indirect=True)
def test_64_mib_per_stream_back_to_back_never_fills_more_than_max_total_mb(budget_daemon: Daemon) -> None:
    """Finding 5: one client, runs writing 64 MiB to each stream back to back,
    stored 178 MiB/s while retention slept for interval_s (300 s)."""
    client, budget = budget_daemon.client, 100 * MiB
    runs_dir = budget_daemon.host.path(f"{budget_daemon.state_dir}/daemon/runs")
    refusals: list[Response] = []
    runs = []
    with PeakSampler(runs_dir) as sampler:
        for _ in range(4):
            payload = {"code": FLOOD, "limits": {"output_kb": 65536, "timeout_s": 30}}
            runs.append(submit_until_accepted(client, payload, refusals))
        # Retention brings it back down at once, not after interval_s (300 s).
        assert wait_until(lambda: stored_bytes(runs_dir) <= 0.9 * budget, 5), stored_bytes(runs_dir)
    for run in runs:
        assert run["state"] == "succeeded", run  # never blocked or killed for printing
        assert run["stdout_bytes"] + run["stderr_bytes"] <= budget, run
        assert run["stdout_truncated"] or run["stderr_truncated"], run
    assert sampler.peak <= budget + 64 * 1024, f"{sampler.peak / MiB:.1f} MiB stored, budget 100 MiB"
    assert_budget_refusals(refusals)


@pytest.mark.parametrize("budget_daemon", [("[retention]\nmax_total_mb = 4\n", "inputs")], indirect=True)
def test_large_code_and_stdin_fill_the_budget_too(budget_daemon: Daemon) -> None:
    """Code and stdin are stored with every run: they count like output."""
    client, budget = budget_daemon.client, 4 * MiB
    runs_dir = budget_daemon.host.path(f"{budget_daemon.state_dir}/daemon/runs")
    big = 900 * 1024
    payloads = [{"code": "#" * big + "\npass\n"}, {"code": "pass\n", "stdin": "s" * big}]
    refusals: list[Response] = []
    with PeakSampler(runs_dir) as sampler:
        runs = [submit_until_accepted(client, payloads[i % 2], refusals) for i in range(10)]
    assert [run["state"] for run in runs] == ["succeeded"] * 10
    assert_budget_refusals(refusals)
    assert sampler.peak <= budget, f"{sampler.peak / MiB:.2f} MiB stored, budget 4 MiB"
    assert stored_bytes(runs_dir) <= budget
    # The oldest went to make room; the newest are still there.
    assert client.get(f"/status/{runs[0]['id']}").status == 404
    assert client.get(f"/status/{runs[-1]['id']}").status == 200


def test_state_filesystem_below_its_free_floor_refuses_new_runs(testhost: TestHost, tmp_path: Path) -> None:
    """The state filesystem's free space is checked too: the default floor
    (retention.min_free_mb = 512) on a 520 MB state filesystem."""
    server = Daemon(testhost, tmp_path, name="floor")
    state = server.state_dir
    testhost.mount_tmpfs(state, "520m")
    try:
        server.start()
        client = server.client
        before = client.run("print('room')")
        assert before["state"] == "succeeded" and before["stdout"] == "room\n", before
        testhost.sh(f"dd if=/dev/zero of={state}/filler bs=1M count=24 2>/dev/null")
        time.sleep(1.1)  # free space is looked at once a second
        refused = [client.post_json("/run-json", {"code": "print(1)"}) for _ in range(3)]
        assert [r.status for r in refused] == [503] * 3, [r.body for r in refused]
        for reply in refused:
            error = reply.json()["error"]
            assert error["code"] == "unavailable" and "Retry-After" in reply.headers, reply.body
            assert "retention.min_free_mb = 512" in error["message"], error
        assert client.get("/healthz").status == 200  # reads and runs in flight go on
        assert client.get(f"/output/{before['id']}").json()["stdout"] == "room\n"
        testhost.sh(f"rm -f {state}/filler")
        assert wait_until(lambda: client.post_json("/run-json?wait=true", {"code": "print(2)"}).status == 200, 5)
    finally:
        server.stop()
        testhost.unmount(state)


OOM_FLOOD = (
    "import os, time\n"
    "report(started=time.time())\n"
    "while True:\n"
    "    pid = os.fork()\n"
    "    if pid == 0:\n"
    "        hog = bytearray(256 << 20)\n"
    "        os._exit(0)\n"
    "    os.waitpid(pid, 0)\n"
)


def test_children_overrunning_memory_in_a_loop_end_the_run_at_the_first_oom_kill(
        client: Client, daemon: Daemon, testhost: TestHost) -> None:
    """Finding 6: on cgroup v1, OOMPolicy=kill does not end the unit when a
    child is OOM-killed; a loop of such children made 163 OOM kills in 5 s
    (≈ 775 kernel log lines) and the run ended `succeeded`."""
    run = run_hostile(client, OOM_FLOOD, memory_mb=64, timeout_s=10)
    assert run["state"] == "oom_killed", run
    assert run["signal"] == "SIGKILL", run
    result = testhost.path(f"{daemon.state_dir}/ends/{run['id']}/result").read_text()
    kills = int(dict(line.split("=", 1) for line in result.splitlines())["oom_kill"])
    assert 1 <= kills <= 5, (kills, result)  # the kernel's own count, from the run's memory cgroup
    assert run["duration_ms"] < 1500, run  # stopped at once, not at timeout_s (10 s)
