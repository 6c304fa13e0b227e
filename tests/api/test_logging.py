"""What the daemon logs per run: at most two records at INFO for a run that
succeeds (it started as its unit; how it ended), so a busy daemon's log costs
little and says what a reader needs (journalctl UNITBOX_RUN_ID=<id>)."""

from __future__ import annotations

import logging

import pytest

from tests.api.conftest import MakeClient


async def test_a_successful_run_logs_two_records_at_info(make_client: MakeClient,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    client = await make_client()
    await (await client.post("/run-json", json={"code": "pass", "wait": True})).json()  # warm: start-up records
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="unitbox"):
        run = await (await client.post("/run-json", json={"code": "pass", "wait": True})).json()
    assert run["state"] == "succeeded"
    records = [r for r in caplog.records if r.name.startswith("unitbox") and r.levelno >= logging.INFO]
    assert [r.getMessage().split()[:2] for r in records] == [["run", run["id"]]] * len(records)
    assert len(records) <= 2, [r.getMessage() for r in records]
    assert all(getattr(r, "run_id", None) == run["id"] for r in records)
