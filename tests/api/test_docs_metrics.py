"""docs/operations.md names every metric the app exports. (The HTTP guard's
gauges are added by `serve`, outside this app: the table lists them by hand.)"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.support.doctables import DOCS, cells


def documented_metrics() -> list[str]:
    lines = (DOCS / "operations.md").read_text().splitlines()
    start = lines.index("| metric | type | what |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line)[0].strip("`").split("{")[0])
    return rows


async def test_every_exported_metric_is_documented(client: TestClient[Any, web.Application]) -> None:
    response = await client.get("/metrics")
    families = re.findall(r"^# TYPE (unitbox_\w+) ", await response.text(), re.M)
    documented = documented_metrics()
    assert len(families) >= 7
    # A counter's family is named without the _total of its samples (prometheus_client).
    assert [f for f in families if f not in documented and f + "_total" not in documented] == []
