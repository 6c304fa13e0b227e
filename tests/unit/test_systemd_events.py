"""The systemd adapter's end detection and bus-loss handling, fed the
signal bodies systemd 252 really sends (recorded on the test host), without
a bus. Finding 1 and 2 of the issue "Every run ends"."""

from __future__ import annotations

from typing import Any

from unitbox.systemd import (
    SERVICE_IFACE,
    UNIT_IFACE,
    Systemd,
    UnitActive,
    UnitEnd,
    UnitEvent,
    UnitTracker,
    unit_path,
)

NAME = "unitbox-run-0123456789abcdef.service"
JOB = (123, b"/org/freedesktop/systemd1/job/123")
NO_JOB = (0, b"/")
SERVICE_DONE = {b"Result": b"success", b"ExecMainCode": 1, b"ExecMainStatus": 0,
                b"ExecMainStartTimestamp": 1_795_988_430_378_225, b"ExecMainExitTimestamp": 1_795_988_430_383_423}


class Msg:
    """Just what the adapter reads of a pystemd message."""

    def __init__(self, path: str, body: Any) -> None:
        self.path, self.body = path, body

    def get_path(self) -> bytes:
        return self.path.encode()

    def process_reply(self, _: bool) -> None:
        pass


def unit_signal(state: bytes, job: tuple[int, bytes]) -> Msg:
    return Msg(unit_path(NAME), (UNIT_IFACE.encode(), {b"ActiveState": state, b"SubState": b"x", b"Job": job}, []))


def watched() -> tuple[Systemd, list[UnitEvent]]:
    adapter = Systemd()
    events: list[UnitEvent] = []
    adapter.watch(NAME, events.append)
    return adapter, events


def test_a_short_run_arriving_as_one_merged_inactive_signal_ends() -> None:
    adapter, events = watched()
    adapter._on_properties(Msg(unit_path(NAME), (SERVICE_IFACE.encode(), SERVICE_DONE, [])))
    adapter._on_properties(unit_signal(b"inactive", NO_JOB))
    assert events == [UnitEnd("success", "exited", "0", 1795988430.378225, 1795988430.383423)]


def test_inactive_with_the_start_job_pending_is_not_the_end() -> None:
    adapter, events = watched()
    adapter._on_properties(unit_signal(b"inactive", JOB))  # just created, start job queued
    adapter._on_properties(unit_signal(b"activating", JOB))
    assert events == []
    adapter._on_properties(unit_signal(b"active", NO_JOB))
    assert events == [UnitActive(None)]
    adapter._on_properties(unit_signal(b"failed", NO_JOB))
    assert len(events) == 2 and isinstance(events[1], UnitEnd)
    adapter._on_properties(unit_signal(b"failed", NO_JOB))  # the end is told once
    assert len(events) == 2


def test_an_unloaded_unit_ends_even_if_its_last_state_was_never_seen() -> None:
    adapter, events = watched()
    adapter._on_properties(unit_signal(b"activating", JOB))
    adapter._on_unit_removed(Msg("/org/freedesktop/systemd1", (NAME.encode(), unit_path(NAME).encode())))
    assert events == [UnitEnd("", "", "", None, None)]


def test_the_real_sequence_of_a_fast_unit_ends_exactly_once() -> None:
    """As recorded on systemd 252 for `/bin/true`: never `active`."""
    tracker = UnitTracker()
    sequence = [(b"inactive", JOB), (b"activating", JOB), (b"deactivating", JOB), (b"inactive", JOB),
                (b"inactive", NO_JOB)]
    events = []
    for state, job in sequence:
        events += tracker.apply(SERVICE_IFACE, {"ExecMainCode": 1, "ExecMainStatus": 0})
        events += tracker.apply(UNIT_IFACE, {"ActiveState": state.decode(), "Job": job})
    assert events == [UnitEnd("", "exited", "0", None, None)]
    assert tracker.end() == []


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
