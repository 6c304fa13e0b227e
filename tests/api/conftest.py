"""The API tier: the real aiohttp app and engine over a fake systemd."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.support.daemon import free_port
from tests.support.fake_systemd import FakeSystemd, fake_broker
from tests.support.postgres import Postgres
from unitbox.api.app import create_app
from unitbox.config import load_config
from unitbox.engine import Engine
from unitbox.runtimes import Runtimes
from unitbox.store import open_store

MakeClient = Callable[..., Awaitable[TestClient[Any, web.Application]]]


@pytest.fixture
def make_client(tmp_path: Path, aiohttp_client: Any) -> MakeClient:
    async def make(fake: FakeSystemd | None = None, **config: Any) -> TestClient[Any, web.Application]:
        settings = {"state_dir": str(tmp_path / "state"), **config}
        cfg = load_config(Path("/dev/null"), environ={}, cli=settings)
        engine = Engine(cfg, fake_broker(cfg, fake or FakeSystemd()), open_store(cfg), Runtimes(cfg))
        client: TestClient[Any, web.Application] = await aiohttp_client(create_app(engine))
        return client
    return make


@pytest.fixture
async def client(make_client: MakeClient) -> AsyncIterator[TestClient[Any, web.Application]]:
    yield await make_client()


MakeNode = Callable[..., Awaitable[TestClient[Any, web.Application]]]


@pytest.fixture
async def make_node(tmp_path: Path, postgres: Postgres, aiohttp_client: Any) -> AsyncIterator[MakeNode]:
    """Nodes sharing one new PostgreSQL database, each a real HTTP server on a loopback port of its own
    (what it advertises: the relay between them is real HTTP); systemd faked for each."""
    url = postgres.new_database()

    async def make(name: str, fake: FakeSystemd | None = None, **settings: Any) -> TestClient[Any, web.Application]:
        port = free_port()
        cfg = load_config(Path("/dev/null"), environ={}, cli={
            "state_dir": str(tmp_path / name), "store": url, "node": name,
            "advertise": f"http://127.0.0.1:{port}", **settings})
        engine = Engine(cfg, fake_broker(cfg, fake or FakeSystemd()), open_store(cfg), Runtimes(cfg))
        client: TestClient[Any, web.Application] = await aiohttp_client(TestServer(create_app(engine), port=port))
        return client
    yield make


