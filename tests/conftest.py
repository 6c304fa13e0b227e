"""Fixtures every tier may use: the throw-away PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.postgres import REQUIRED, Postgres, server_binaries


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One server for the whole session (a database per test: `postgres.new_database()`)."""
    bindir = server_binaries()
    if bindir is None:
        if REQUIRED:
            pytest.fail("Debian's postgresql package is not installed (make test installs it)")
        pytest.skip("Debian's postgresql package is not installed (make test installs it)")
    server = Postgres(bindir)
    try:
        server.create()
        yield server
    finally:
        server.destroy()
