"""The API tier: the real aiohttp app and engine over a fake systemd."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.support.fake_systemd import FakeSystemd, fake_broker
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
