"""Every run ends: the engine over a fake systemd that misbehaves the ways the
real one and its bus do. Each test names the finding of the lifecycle issue
it guards (numbers as in the issue "Every run ends")."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_systemd import FakeSystemd, fake_broker, until
from unitbox import launcher as launcher_module
from unitbox import runner as runner_module
from unitbox.broker import client as client_module
from unitbox.config import load_config
from unitbox.engine import Engine, Submission
from unitbox.errors import Busy
from unitbox.lifecycle import Phase
from unitbox.limits import Limits
from unitbox.outcome import RunState
from unitbox.profile import unit_name
from unitbox.runtimes import Runtimes
from unitbox.store import RunRecord, open_store

MakeEngine = Callable[..., Awaitable[Engine]]
TERMINAL = {s for s in RunState if s.terminal}


@pytest.fixture
async def make_engine(tmp_path: Path) -> AsyncIterator[MakeEngine]:
    engines: list[Engine] = []

    async def make(fake: FakeSystemd, **settings: Any) -> Engine:
        cfg = load_config(Path("/dev/null"), environ={},
                          cli={"state_dir": str(tmp_path / "state"), **settings})
        engine = Engine(cfg, fake_broker(cfg, fake), open_store(cfg), Runtimes(cfg))
        await engine.start()
        engines.append(engine)
        return engine
    yield make
    for engine in engines:
        await engine.stop()


def submission(code: str = "print(1)", **limits: Any) -> Submission:
    return Submission(code=code.encode(), stdin=b"", args=[], limits=Limits(**limits), runtime="default")


async def settled(engine: Engine, run_id: str, within_s: float = 5.0) -> RunRecord:
    record = await engine.wait(run_id, within_s)
    assert record.state in TERMINAL, f"run {run_id} still {record.state}"
    return record


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- 1. end never seen: merged or lost signals --------------------------------------
async def test_merged_signals_a_run_that_arrives_only_as_its_end_finishes(make_engine: MakeEngine) -> None:
    engine = await make_engine(FakeSystemd(merge_signals=True))
    record = await engine.submit(submission())
    final = await settled(engine, record.id)
    assert final.state is RunState.SUCCEEDED and final.exit_code == 0
    assert engine.executing == 0


async def test_lost_signals_the_deadline_looks_and_settles_the_run(make_engine: MakeEngine,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_module, "deadline_s", lambda phase, limits: 0.2 if phase.value != "queued" else None)
    fake = FakeSystemd(lose_signals=True)
    engine = await make_engine(fake)
    record = await engine.submit(submission())
    final = await settled(engine, record.id)
    assert final.state is RunState.SUCCEEDED
    assert engine.executing == 0


async def test_a_unit_that_never_ends_is_stopped_then_settled_as_error(make_engine: MakeEngine,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_module, "deadline_s", lambda phase, limits: 0.1 if phase.value != "queued" else None)
    monkeypatch.setattr(runner_module, "STOP_GRACE_S", 0.1)
    fake = FakeSystemd(auto_finish=False, lose_signals=True)
    fake.stop_unit = fake.stopped.append  # type: ignore[method-assign]  # PID 1 ignores it
    engine = await make_engine(fake)
    record = await engine.submit(submission())
    final = await settled(engine, record.id)
    assert final.state is RunState.ERROR and "did not end" in (final.error or "")
    assert fake.stopped == [unit_name(record.id)]
    assert engine.executing == 0


# -- 2. bus loss -------------------------------------------------------------------------
async def test_bus_loss_reconnects_and_finds_the_runs_that_ended_meanwhile(make_engine: MakeEngine,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "RESPAWN_DELAYS_S", (0.05,))
    fake = FakeSystemd(auto_finish=False, exit_status=3)
    engine = await make_engine(fake)
    record = await engine.submit(submission())
    await until(lambda: unit_name(record.id) in fake.units)
    fake.activate(unit_name(record.id))
    fake.drop_bus()
    fake.finish(unit_name(record.id))  # ends while nobody hears it
    await until(lambda: not engine.runner.broker_ok)
    assert not (await engine.health()).ok  # no watchdog ping meanwhile (serve.py pings only while ok)
    queued = await engine.submit(submission())  # accepted, waits for the bus
    assert (await engine.get(queued.id)).state is RunState.QUEUED
    fake.restore_bus()
    final = await settled(engine, record.id)
    assert (final.state, final.exit_code) == (RunState.FAILED, 3)
    assert fake.opened == 2
    await until(lambda: engine.runner.broker_ok)
    assert (await engine.health()).ok
    fake.finish(unit_name(queued.id), exit_status="0")
    assert (await settled(engine, queued.id)).state is RunState.SUCCEEDED


# -- 3. any failure while launching ---------------------------------------------------------
@pytest.mark.parametrize("where", ["start", "pipe", "fd_store", "output_file"])
async def test_launch_failure_ends_the_run_as_error_frees_the_slot_and_leaks_nothing(
        make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    fake = FakeSystemd()
    if where == "start":
        fake.start_error = OSError(errno.EMFILE, "Too many open files")
    elif where == "pipe":
        def no_pipe() -> tuple[int, int]:
            raise OSError(errno.EMFILE, "Too many open files")
        monkeypatch.setattr(launcher_module, "make_pipe", no_pipe)
    elif where == "fd_store":
        monkeypatch.setattr(launcher_module.notify, "store_fd", lambda fds, name: False)
    engine = await make_engine(fake, max_concurrent=1)
    if where == "fd_store":
        engine.runner._launcher.use_fd_store = True
    if where == "output_file":  # ENOSPC / EACCES opening the capture file: a directory in its way
        original = launcher_module.StreamCapture

        def failing(fd: int, path: Path, cap: int, allowance: object = None) -> Any:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        monkeypatch.setattr(launcher_module, "StreamCapture", failing)
    before = open_fds()
    record = await engine.submit(submission())
    final = await settled(engine, record.id)
    assert final.state is RunState.ERROR
    assert final.error and ("Too many open files" in final.error or "refused" in final.error
                            or "No space" in final.error)
    assert engine.executing == 0
    assert open_fds() == before
    assert not engine.runner._broker.watching(record.id)
    # the queue keeps moving
    fake.start_error = None
    monkeypatch.undo()
    if where == "output_file":
        assert launcher_module.StreamCapture is original
    engine.runner._launcher.use_fd_store = False
    nxt = await engine.submit(submission())
    assert (await settled(engine, nxt.id)).state is RunState.SUCCEEDED


async def test_a_bug_in_launching_is_an_error_state_not_a_500(make_engine: MakeEngine) -> None:
    fake = FakeSystemd(start_error=KeyError("no signature for property X"))
    engine = await make_engine(fake)
    record = await engine.submit(submission())  # no exception reaches the submitter
    final = await settled(engine, record.id)
    assert final.state is RunState.ERROR and "KeyError" in (final.error or "")


# -- 4. cancel vs finish ------------------------------------------------------------------
async def test_cancel_arriving_while_the_end_is_collected_answers_200_with_the_true_state(
        make_engine: MakeEngine) -> None:
    fake = FakeSystemd(auto_finish=False)
    engine = await make_engine(fake)
    record = await engine.submit(submission())
    await until(lambda: unit_name(record.id) in fake.units)
    fake.finish(unit_name(record.id))  # the end is seen; its outcome not yet collected
    await until(lambda: record.id not in engine.runner.runs or engine.runner.runs[record.id].phase is Phase.ENDING)
    final, was_going = await engine.cancel(record.id)
    assert (final.state, was_going) == (RunState.SUCCEEDED, False)
    assert fake.stopped == [] and fake.killed == []


async def test_cancel_that_loses_the_race_with_a_natural_end_keeps_the_natural_state(
        make_engine: MakeEngine) -> None:
    fake = FakeSystemd(auto_finish=False, natural_end_on_stop=True)
    engine = await make_engine(fake)
    record = await engine.submit(submission())
    await until(lambda: unit_name(record.id) in fake.units)
    fake.activate(unit_name(record.id))
    _, was_going = await engine.cancel(record.id)
    assert was_going
    final = await settled(engine, record.id)
    assert final.state is RunState.SUCCEEDED  # it had exited by itself before the stop landed


async def test_cancel_of_a_running_run_sends_sigterm_first_and_ends_cancelled(make_engine: MakeEngine) -> None:
    fake = FakeSystemd(auto_finish=False)
    engine = await make_engine(fake)
    record = await engine.submit(submission())
    await until(lambda: unit_name(record.id) in fake.units)
    fake.activate(unit_name(record.id))
    _, was_going = await engine.cancel(record.id)
    final = await settled(engine, record.id)
    assert was_going and final.state is RunState.CANCELLED and final.signal == "SIGTERM"
    assert fake.killed == [(unit_name(record.id), 15)]
    again, was_going = await engine.cancel(record.id)
    assert not was_going and again.state is RunState.CANCELLED


# -- 5. sizes after a restart without the fd store --------------------------------------
async def test_restart_without_fd_store_reports_stored_sizes_and_the_lost_output(
        make_engine: MakeEngine, tmp_path: Path) -> None:
    fake = FakeSystemd(auto_finish=False)
    first = await make_engine(fake)
    record = await first.submit(submission())
    name = unit_name(record.id)
    fake.activate(name)
    await asyncio.sleep(0.05)
    os.write(fake.units[name].fds["output"], b"x" * 5000)
    await asyncio.sleep(0.05)
    await first.stop()  # like a daemon stopped by hand: no fd store keeps the pipes
    second = await make_engine(fake)
    fake.finish(name)
    final = await settled(second, record.id)
    assert final.state is RunState.SUCCEEDED
    assert final.stdout_bytes == 5000 == (tmp_path / "state" / "daemon" / "runs" / record.id / "stdout").stat().st_size
    assert final.stdout_truncated  # what it wrote after the restart is gone, and says so
    assert "fd store" in (final.error or "")


# -- 6. shutdown answers held waits at once ------------------------------------------------
async def test_shutdown_answers_held_wait_requests_at_once(make_engine: MakeEngine) -> None:
    fake = FakeSystemd(auto_finish=False)
    engine = await make_engine(fake)
    record = await engine.submit(submission())
    held = asyncio.ensure_future(engine.wait(record.id, 300))
    await asyncio.sleep(0.05)
    assert not held.done()
    engine.begin_shutdown()
    answered = await asyncio.wait_for(held, 1)
    assert answered.state is RunState.STARTING
    with pytest.raises(Busy):
        await engine.submit(submission())


# -- 8. exact admission ---------------------------------------------------------------------
async def test_concurrent_submissions_never_overshoot_the_queue(make_engine: MakeEngine) -> None:
    fake = FakeSystemd(auto_finish=False)
    engine = await make_engine(fake, max_concurrent=2, queue_size=5)
    results = await asyncio.gather(*(engine.submit(submission()) for _ in range(40)), return_exceptions=True)
    accepted = [r for r in results if isinstance(r, RunRecord)]
    refused = [r for r in results if isinstance(r, Busy)]
    assert (len(accepted), len(refused)) == (7, 33)  # 2 running + 5 queued
    assert engine.executing == 2 and engine.queue_depth == 5
    for name in list(fake.units):
        fake.finish(name)
    while fake.units.keys() != {unit_name(r.id) for r in accepted}:
        await asyncio.sleep(0.01)
        for name in list(fake.units):
            fake.finish(name)
    for record in accepted:
        assert (await settled(engine, record.id)).state is RunState.SUCCEEDED
    assert engine.executing == 0 and engine.queue_depth == 0


async def test_a_look_ends_a_run_whose_outcome_file_is_there_even_without_the_bus(
        make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_module, "deadline_s", lambda phase, limits: 0.2 if phase.value != "queued" else None)
    monkeypatch.setattr(client_module, "RESPAWN_DELAYS_S", (60.0,))  # the bus stays away
    fake = FakeSystemd(auto_finish=False)
    engine = await make_engine(fake)
    record = await engine.submit(submission())
    await until(lambda: unit_name(record.id) in fake.units)
    fake.drop_bus()
    fake.finish(unit_name(record.id))  # the outcome file is written; no signal arrives
    final = await settled(engine, record.id)
    assert final.state is RunState.SUCCEEDED and final.cpu_ms == 1.0


# -- the broker (issue "systemd off the event loop") -----------------------------------------
@pytest.mark.parametrize("went_through", [True, False])
async def test_an_unanswered_start_is_settled_by_a_look_never_blindly_repeated(make_engine: MakeEngine,
                                                                              went_through: bool) -> None:
    fake = FakeSystemd(unanswered_starts=1, unanswered_goes_through=went_through)
    engine = await make_engine(fake)
    record = await engine.submit(submission())
    final = await settled(engine, record.id)
    assert final.state is RunState.SUCCEEDED and final.stdout_bytes == len(fake.stdout)  # the same pipes
    assert fake.started == [unit_name(record.id)]  # one unit, whether the start went through or was made again
    assert len(fake.start_requests) == (1 if went_through else 2)
    assert engine.executing == 0


async def test_a_run_cancelled_while_its_unanswered_start_is_settled_is_not_started_again(
        make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSystemd(unanswered_starts=1)
    engine = await make_engine(fake)
    settle = runner_module.Runner._settle_launch
    cancelled: list[str] = []

    async def cancel_first(runner: Any, run: Any) -> None:  # the cancel lands while the start is unanswered
        if not cancelled:
            cancelled.append(run.id)
            await engine.cancel(run.id)
        await settle(runner, run)
    monkeypatch.setattr(runner_module.Runner, "_settle_launch", cancel_first)
    record = await engine.submit(submission())
    final = await settled(engine, record.id)
    assert cancelled == [record.id] and final.state is RunState.CANCELLED
    assert fake.started == [] and len(fake.start_requests) == 1 and engine.executing == 0


async def test_a_dead_broker_is_replaced_and_no_run_is_lost_or_started_twice(make_engine: MakeEngine,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "RESPAWN_DELAYS_S", (0.2,))
    fake = FakeSystemd(auto_finish=False)
    engine = await make_engine(fake, max_concurrent=4)
    first = [await engine.submit(submission()) for _ in range(4)]
    await until(lambda: len(fake.started) == 4)
    fake.activate(unit_name(first[0].id))
    broker = engine.runner._broker
    await broker._link.stop()  # type: ignore[union-attr]  # as kill -9: its end of the wire closes
    await until(lambda: not engine.runner.broker_ok)
    health = await engine.health()
    assert not health.ok and "broker" in health.reason
    for record in first[:2]:  # these end while no broker listens
        fake.finish(unit_name(record.id))
    later = [await engine.submit(submission()) for _ in range(3)]  # accepted, queued meanwhile
    await until(lambda: engine.runner.broker_ok)
    assert (await engine.health()).ok and broker.restarts == 1
    assert engine.metrics.registry.get_sample_value("unitbox_broker_restarts") == 1
    for record in first[:2]:
        assert (await settled(engine, record.id)).state is RunState.SUCCEEDED
    for _ in range(20):
        for name in list(fake.units):
            fake.finish(name)
        await asyncio.sleep(0.02)
    for record in first + later:
        assert (await settled(engine, record.id)).state is RunState.SUCCEEDED
    assert sorted(fake.started) == sorted(unit_name(r.id) for r in first + later)  # each exactly once
