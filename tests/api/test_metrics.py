"""/metrics as a scraper reads it: through prometheus_client's own parsers,
every name unitbox has exported kept, one registry per engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import MakeClient
from tests.support.scrape import buckets, value
from unitbox.api.state import ENGINE
from unitbox.serve import connection_guard

Client = TestClient[Any, web.Application]

# The names dashboards, alerts, bench/run_bench.py and the live tests read.
GAUGES = ("unitbox_runs_in_flight", "unitbox_queue_depth", "unitbox_stored_bytes",
          "unitbox_http_connections_open", "unitbox_http_connections_refused", "unitbox_http_head_timeouts")
HISTOGRAMS = ("unitbox_run_duration_seconds", "unitbox_submission_latency_seconds", "unitbox_event_loop_lag_seconds")
LOOP_LAG_BOUNDS = {0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, float("inf")}


@pytest.fixture
async def served(client: Client) -> AsyncIterator[Client]:
    """The API app plus the connection guard's gauges, which `unitbox serve` adds."""
    engine = client.app[ENGINE]
    guard = connection_guard(engine.config, engine.metrics)
    yield client
    guard.close()


async def test_metrics_parse_with_prometheus_clients_parser_and_keep_every_name(served: Client) -> None:
    await served.post("/run-json", json={"code": "x", "wait": True})
    reply = await served.get("/metrics")
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    text = await reply.text()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["unitbox_runs_finished"].type == "counter"
    for name in GAUGES:
        assert families[name].type == "gauge", name
    for name in HISTOGRAMS:
        assert families[name].type == "histogram", name
        assert {f"{name}_bucket", f"{name}_sum", f"{name}_count"} <= {s.name for s in families[name].samples}
    assert value(text, "unitbox_runs_finished_total", state="succeeded") == 1
    assert value(text, "unitbox_runs_finished_total", state="oom_killed") == 0  # there before the first one
    assert value(text, "unitbox_run_duration_seconds_count") == 1
    assert value(text, "unitbox_runs_in_flight") == 0
    assert set(buckets(text, "unitbox_event_loop_lag_seconds")) == LOOP_LAG_BOUNDS
    assert value(text, "process_cpu_seconds_total") > 0
    assert value(text, "process_open_fds") > 0


async def test_openmetrics_when_the_scraper_asks_for_it(client: Client) -> None:
    reply = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert reply.content_type == "application/openmetrics-text"
    text = await reply.text()
    assert text.endswith("# EOF\n")
    names = {family.name for family in openmetrics_families(text)}  # type: ignore[no-untyped-call]
    assert {"unitbox_runs_finished", "unitbox_runs_in_flight", "unitbox_event_loop_lag_seconds"} <= names


async def test_an_accept_the_library_cannot_parse_gets_the_text_format(client: Client) -> None:
    reply = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.x"})
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert value(await reply.text(), "unitbox_runs_in_flight") == 0


async def test_each_engine_counts_only_its_own_runs(make_client: MakeClient, tmp_path: Path) -> None:
    one = await make_client()
    other = await make_client(state_dir=str(tmp_path / "other"))
    await one.post("/run-json", json={"code": "x", "wait": True})
    assert value(await (await one.get("/metrics")).text(), "unitbox_runs_finished_total", state="succeeded") == 1
    assert value(await (await other.get("/metrics")).text(), "unitbox_runs_finished_total", state="succeeded") == 0
