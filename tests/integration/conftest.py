"""The integration tier: a real systemd test host and the real daemon in it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Client, Daemon, warm_ready
from tests.support.split import Split
from tests.support.testhost import TestHost, booted, collect_stale_hosts, wait_until

# The session's daemon runs with a pool of warm units (the default); the
# attack catalogue (test_attacks_*.py) runs again against one without, so
# every attack is tried on a pooled run and on a cold one.
DAEMON_CONFIG = "max_concurrent = 24\nlog_target = \"journal\"\n[max_limits]\ncpu_percent = 200\n"
POOLS = {"warm": "[warm.default]\nsize = 4\n", "cold": "[warm.default]\nsize = 0\n"}


def attack(item: pytest.Item) -> bool:
    return item.path.name.startswith("test_attacks_")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, dropped = [], []
    for item in items:
        if "tests/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)
        callspec = getattr(item, "callspec", None)
        cold = callspec is not None and callspec.params.get("daemon") == "cold"
        (dropped if cold and not attack(item) else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def testhost() -> Iterator[TestHost]:
    if os.geteuid() != 0:
        pytest.fail("the integration tests boot a systemd test host and need root")
    collect_stale_hosts()
    with booted("it") as host:
        yield host


@pytest.fixture(scope="session", params=list(POOLS))
def daemon(request: pytest.FixtureRequest, testhost: TestHost,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    pool = request.param
    workdir = tmp_path_factory.mktemp(f"daemon-{pool}")
    server = Daemon(testhost, workdir, config=DAEMON_CONFIG + POOLS[pool], name=f"daemon-{pool}")
    server.pool = pool
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _a_warm_unit_is_ready(request: pytest.FixtureRequest) -> None:
    """Before each attack on the pooled daemon: a unit ready, so that the attack's run is handed to one."""
    if "daemon" not in request.fixturenames or not attack(request.node):
        return
    server: Daemon = request.getfixturevalue("daemon")
    if server.pool == "warm":
        wait_until(lambda: warm_ready(server.client) >= 1, 30, interval=0.1)


@pytest.fixture
def client(daemon: Daemon) -> Client:
    return daemon.client


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="module")
def split() -> Iterator[Split]:
    """The packaged split (the shipped units, the daemon as the user unitbox) in a test host of its own."""
    with booted("split") as host:
        side = Split(host, config="[warm.default]\nsize = 2\n")  # the package's units, with a pool of warm units
        side.start()
        try:
            yield side
        finally:
            side.stop()
