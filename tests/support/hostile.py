"""Helpers for the attack catalogue (tests/integration/test_attacks_*.py):
hostile programs report what they observed as one JSON line, and every
catalogue module ends by checking that nothing hostile outlived it."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

from tests.support.daemon import Client, Daemon
from tests.support.testhost import TestHost, wait_until

# Prepended to hostile programs: `attempt` runs a call and names its errno
# ("OK" if it worked), `syscall` does the same for a raw libc call through
# ctypes, `report` prints the observations as the last line of stdout.
PRELUDE = '''\
import ctypes, errno, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def attempt(fn, *a, **k):
    try:
        fn(*a, **k)
        return "OK"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def syscall(name, *args):
    fn = getattr(libc, name)
    ctypes.set_errno(0)
    if fn(*args) == -1:
        return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
    return "OK"
def report(**kw):
    sys.stdout.flush()
    os.write(1, (json.dumps(kw) + "\\n").encode())  # one write: a child printing meanwhile cannot split the line
'''

MiB = 1024 * 1024
# The daemon's RSS when the first catalogue module started (the baseline of
# "memory flat": after the catalogue it must be within 2x of it).
_baseline_rss: dict[int, int] = {}


def hostile(body: str) -> str:
    return PRELUDE + body


def report_of(run: dict[str, Any]) -> dict[str, Any]:
    """The JSON line a hostile program printed last."""
    lines = [line for line in run["stdout"].splitlines() if line.startswith("{")]
    assert lines, f"the program reported nothing: state={run['state']} stdout={run['stdout'][-500:]!r} " \
                  f"stderr={run['stderr'][-2000:]!r}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_hostile(client: Client, body: str, **limits: Any) -> dict[str, Any]:
    return client.run(hostile(body), limits=limits)


def submit_hostile(client: Client, body: str, **limits: Any) -> str:
    return client.submit(hostile(body), limits=limits)


def finished(client: Client, run_id: str, timeout: float = 60) -> dict[str, Any]:
    """Wait for a submitted run and merge its output in (like Client.run)."""
    run = client.wait(run_id, timeout)
    output = client.get(f"/output/{run_id}").json()
    run["stdout"], run["stderr"] = output["stdout"], output["stderr"]
    return run


def wait_running(client: Client, run_id: str, timeout: float = 15) -> None:
    assert wait_until(lambda: client.status(run_id)["state"] == "running", timeout), client.status(run_id)


def main_pid(testhost: TestHost, client: Client, run_id: str) -> int:
    """The run's main process as its siblings see it (the test host's PID space)."""
    out = testhost.run("systemctl", "show", "-P", "MainPID", client.status(run_id)["unit"]).stdout
    return int(out.strip() or 0)


def wait_output(client: Client, run_id: str, needle: str, timeout: float = 15) -> str:
    """Wait until the run's stdout (partial while it runs) contains `needle`."""
    seen = ""

    def has() -> bool:
        nonlocal seen
        seen = client.get(f"/output/{run_id}").json()["stdout"]
        return needle in seen
    assert wait_until(has, timeout), (needle, seen[-500:], client.status(run_id))
    return seen


def slice_pids(testhost: TestHost) -> list[str]:
    """Every process in unitbox.slice (the pids hierarchy exists on v1 and v2) but idle warm units'."""
    idle = " ".join(f"-not -path '*/{unit}/*'" for unit in testhost.idle_warm_units())
    script = ("for d in /sys/fs/cgroup/pids/unitbox.slice /sys/fs/cgroup/unitbox.slice; do "
              f"[ -d $d ] && find $d -name cgroup.procs {idle} -exec cat {{}} +; done; true")
    return testhost.sh(script).split()


def run_units(testhost: TestHost) -> list[str]:
    """Units running a run: runs' own, and warm units handed one."""
    return testhost.units()


def security_score(testhost: TestHost, unit: str) -> float:
    out = testhost.run("systemd-analyze", "security", "--no-pager", unit, check=False).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, out
    return float(match.group(1))


def record_baseline(daemon: Daemon) -> int:
    return _baseline_rss.setdefault(daemon.pid, daemon.rss_kib())


def contained_afterwards(daemon: Daemon, testhost: TestHost) -> Iterator[None]:
    """Body of each catalogue module's module-scoped fixture: after the
    module, no run unit and no process is left in unitbox.slice, the daemon's
    RSS is within 2x of what it was before the catalogue, /healthz is 200."""
    baseline = record_baseline(daemon)
    yield
    assert wait_until(lambda: not run_units(testhost), 20), f"run units left: {run_units(testhost)}"
    assert wait_until(lambda: not slice_pids(testhost), 10), f"processes left in unitbox.slice: {slice_pids(testhost)}"
    rss = daemon.rss_kib()
    assert rss <= 2 * baseline, f"daemon RSS grew from {baseline} KiB to {rss} KiB"
    began = time.monotonic()
    health = daemon.client.get("/healthz", timeout=5)
    assert health.status == 200, health.body
    assert time.monotonic() - began < 1.0
