"""A mixed, bounded load of runs with known true outcomes, for the soak and
fault-injection tests: trivial programs, 1 MB of output, failures, timeouts,
memory hogs and cancels at random moments. Each run's expected final state
is known in advance, so every recorded fact can be checked."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tests.support.daemon import TERMINAL, Client


@dataclass(frozen=True)
class Kind:
    name: str
    code: str
    state: str
    limits: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    stdout_bytes: int | None = None
    cancel: bool = False


KINDS = [
    Kind("trivial", "pass", "succeeded", exit_code=0, stdout_bytes=0),
    Kind("print", "import sys\nprint('hello')", "succeeded", exit_code=0, stdout_bytes=6),
    Kind("megabyte", "import sys\nsys.stdout.write('x' * 1_000_000)", "succeeded", exit_code=0,
         stdout_bytes=1_000_000),
    Kind("exit3", "import sys\nsys.exit(3)", "failed", exit_code=3),
    Kind("timeout", "while True:\n    pass", "timed_out", limits={"timeout_s": 0.5}),
    Kind("hog", "x = b'x' * (400 * 2**20)", "oom_killed", limits={"memory_mb": 64}),
    Kind("cancel", "import time\ntime.sleep(30)", "cancelled", cancel=True),
]
WEIGHTS = [40, 15, 10, 10, 10, 8, 7]
TRANSIENT = (OSError, ConnectionError)


@dataclass
class Outcome:
    kind: Kind
    run: dict[str, Any]
    submitted_at: float


class Load:
    """Submit `count` runs from `parallel` threads; retries a submission the
    service refused (503) or could not take (daemon restarting), so every
    run counted was accepted exactly once."""

    def __init__(self, client: Client, count: int, parallel: int = 16, seed: int = 7,
                 kinds: list[Kind] | None = None, weights: list[int] | None = None) -> None:
        self.client = client
        self.count = count
        self.parallel = parallel
        rng = random.Random(seed)
        self.plan = rng.choices(kinds or KINDS, weights=weights or (WEIGHTS if kinds is None else None), k=count)
        self.delays = [rng.uniform(0.0, 0.6) for _ in range(count)]
        self.done = 0
        self.refusals = 0
        self._lock = threading.Lock()

    def _submit(self, kind: Kind) -> str:
        payload = {"code": kind.code, "limits": kind.limits}
        deadline = time.monotonic() + 120
        while True:
            try:
                reply = self.client.post_json("/run-json", payload, timeout=30)
                if reply.status == 202:
                    return str(reply.json()["id"])
                assert reply.status == 503, (reply.status, reply.body)
            except TRANSIENT:
                pass
            with self._lock:
                self.refusals += 1
            assert time.monotonic() < deadline, "the service did not take a submission for 120 s"
            time.sleep(0.2)

    def _wait(self, run_id: str, within_s: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + within_s
        while True:
            try:
                reply = self.client.get(f"/status/{run_id}")
                # 503: the store is down, and the run is not in this daemon's memory (in the shared queue)
                assert reply.status in (200, 503), (reply.status, reply.body)
                if reply.status == 200 and (run := reply.json())["state"] in TERMINAL:
                    return dict(run)
            except TRANSIENT:
                pass
            assert time.monotonic() < deadline, f"run {run_id} did not end within {within_s} s"
            time.sleep(0.05)

    def _one(self, index: int) -> Outcome:
        kind = self.plan[index]
        began = time.time()
        run_id = self._submit(kind)
        if kind.cancel:
            time.sleep(self.delays[index])
            while True:
                try:
                    reply = self.client.request("POST", f"/runs/{run_id}/cancel", timeout=30)
                    if reply.status in (200, 202):
                        break
                except TRANSIENT:
                    pass
                time.sleep(0.2)
        run = self._wait(run_id)
        with self._lock:
            self.done += 1
        return Outcome(kind, run, began)

    def run(self, during: Callable[[Load], None] | None = None) -> list[Outcome]:
        """Run the whole load; `during(load)` runs in this thread meanwhile
        (fault injection), then the results are returned."""
        with ThreadPoolExecutor(self.parallel) as pool:
            futures = [pool.submit(self._one, i) for i in range(self.count)]
            if during is not None:
                during(self)
            return [f.result() for f in futures]


def wrong_facts(outcomes: list[Outcome]) -> list[str]:
    """Every way a recorded run differs from what its program truly did."""
    problems = []
    for outcome in outcomes:
        kind, run = outcome.kind, outcome.run
        where = f"{kind.name} {run['id']}"
        if run["state"] != kind.state:
            problems.append(f"{where}: state {run['state']} (expected {kind.state}; error {run.get('error')})")
            continue
        if kind.exit_code is not None and run["exit_code"] != kind.exit_code:
            problems.append(f"{where}: exit code {run['exit_code']}")
        if kind.stdout_bytes is not None and run["stdout_bytes"] != kind.stdout_bytes:
            problems.append(f"{where}: stdout_bytes {run['stdout_bytes']}")
        # null when the run's whole life fell while the daemon was down (unknown, not wrong)
        if kind.name == "timeout" and run["duration_ms"] is not None and not 400 <= run["duration_ms"] < 3000:
            problems.append(f"{where}: timed out after {run['duration_ms']} ms (limit 500)")
    return problems


def wait_for(predicate: Callable[[], bool], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except TRANSIENT:
            pass
        time.sleep(0.1)
    return False
