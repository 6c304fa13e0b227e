"""The broker on a real systemd (issue "systemd off the event loop"): killed
with runs in flight, it is replaced and no run is lost or started twice;
while PID 1 is frozen, /healthz still answers at once and says so."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonService
from tests.support.load import wait_for
from tests.support.testhost import TestHost, booted

SLEEPER = "import time\ntime.sleep(4)\nprint('ok')\n"


@pytest.fixture(scope="module")
def host() -> Iterator[TestHost]:
    with booted("broker") as testhost:
        yield testhost


def starts_of(host: TestHost, run_id: str) -> int:
    """How many times the run was started: systemd began starting its own unit (that unit's
    journal's "Starting …" lines), or the broker handed it to a warm unit (its log line)."""
    out = host.run("journalctl", "--no-pager", "-o", "cat", f"UNIT=unitbox-run-{run_id}.service",
                   check=False).stdout
    handed = host.run("journalctl", "--no-pager", "-o", "cat", f"UNITBOX_RUN_ID={run_id}", check=False).stdout
    return sum(1 for line in out.splitlines() if line.startswith("Starting ")) + \
        sum(1 for line in handed.splitlines() if line.startswith(f"run {run_id} handed to "))


def test_kill_9_of_the_broker_with_50_runs_in_flight(host: TestHost, tmp_path: Path) -> None:
    service = DaemonService(host, tmp_path, name="brokerkill", config="max_concurrent = 50\nqueue_size = 200\n")
    service.start()
    try:
        client = service.client
        first = [client.submit(SLEEPER) for _ in range(50)]
        assert wait_for(lambda: client.get("/healthz").json().get("running") == 50, 60), client.get("/healthz").body
        old = service.broker_pid
        os.kill(old, signal.SIGKILL)
        health: list[tuple[float, int, str]] = []
        later: list[str] = []

        def keep_submitting() -> None:
            for _ in range(30):
                later.append(client.submit(SLEEPER))
                time.sleep(0.05)
        submitter = threading.Thread(target=keep_submitting)
        submitter.start()
        began = time.monotonic()
        while time.monotonic() - began < 20:
            reply = client.get("/healthz")
            health.append((time.monotonic() - began, reply.status, reply.json().get("reason") or ""))
            if reply.status == 200 and any(status == 503 for _, status, _ in health):
                break
            time.sleep(0.02)
        submitter.join(30)
        # The truth while it is gone: 503 naming the broker as soon as the daemon sees it die (EOF, ms).
        down = [(at, reason) for at, status, reason in health if status == 503]
        assert down and down[0][0] < 0.5 and "broker" in down[0][1], health[:5]
        assert health[-1][1] == 200, health[-3:]
        assert service.broker_pid != old
        for run_id in first + later:
            run = client.wait(run_id, timeout=120)
            assert (run["state"], run["exit_code"]) == ("succeeded", 0), run
            assert client.get(f"/output/{run_id}").json()["stdout"] == "ok\n"
        assert len(later) == 30
        assert [run_id for run_id in first + later if starts_of(host, run_id) != 1] == []
        assert "the broker is back" in service.journal()
    finally:
        service.stop()


def test_healthz_answers_at_once_while_pid_1_is_stopped(host: TestHost, tmp_path: Path) -> None:
    service = DaemonService(host, tmp_path, name="frozen")
    service.start()
    try:
        client = service.client
        assert client.get("/healthz").status == 200
        answers: list[tuple[float, int, str]] = []
        os.kill(host.pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            while time.monotonic() - began < 3:
                sent = time.monotonic()
                reply = client.get("/healthz", timeout=2)
                answers.append((time.monotonic() - sent, reply.status, reply.json().get("reason", "")))
                time.sleep(0.1)
        finally:
            os.kill(host.pid, signal.SIGCONT)
        slowest = max(took for took, _, _ in answers)
        print(f"/healthz while PID 1 was stopped: {len(answers)} answers, slowest {slowest * 1000:.1f} ms")
        assert slowest < 0.05, answers
        late = [(status, reason) for took, status, reason in answers[-10:]]  # ≥ 2 s into the stall
        assert all(status == 503 and "systemd does not answer" in reason for status, reason in late), late
        assert wait_for(lambda: client.get("/healthz").status == 200, 30)
        assert client.run("print(1)")["state"] == "succeeded"
    finally:
        service.stop()


def test_a_start_that_pid_1_answers_too_late_is_found_not_repeated(host: TestHost, tmp_path: Path) -> None:
    """PID 1 frozen past the broker's 5 s method-call timeout while a start is
    in flight: the call fails unanswered, PID 1 then starts the unit anyway,
    and the daemon finds it by looking instead of starting it again."""
    service = DaemonService(host, tmp_path, name="late")
    service.start()
    try:
        client = service.client
        os.kill(host.pid, signal.SIGSTOP)
        try:
            run_id = client.submit("print('late but once')")
            time.sleep(6.5)  # past SYSTEMD_BUS_TIMEOUT=5s: the broker's StartTransientUnit gives up
        finally:
            os.kill(host.pid, signal.SIGCONT)
        run = client.wait(run_id, timeout=60)
        assert (run["state"], run["exit_code"]) == ("succeeded", 0), (run, service.journal(30))
        assert client.get(f"/output/{run_id}").json()["stdout"] == "late but once\n"
        assert starts_of(host, run_id) == 1
        assert "went unanswered" in service.journal()
    finally:
        service.stop()
