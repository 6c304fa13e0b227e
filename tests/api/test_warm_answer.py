"""Answering fast: a waiting client has a warm run as soon as its program has
exited by itself and its output is all in, before the unit's teardown; the
unit's end completes the record with the figures only it gives, and never
changes what the answer said (docs/api.md "Waiting for a run")."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_systemd import FakeSystemd, fake_broker, until
from unitbox.broker import handover
from unitbox.config import load_config
from unitbox.engine import Engine, Submission
from unitbox.lifecycle import Phase, RunLife
from unitbox.limits import Limits
from unitbox.outcome import RunState
from unitbox.rundir import RunDir
from unitbox.runtimes import Runtimes
from unitbox.store import RunRecord, open_store


@pytest.fixture
async def pooled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Engine, FakeSystemd]]:
    monkeypatch.setattr(handover, "cgroup_oom_kills", lambda cgroup: 0)  # the fake's units have no cgroup to read
    config = load_config(Path("/dev/null"), environ={},
                         cli={"state_dir": str(tmp_path / "state"), "warm": {"default": {"size": 1}}})
    fake = FakeSystemd(warm=True, auto_finish=False, stdout=b"hello\n")
    fake.stage_root = config.state_dir / "stage"
    engine = Engine(config, fake_broker(config, fake), open_store(config), Runtimes(config))
    await engine.start()
    yield engine, fake
    await engine.stop()


async def handed_over(engine: Engine, fake: FakeSystemd, **fields: Any) -> tuple[str, str]:
    """A run submitted and handed to the pool's ready unit: (run id, unit)."""
    await until(lambda: len(fake.warm_started) == 1)
    await asyncio.sleep(0.05)  # its stub says ready
    record = await engine.submit(Submission(code=b"print('hello')", stdin=b"", args=[], limits=Limits(),
                                            runtime="default", **fields))
    await until(lambda: any(unit.frame for unit in fake.warm_units.values()))
    return record.id, next(name for name, unit in fake.warm_units.items() if unit.frame)


async def test_the_answer_comes_at_the_program_s_exit_and_the_unit_s_end_adds_only_figures(
        pooled: tuple[Engine, FakeSystemd]) -> None:
    engine, fake = pooled
    run, unit = await handed_over(engine, fake)
    waiter = asyncio.ensure_future(engine.wait(run, 10))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    fake.program_exits(unit, 3)
    answer = await asyncio.wait_for(waiter, 2)
    assert (answer.state, answer.exit_code, answer.stdout_bytes) == (RunState.FAILED, 3, 6)
    assert answer.cpu_ms is None and answer.memory_peak_bytes is None  # only the unit's end has them
    assert answer.duration_ms is not None and answer.finished_at is not None
    assert (await engine.get(run)).state is RunState.FAILED  # /status says the same meanwhile
    assert engine.run_dir(run).output("stdout").read_bytes() == b"hello\n"
    fake.finish(unit, exit_status="3")
    await until(lambda: run not in engine._runner.runs)
    final = await engine.get(run)
    assert (final.state, final.exit_code, final.stdout_bytes) == (answer.state, answer.exit_code, 6)
    assert final.cpu_ms == 1.0 and final.memory_peak_bytes == 4096


async def test_a_cancel_after_the_program_exited_changes_nothing(pooled: tuple[Engine, FakeSystemd]) -> None:
    engine, fake = pooled
    run, unit = await handed_over(engine, fake)
    fake.program_exits(unit, 0)
    assert (await engine.wait(run, 2)).state is RunState.SUCCEEDED
    cancelling = asyncio.ensure_future(engine.cancel(run))
    await asyncio.sleep(0.05)
    assert fake.killed == []  # nothing is signalled: the program is gone
    fake.finish(unit)
    record, going = await asyncio.wait_for(cancelling, 2)
    assert not going and record.state is RunState.SUCCEEDED and not record.cancel_requested


async def test_no_early_answer_when_the_unit_s_end_has_more_to_say(pooled: tuple[Engine, FakeSystemd]) -> None:
    engine, fake = pooled
    run, unit = await handed_over(engine, fake, entrypoint="main")
    waiter = asyncio.ensure_future(engine.wait(run, 10))
    fake.program_exits(unit, 0)
    await asyncio.sleep(0.1)
    assert not waiter.done()  # the entrypoint's value is known only at the unit's end
    fake.finish(unit)
    assert (await asyncio.wait_for(waiter, 2)).state.terminal


async def test_no_early_answer_for_a_run_cancelled_before_its_program_exited(pooled: tuple[Engine, FakeSystemd],
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    engine, fake = pooled
    monkeypatch.setattr(fake, "kill_unit", lambda name, signal: fake.killed.append((name, signal)))  # it handles TERM
    run, unit = await handed_over(engine, fake)
    await engine.cancel(run)
    await until(lambda: fake.killed)
    waiter = asyncio.ensure_future(engine.wait(run, 10))
    fake.program_exits(unit, 0)  # it cleaned up and exited 0
    await asyncio.sleep(0.1)
    assert not waiter.done()  # whether the cancel counted is the unit's end's to say
    fake.finish(unit)
    assert (await asyncio.wait_for(waiter, 2)).state is RunState.CANCELLED


def test_once_the_final_record_is_made_it_is_shown_as_it_is(tmp_path: Path) -> None:
    record = RunRecord(id="0123456789abcdef", state=RunState.RUNNING, created_at=1.0, limits=Limits(),
                       started_at=10.0)
    run = RunLife(record, RunDir(tmp_path, tmp_path), Phase.ENDING)
    run.exited = (3, 10.5)
    early = run.live_view()
    assert (early.state, early.exit_code, early.duration_ms, early.cpu_ms) == (RunState.FAILED, 3, 500.0, None)
    run.record = record.evolve(state=RunState.FAILED, exit_code=3, duration_ms=480.0, cpu_ms=12.0, finished_at=10.6)
    assert run.live_view() == run.record  # made, not yet stored: not mixed with the early view
    assert run.live_view(early=False) == run.record
