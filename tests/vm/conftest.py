"""The VM tier: the .deb of a Debian release installed in a real VM of that
release (systemd as PID 1, cgroup v2) booted under qemu: Debian 12 (bookworm,
systemd 252) or Debian 13 (trixie, systemd 257), as $UNITBOX_VM_DIST says.
`make vm-test` (and so `make test`) builds the packages and images and runs
this tier once per release; elsewhere it is skipped."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
VM_SH = REPO / "tests" / "vm" / "vm.sh"
TERMINAL = {"succeeded", "failed", "timed_out", "oom_killed", "cancelled", "error"}
# The release of this session's VM, and the Debian version each release's
# package carries in its own (unitbox_0.2.0~deb12_amd64.deb).
DIST = os.environ.get("UNITBOX_VM_DIST", "bookworm")
RELEASES = {"bookworm": 12, "trixie": 13}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vm/" in str(item.path) and not os.environ.get("UNITBOX_VM_TEST"):
            item.add_marker(pytest.mark.skip(reason="the Debian VM tier runs under `make vm-test` (part of `make test`)"))


def step(what: str, result: object) -> None:
    """One line of the operator story, with its result, in the test output."""
    print(f"\n    [vm] {what}\n         -> {result}", flush=True)


class VM:
    def __init__(self) -> None:
        self.runs: dict[str, str] = {}  # name -> run id, shared by the steps

    def sh(self, command: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run a shell command in the guest as root."""
        done = subprocess.run(["bash", str(VM_SH), "ssh", command], capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"in the VM: {command!r} exited {done.returncode}\n"
                                 f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}")
        return done

    def out(self, command: str, **kwargs: Any) -> str:
        return self.sh(command, **kwargs).stdout.strip()

    def put(self, source: Path, dest: str) -> None:
        subprocess.run(["bash", str(VM_SH), "put", str(source), dest], check=True, timeout=300)

    def curl(self, method: str, path: str, payload: Any = None, max_time: float = 120) -> Any:
        """The API, the way an operator on the machine reaches it: curl to 127.0.0.1:8080."""
        command = f"curl -sS --max-time {max_time} -X {method} "
        if payload is not None:
            command += f"-H 'Content-Type: application/json' -d {shlex.quote(json.dumps(payload))} "
        command += shlex.quote(f"http://127.0.0.1:8080{path}")
        return json.loads(self.out(command, timeout=max_time + 60))

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sh("curl -sf --max-time 5 http://127.0.0.1:8080/healthz", check=False).returncode == 0:
                return
            time.sleep(2)
        raise AssertionError(f"the daemon did not answer /healthz within {timeout} s:\n"
                             + self.out("systemctl status unitbox --no-pager; journalctl -u unitbox -n 30 --no-pager; "
                                        "journalctl -u 'unitbox-broker*' -n 30 --no-pager", check=False))

    def wait_run(self, run_id: str, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run: dict[str, Any] = self.curl("GET", f"/status/{run_id}")
            if run["state"] in TERMINAL or time.monotonic() > deadline:
                return run
            time.sleep(1)


def _package_for(release: str) -> Path | None:
    """The package built for `release` among $UNITBOX_DEBS (make vm-test lists every release's)."""
    for name in os.environ.get("UNITBOX_DEBS", "").split():
        if f"~deb{RELEASES[release]}_" in name and (REPO / name).is_file():
            return REPO / name
    return None


@pytest.fixture(scope="session")
def deb() -> Path:
    path = _package_for(DIST)
    if path is None:
        pytest.fail(f"no package for {DIST} in UNITBOX_DEBS={os.environ.get('UNITBOX_DEBS')!r}: "
                    "run `make deb` (make vm-test does)")
    return path


@pytest.fixture(scope="session")
def other_deb() -> Path:
    """The package of the other release, which this VM must refuse."""
    other = next(release for release in RELEASES if release != DIST)
    path = _package_for(other)
    if path is None:
        pytest.skip(f"the {other} package is not built (make vm-test DIST={DIST})")
    return path


@pytest.fixture(scope="session")
def previous_deb() -> Path:
    """unitbox 0.1.0 as landed (built from its commit for Debian 12): the upgrade's start."""
    if DIST != "bookworm":
        pytest.skip("0.1.0 was built for Debian 12 only")
    path = REPO / os.environ.get("UNITBOX_DEB_PREVIOUS", "")
    if not path.is_file():
        pytest.fail(f"no previous package at {path}: make vm-test builds it")
    return path


@pytest.fixture(scope="session")
def vm() -> Iterator[VM]:
    if os.geteuid() != 0:
        pytest.fail("the VM tier needs root (qemu, the image)")
    subprocess.run(["bash", str(VM_SH), "start"], check=True, timeout=600)
    try:
        yield VM()
    finally:
        subprocess.run(["bash", str(VM_SH), "stop"], check=False, timeout=60)
