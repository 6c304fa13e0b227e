"""The integration tier: a real systemd test host and the real daemon in it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Client, Daemon
from tests.support.split import Split
from tests.support.testhost import TestHost, booted, collect_stale_hosts


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def testhost() -> Iterator[TestHost]:
    if os.geteuid() != 0:
        pytest.fail("the integration tests boot a systemd test host and need root")
    collect_stale_hosts()
    with booted("it") as host:
        yield host


@pytest.fixture(scope="session")
def daemon(testhost: TestHost, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    workdir = tmp_path_factory.mktemp("daemon")
    server = Daemon(testhost, workdir, config="max_concurrent = 24\nlog_target = \"journal\"\n[max_limits]\ncpu_percent = 200\n")
    server.start()
    yield server
    server.stop()


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
        side = Split(host)
        side.start()
        try:
            yield side
        finally:
            side.stop()
