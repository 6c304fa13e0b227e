"""The systemd adapter's end detection and bus-loss handling, fed the
Manager signal bodies systemd 252 really sends (JobRemoved, UnitRemoved),
without a bus. Findings 1 and 2 of the issue "Every run ends", on the
signal diet of the broker issue."""

from __future__ import annotations

from typing import Any

from unitbox.systemd import UNKNOWN_END, MainExited, Systemd, UnitActive, UnitEvent, unit_of_path, unit_path

NAME = "unitbox-run-0123456789abcdef.service"
START_JOB = b"/org/freedesktop/systemd1/job/123"
MANAGER = "/org/freedesktop/systemd1"


class Msg:
    """Just what the adapter reads of a pystemd message."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def process_reply(self, _: bool) -> None:
        pass


def job_removed(job: bytes, unit: str, result: bytes) -> Msg:
    return Msg((123, job, unit.encode(), result))


def unit_removed(unit: str) -> Msg:
    return Msg((unit.encode(), unit_path(unit).encode()))


def started() -> tuple[Systemd, list[tuple[str, UnitEvent]]]:
    """An adapter that has just started NAME (its start job is START_JOB)."""
    adapter = Systemd()
    events: list[tuple[str, UnitEvent]] = []
    adapter._on_event = lambda name, event: events.append((name, event))
    adapter._prefix = b"unitbox-run-"
    adapter._call = lambda method, args, *rest: (START_JOB,)  # type: ignore[method-assign]
    adapter.start_transient_service(NAME, {"Description": "x"})
    return adapter, events


def test_a_unit_is_active_when_its_start_job_is_done_and_over_when_it_is_removed() -> None:
    adapter, events = started()
    adapter._on_job_removed(job_removed(START_JOB, NAME, b"done"))
    adapter._on_unit_removed(unit_removed(NAME))
    assert events == [(NAME, UnitActive(None)), (NAME, UNKNOWN_END)]


def test_a_failed_start_is_never_active_and_still_ends() -> None:
    adapter, events = started()
    adapter._on_job_removed(job_removed(START_JOB, NAME, b"failed"))
    adapter._on_unit_removed(unit_removed(NAME))
    assert events == [(NAME, UNKNOWN_END)]


def test_other_jobs_and_other_units_say_nothing() -> None:
    adapter, events = started()
    adapter._on_job_removed(job_removed(b"/org/freedesktop/systemd1/job/999", NAME, b"done"))  # a stop job
    adapter._on_job_removed(job_removed(b"/org/freedesktop/systemd1/job/7", "cron.service", b"done"))
    adapter._on_unit_removed(unit_removed("session-1.scope"))
    assert events == []
    adapter._on_job_removed(job_removed(START_JOB, NAME, b"done"))  # the start job is told once
    adapter._on_job_removed(job_removed(START_JOB, NAME, b"done"))
    assert events == [(NAME, UnitActive(None))]


def test_a_fast_unit_merged_into_its_removal_still_ends() -> None:
    """A unit that runs /bin/true can be gone before its start job's signal is read: the end alone suffices."""
    adapter, events = started()
    adapter._on_unit_removed(unit_removed(NAME))
    assert events == [(NAME, UNKNOWN_END)]


class Changed(Msg):
    """A PropertiesChanged as systemd 252 sends it: its path in the header, the body decoded on demand."""

    def __init__(self, unit: str, interface: bytes, changed: dict[bytes, Any]) -> None:
        super().__init__(None)
        self.path, self._body = unit_path(unit).encode(), (interface, changed, [])
        self.decoded = False

    def get_path(self) -> bytes:
        return self.path

    def process_reply(self, _: bool) -> None:
        self.body, self.decoded = self._body, True


WARM = "unitbox-warm-0a1b2c3d4e5f.service"
SERVICE = b"org.freedesktop.systemd1.Service"
UNIT = b"org.freedesktop.systemd1.Unit"
RUNNING = {b"ExecMainCode": 0, b"ExecMainStatus": 0, b"Result": b"success", b"ExecMainExitTimestamp": 0}
EXITED = {b"ExecMainCode": 1, b"ExecMainStatus": 3, b"Result": b"exit-code",
          b"ExecMainExitTimestamp": 1796060866381528}


def test_a_warm_unit_s_main_process_end_is_told_once_and_only_for_units_asked_about() -> None:
    adapter = Systemd()
    events: list[tuple[str, UnitEvent]] = []
    adapter._on_event = lambda name, event: events.append((name, event))
    adapter._prefix, adapter._exits_of = b"unitbox-", unit_path("unitbox-warm-").encode()
    other = Changed("cron.service", SERVICE, EXITED)
    adapter._on_properties_changed(other)
    assert not other.decoded  # another unit's change is not even decoded
    adapter._on_properties_changed(Changed(WARM, SERVICE, RUNNING))  # started, running: not yet
    adapter._on_properties_changed(Changed(WARM, UNIT, {b"SubState": b"running"}))
    adapter._on_properties_changed(Changed(WARM, SERVICE, EXITED))  # its program exited …
    adapter._on_properties_changed(Changed(WARM, UNIT, {b"SubState": b"stop-sigterm"}))  # … what it left is killed
    assert events == []
    adapter._on_properties_changed(Changed(WARM, SERVICE, EXITED))
    adapter._on_properties_changed(Changed(WARM, UNIT, {b"SubState": b"stop-post"}))  # none left: ExecStopPost
    later = Changed(WARM, SERVICE, EXITED)  # … and again when it is over
    adapter._on_properties_changed(later)
    assert events == [(WARM, MainExited("exit-code", "exited", "3"))] and not later.decoded
    adapter._on_unit_removed(unit_removed(WARM))  # a unit of this name later is another unit
    adapter._on_properties_changed(Changed(WARM, UNIT, {b"SubState": b"stop-post"}))  # either order
    adapter._on_properties_changed(Changed(WARM, SERVICE, {**EXITED, b"ExecMainCode": 2, b"ExecMainStatus": 9,
                                                           b"Result": b"signal"}))
    assert events[1:] == [(WARM, UNKNOWN_END), (WARM, MainExited("signal", "killed", "9"))]


def test_a_cold_run_s_change_is_not_decoded() -> None:
    adapter = Systemd()
    adapter._on_event = lambda name, event: None
    adapter._prefix, adapter._exits_of = b"unitbox-", unit_path("unitbox-warm-").encode()
    change = Changed(NAME, SERVICE, EXITED)
    adapter._on_properties_changed(change)
    assert not change.decoded  # ≈87 µs each: only warm units' are


def test_a_unit_path_names_its_unit() -> None:
    assert unit_of_path(unit_path(WARM)) == WARM and unit_of_path(unit_path(NAME)) == NAME


class DeadBus:
    def __init__(self) -> None:
        self.closed = False

    def process(self) -> Any:
        class Empty:
            def is_empty(self) -> bool:
                return True
        return Empty()

    def close(self) -> None:
        self.closed = True


def test_a_disconnected_bus_is_reported_once_and_never_read_again() -> None:
    adapter = Systemd()
    lost: list[str] = []
    adapter._on_lost = lost.append
    adapter._bus = DeadBus()  # type: ignore[assignment]
    adapter._on_disconnected(None)  # sd-bus's local Disconnected message
    adapter._drain()
    adapter._drain()
    assert len(lost) == 1 and "Disconnected" in lost[0]
    assert adapter._bus is None
