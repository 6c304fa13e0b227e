"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from unitbox.store import RunStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RunStore]:
    opened = RunStore(tmp_path / "unitbox.db")
    await opened.open()
    yield opened
    await opened.close()
