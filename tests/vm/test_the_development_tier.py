"""Development on a Debian 13 machine (issue 15), in the trixie VM: the
checkout's `make test-fast`, and a smoke of the integration tier whose test
host boots systemd on pure cgroup v2 (the cgroup2 branch of
tests/testhost/testhost.sh: a Delegate=yes scope with cpu, memory and pids
enabled down to the host's root). The VM has no network: the Python 3.13
wheels of the daemon and its tests come from the host (.cache/devwheels-cp313,
pystemd built in the trixie build root). `make vm-dev-test` runs it, apart
from `make vm-test`: about 20 minutes under TCG with warm caches (boot 1,
checkout and venv 4, test-fast 7, smoke 8). Under TCG a Python start costs
seconds of CPU, so the smoke's speed bounds stretch (UNITBOX_TEST_TIME_SCALE)
and its latency-under-load test is skipped."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.vm.conftest import DIST, REPO, VM, VM_SH, step

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]

WHEELS = REPO / ".cache" / "devwheels-cp313"
CHECKOUT = "/root/unitbox"
# The integration smoke: the daemon over HTTP in a test host, and the limits
# its runs get from the test host's delegated cgroup.
SMOKE = ["tests/integration/test_api_live.py", "tests/integration/test_attacks_resources.py"]
# Under TCG (no KVM) a Python start costs the runs seconds of CPU: the smoke's
# bounds on speed stretch by this much (tests/support/pace.py).
TCG_TIME_SCALE = 4


@pytest.fixture(scope="module")
def checkout(vm: VM) -> str:
    if DIST != "trixie" or not os.environ.get("UNITBOX_VM_DEV"):
        pytest.skip("the development tier runs on the Debian 13 VM, under `make vm-dev-test`")
    if not (WHEELS / ".complete").is_file():
        pytest.fail(f"no {WHEELS}: make vm-test gathers it")
    work = REPO / ".cache" / "vm" / "run"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    subprocess.run(["tar", "-cf", str(work / "checkout.tar"), "-C", str(REPO), *[f for f in files if (REPO / f).exists()]],
                   check=True)
    subprocess.run(["tar", "-cf", str(work / "wheels.tar"), "-C", str(WHEELS), "."], check=True)
    vm.put(work / "checkout.tar", "/root/checkout.tar")
    vm.put(work / "wheels.tar", "/root/wheels.tar")
    started = time.monotonic()
    vm.sh(f"mkdir -p {CHECKOUT} /root/wheels && tar -xf /root/checkout.tar -C {CHECKOUT} && tar -xf /root/wheels.tar -C /root/wheels")
    # The venv as `make venv` makes it, offline: pip from its wheel, everything
    # from the wheelhouse; the stamps tell make it is there.
    pip = "/root/unitbox/.venv/bin/python $(ls /root/wheels/pip-*.whl)/pip --isolated --disable-pip-version-check"
    vm.sh(f"cd {CHECKOUT} && python3 -m venv --without-pip .venv && "
          f"{pip} install -q --no-index --find-links /root/wheels pip -e '.[test]' && "
          "mkdir -p .cache && touch .cache/apt.stamp .venv/.installed", timeout=1200)
    step(f"the checkout and a .venv of Python {vm.out('python3 --version').split()[1]} in {CHECKOUT} "
         f"({len(list(WHEELS.glob('*.whl')))} wheels, offline)", f"ok in {time.monotonic() - started:.0f} s")
    return CHECKOUT


def test_make_test_fast_passes_on_debian_13(vm: VM, checkout: str) -> None:
    started = time.monotonic()
    done = vm.sh(f"cd {checkout} && make test-fast 2>&1", check=False, timeout=1500)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    step("make test-fast (lint, unit and API tiers) on Debian 13",
         f"exit {done.returncode} in {time.monotonic() - started:.0f} s: {summary}")
    assert done.returncode == 0, done.stdout[-6000:]


def test_integration_smoke_on_pure_cgroup_v2(vm: VM, checkout: str) -> None:
    cgroup = vm.out("stat -fc %T /sys/fs/cgroup")
    accel = subprocess.run(["bash", str(VM_SH), "accel"], capture_output=True, text=True, check=True).stdout.strip()
    scale = TCG_TIME_SCALE if accel == "tcg" else 1
    started = time.monotonic()
    done = vm.sh(f"cd {checkout} && UBX_TEST_RUN=vm{int(time.time()) % 100000} UNITBOX_TEST_TIME_SCALE={scale} "
                 f".venv/bin/pytest -q -rfEs -p no:cacheprovider {' '.join(SMOKE)} 2>&1", check=False, timeout=1500)
    left = vm.out("ls /run/unitbox-testhost/ 2>/dev/null | wc -l", check=False)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    step(f"pytest {' '.join(SMOKE)} (the test host on {cgroup}, {accel}: time bounds x{scale})",
         f"exit {done.returncode} in {time.monotonic() - started:.0f} s: {summary}; test hosts left: {left}")
    assert cgroup == "cgroup2fs"
    assert done.returncode == 0, done.stdout[-8000:]
