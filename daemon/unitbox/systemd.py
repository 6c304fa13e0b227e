"""The systemd adapter: the only module that talks to PID 1 (through pystemd).
It lives in the broker process (broker/server.py), never in the HTTP daemon:
pystemd's calls block and hold the GIL for the round trip to PID 1.

One system-bus connection, driven from the broker's asyncio loop (the bus fd
under `loop.add_reader`). `Subscribe()` and two Manager signals are set up
when the bus opens, before any StartTransientUnit, so no change is missed:

- `JobRemoved` of a unit's start job (its path is the StartTransientUnit
  reply) with result `done`: the program was executed (Type=exec) →
  `UnitActive`. Any other result: the start failed, and the unit ends.
- `UnitRemoved`: the unit is over and unloaded (our units have
  CollectMode=inactive-or-failed, so every one of them is) → `UnitEnd`.
  ExecStopPost has written the outcome file by then; that file, not the
  signal, is the record of how the run ended. Only when that file is
  missing are a unit's properties read (`probe`, while it is still loaded).

Both are Manager signals sent once per unit, cheap to decode (≈8-9 µs
measured), and only our units (by name prefix) are reported. PropertiesChanged
(≈27 per run, half of them for other units, ≈87 µs each to decode) is
listened to only when `open` is given `exits_of` (warm units: broker/warm.py),
and decoded only for those units, until each one's main process has ended:

- the Service interface's ExecMainExitTimestamp set (the program ended,
  with ExecMainCode/Status and Result) and the Unit interface's SubState at
  `stop-post` or later (systemd has killed what the program left and seen
  its cgroup empty: no process of the run remains) → `MainExited`, ≈30 ms
  before the unit is over (its ExecStopPost, the teardown).

A lost bus (dbus restarted, the connection dropped) is detected from sd-bus's
local `Disconnected` message or from a call failing with ENOTCONN; the reader
is removed at once (sd-bus closes the fd, and its number may be reused) and
`on_lost` is called: the broker exits and the daemon starts a new one."""

from __future__ import annotations

import asyncio
import logging
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pystemd.dbusexc import DBusBaseError
from pystemd.dbuslib import DBus, apply_signature

from unitbox.dbus_properties import encode_properties
from unitbox.errors import SystemdError

log = logging.getLogger(__name__)

DEST = b"org.freedesktop.systemd1"
MANAGER_PATH = b"/org/freedesktop/systemd1"
MANAGER = b"org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
LOCAL_PATH = b"/org/freedesktop/DBus/Local"
PROPERTIES_IFACE = b"org.freedesktop.DBus.Properties"
LOCAL_IFACE = b"org.freedesktop.DBus.Local"
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
OVER = ("inactive", "failed")
_CONNECTION_GONE = ("ENOTCONN", "ECONNRESET", "EPIPE", "err -107", "err -104", "err -32")
# A call whose answer never came (sd-bus's method-call timeout): PID 1 may have acted on it.
_NO_ANSWER = ("ETIMEDOUT", "err -110", "timed out")
_END_PROPERTIES = {"Result": b"s", "ExecMainCode": b"i", "ExecMainStatus": b"i",
                   "ExecMainStartTimestamp": b"t", "ExecMainExitTimestamp": b"t"}
_EXEC_CODES = {1: "exited", 2: "killed", 3: "dumped"}  # CLD_EXITED, CLD_KILLED, CLD_DUMPED
# A service's sub-states once its stop has killed its processes and seen its cgroup empty.
_PROCESSES_GONE = frozenset({b"stop-post", b"final-sigterm", b"final-sigkill", b"final-watchdog", b"dead",
                             b"failed"})


@dataclass(frozen=True, slots=True)
class UnitActive:
    """The unit is active: its program was executed (Type=exec)."""

    started_at: float | None


@dataclass(frozen=True, slots=True)
class UnitEnd:
    """The unit is over. Fields as the ExecStopPost environment spells them;
    "" (or None) where systemd did not say."""

    result: str  # success, exit-code, signal, timeout, oom-kill, …
    exit_code: str  # exited, killed, dumped
    exit_status: str  # a number, or a signal's number
    started_at: float | None  # wall clock (s) when the main process started
    exited_at: float | None  # … and when it ended


@dataclass(frozen=True, slots=True)
class MainExited:
    """The unit's main process has ended and no process of it is left; the
    unit is still stopping (its ExecStopPost runs). Fields as UnitEnd's."""

    result: str
    exit_code: str
    exit_status: str


UnitEvent = UnitActive | UnitEnd | MainExited
UNKNOWN_END = UnitEnd("", "", "", None, None)
EventSink = Callable[[str, UnitEvent], None]  # (unit name, event)


@dataclass(frozen=True, slots=True)
class UnitInfo:
    name: str
    active_state: str
    sub_state: str
    has_job: bool = False

    @property
    def over(self) -> bool:
        return self.active_state in OVER and not self.has_job


class NoAnswer(SystemdError):
    """PID 1 did not answer a call in time (or the bus broke during it): the
    call may or may not have taken effect; only a look can tell."""


def _seconds(usec: Any) -> float | None:
    return usec / 1e6 if isinstance(usec, int) and usec > 0 else None


def end_from_service(service: Mapping[str, Any]) -> UnitEnd:
    code = service.get("ExecMainCode")
    status = service.get("ExecMainStatus")
    exit_code = _EXEC_CODES.get(code, "") if isinstance(code, int) else ""
    return UnitEnd(result=str(service.get("Result") or ""), exit_code=exit_code,
                   exit_status=str(status) if exit_code and isinstance(status, int) else "",
                   started_at=_seconds(service.get("ExecMainStartTimestamp")),
                   exited_at=_seconds(service.get("ExecMainExitTimestamp")))


class UnitManager(Protocol):
    """What the broker needs of systemd: `Systemd` below, or a fake in the fast tests.
    `open` reports, for every unit whose name starts with `prefix`, one
    UnitActive (if its start job succeeded) and one UnitEnd; for those whose
    name starts with `exits_of` (if given), one MainExited before the end."""

    def open(self, on_event: EventSink, on_lost: Callable[[str], None], prefix: str,
             exits_of: str = "") -> None: ...
    def close(self) -> None: ...
    def start_transient_service(self, name: str, properties: Mapping[str, Any],
                                stdio: Mapping[str, int] | None = None) -> None: ...
    def set_unit_properties(self, name: str, properties: Mapping[str, Any]) -> None: ...
    def control_group(self, name: str) -> str: ...
    def stop_unit(self, name: str) -> None: ...
    def kill_unit(self, name: str, signal: int) -> None: ...
    def list_units(self, patterns: list[str]) -> list[UnitInfo]: ...
    def probe(self, name: str) -> UnitInfo | UnitEnd: ...
    def ensure_slice(self, name: str, properties: Mapping[str, Any]) -> bool: ...
    def version(self) -> str: ...


_PATH_SAFE = set(string.ascii_letters + string.digits)


def unit_path(name: str) -> str:
    """The unit's D-Bus object path: every byte that is not [A-Za-z0-9] as _xx."""
    return UNIT_PATH_PREFIX + "".join(c if c in _PATH_SAFE else f"_{ord(c):02x}" for c in name)


def unit_of_path(path: str) -> str:
    """The unit a D-Bus object path names (`unit_path` undone)."""
    return re.sub(r"_([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), path.removeprefix(UNIT_PATH_PREFIX))


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


class Systemd:
    """A typed view of PID 1's manager, for one asyncio loop."""

    def __init__(self) -> None:
        self._bus: DBus | None = None
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prefix = b""
        self._exits_of = b""  # unit path prefix whose main process's end is reported (MainExited)
        self._exited: set[bytes] = set()  # unit paths already reported: their later changes are not decoded
        self._main_ends: dict[bytes, UnitEnd] = {}  # by unit path: how its main process ended, …
        self._processes_gone: set[bytes] = set()  # … and whether none of its processes is left
        self._start_jobs: dict[bytes, bytes] = {}  # start job path → unit name, until its JobRemoved
        self._on_event: EventSink = lambda name, event: None
        self._on_lost: Callable[[str], None] = lambda reason: None
        self._disconnected = False
        # pystemd keeps only a borrowed pointer to each callback: hold them here.
        self._callbacks = (self._guarded(self._on_job_removed), self._guarded(self._on_unit_removed),
                           self._guarded(self._on_disconnected), self._guarded(self._on_properties_changed))

    # -- connection ---------------------------------------------------------
    def open(self, on_event: EventSink, on_lost: Callable[[str], None], prefix: str,
             exits_of: str = "") -> None:
        """Connect and subscribe. `on_lost(reason)` is called once if the
        connection later breaks."""
        self.close()
        self._on_event, self._on_lost, self._prefix = on_event, on_lost, prefix.encode()
        self._exits_of = unit_path(exits_of).encode() if exits_of else b""
        loop = asyncio.get_running_loop()
        bus = DBus()
        job_removed, unit_removed, disconnected, properties_changed = self._callbacks
        try:
            bus.open()
            bus.match_signal(None, LOCAL_PATH, LOCAL_IFACE, b"Disconnected", disconnected)
            bus.match_signal(DEST, MANAGER_PATH, MANAGER, b"JobRemoved", job_removed)
            bus.match_signal(DEST, MANAGER_PATH, MANAGER, b"UnitRemoved", unit_removed)
            if exits_of:
                bus.match_signal(DEST, None, PROPERTIES_IFACE, b"PropertiesChanged", properties_changed)
            bus.call_method(DEST, MANAGER_PATH, MANAGER, b"Subscribe", [])
        except DBusBaseError as exc:
            bus.close()
            raise SystemdError(f"cannot talk to systemd over the system bus: {_dbus_message(exc)}") from exc
        self._bus, self._loop, self._fd, self._disconnected = bus, loop, bus.get_fd(), False
        loop.add_reader(self._fd, self._drain)
        self._drain()

    def close(self) -> None:
        if self._loop is not None and self._fd is not None:
            self._loop.remove_reader(self._fd)
        if self._bus is not None:
            self._bus.close()
        self._bus, self._fd = None, None

    def _lost(self, reason: str) -> None:
        if self._bus is None:
            return
        log.error("lost the system bus connection: %s", reason)
        if self._loop is not None and self._fd is not None:
            self._loop.remove_reader(self._fd)  # before sd-bus closes it: the number may be reused
        self._fd = None
        self._bus = None  # pystemd frees it when its last reference goes
        self._on_lost(reason)

    def _drain(self) -> None:
        bus = self._bus
        if bus is None:
            return
        try:
            while not self._disconnected and not bus.process().is_empty():
                pass
        except DBusBaseError as exc:
            self._lost(_dbus_message(exc))
            return
        if self._disconnected:
            self._lost("the bus said Disconnected (dbus restarted?)")

    def _blocking(self, what: str, call: Callable[[DBus], Any]) -> Any:
        """One blocking round trip to PID 1 (bounded by $SYSTEMD_BUS_TIMEOUT,
        which the broker's supervisor sets short). A broken connection is
        reported (`_lost`); an unanswered call raises NoAnswer; any other
        D-Bus error a SystemdError saying `what` failed."""
        if self._bus is None:
            raise SystemdError(f"{what}: not connected to the system bus")
        try:
            return call(self._bus)
        except DBusBaseError as exc:
            message = _dbus_message(exc)
            if any(mark in message for mark in _CONNECTION_GONE):
                self._lost(message)
                raise NoAnswer(f"{what}: {message}") from exc
            if any(mark in message for mark in _NO_ANSWER):
                raise NoAnswer(f"{what}: systemd did not answer in time ({message})") from exc
            raise SystemdError(f"{what}: {message}") from exc
        finally:
            # A blocking call can leave signals queued without the fd turning readable.
            if self._loop is not None:
                self._loop.call_soon(self._drain)

    def _call(self, method: bytes, args: list[tuple[int, Any]], path: bytes = MANAGER_PATH,
              interface: bytes = MANAGER) -> Any:
        return self._blocking(f"systemd {method.decode()}",
                              lambda bus: bus.call_method(DEST, path, interface, method, args).body)

    # -- signals -------------------------------------------------------------
    @staticmethod
    def _guarded(handler: Callable[[Any], None]) -> Callable[..., None]:
        def callback(msg: Any, error: Any = None, userdata: Any = None) -> None:
            try:
                handler(msg)
            except Exception:  # pystemd would swallow it silently
                log.exception("error while handling a systemd signal")
        return callback

    def _on_disconnected(self, msg: Any) -> None:
        self._disconnected = True  # acted on once process() returns (not from inside it)

    def _on_job_removed(self, msg: Any) -> None:
        msg.process_reply(False)
        _id, job, _unit, result = msg.body  # (u job id, o job path, s unit, s result)
        name = self._start_jobs.pop(job, None)
        if name is not None and result == b"done":  # not ours, a stop job, or a failed start: nothing to say
            self._on_event(name.decode(), UnitActive(None))

    def _on_unit_removed(self, msg: Any) -> None:
        msg.process_reply(False)
        name, path = msg.body
        self._exited.discard(path)
        self._main_ends.pop(path, None)
        self._processes_gone.discard(path)
        if name.startswith(self._prefix):
            self._on_event(name.decode(), UNKNOWN_END)

    def _on_properties_changed(self, msg: Any) -> None:
        path = msg.get_path()  # read before the body, which is what costs
        if not self._exits_of or not path.startswith(self._exits_of) or path in self._exited:
            return
        msg.process_reply(False)
        interface, changed, _invalidated = msg.body
        if interface == SERVICE_IFACE.encode() and changed.get(b"ExecMainExitTimestamp"):
            self._main_ends[path] = end_from_service({key.decode(): _text(value) for key, value in changed.items()})
        elif interface == UNIT_IFACE.encode() and changed.get(b"SubState") in _PROCESSES_GONE:
            self._processes_gone.add(path)
        if path in self._processes_gone and (end := self._main_ends.pop(path, None)) is not None:
            self._exited.add(path)
            self._processes_gone.discard(path)
            self._on_event(unit_of_path(path.decode()), MainExited(end.result, end.exit_code, end.exit_status))

    # -- units ---------------------------------------------------------------
    def start_transient_service(self, name: str, properties: Mapping[str, Any],
                                stdio: Mapping[str, int] | None = None) -> None:
        props = dict(properties)
        for stream, fd in (stdio or {}).items():
            props[f"Standard{stream.capitalize()}FileDescriptor"] = fd
        args = apply_signature(b"ss", [name.encode(), b"fail"])
        args += encode_properties(props)
        args += [(ord("a"), b"(sa(sv))"), (-1, None)]  # no auxiliary units
        job = self._call(b"StartTransientUnit", args)
        # The reply precedes the job's JobRemoved on the bus: the map is ready for it.
        self._start_jobs[job if isinstance(job, bytes) else job[0]] = name.encode()

    def set_unit_properties(self, name: str, properties: Mapping[str, Any]) -> None:
        """Change a running unit's properties (runtime only: nothing is written
        to /etc), and wait for PID 1 to have applied them."""
        args = apply_signature(b"sb", [name.encode(), True]) + encode_properties(properties)
        self._call(b"SetUnitProperties", args)

    def control_group(self, name: str) -> str:
        """The unit's cgroup path, as under /sys/fs/cgroup (e.g. /unitbox.slice/x.service)."""
        return str(_text(self._blocking(f"reading {name}'s ControlGroup", lambda bus: bus.get_property(
            DEST, unit_path(name).encode(), SERVICE_IFACE.encode(), b"ControlGroup", b"s"))))

    def stop_unit(self, name: str) -> None:
        self._call(b"StopUnit", apply_signature(b"ss", [name.encode(), b"replace"]))

    def kill_unit(self, name: str, signal: int) -> None:
        """Send `signal` to every process of the unit (the unit itself goes on)."""
        self._call(b"KillUnit", apply_signature(b"ssi", [name.encode(), b"all", signal]))

    def list_units(self, patterns: list[str]) -> list[UnitInfo]:
        body = self._call(b"ListUnitsByPatterns",
                          apply_signature(b"asas", [[], [p.encode() for p in patterns]]))
        # (name, description, load, active, sub, following, path, job id, job type, job path)
        return [UnitInfo(_text(u[0]), _text(u[3]), _text(u[4]), has_job=bool(u[7])) for u in body]

    def probe(self, name: str) -> UnitInfo | UnitEnd:
        """Look at a unit once: still going (its UnitInfo), or over (its end
        as far as systemd still knows it; empty fields once it is unloaded)."""
        infos = self.list_units([name])
        if infos and not infos[0].over:
            return infos[0]
        if not infos:
            return UNKNOWN_END
        return self._read_end(unit_path(name).encode())

    def _read_end(self, path: bytes) -> UnitEnd:
        return end_from_service({key: self._property(path, key, sig) for key, sig in _END_PROPERTIES.items()})

    def _property(self, path: bytes, name: str, signature: bytes) -> Any:
        try:
            return _text(self._blocking(f"reading {name}", lambda bus: bus.get_property(
                DEST, path, SERVICE_IFACE.encode(), name.encode(), signature)))
        except SystemdError:
            return None  # unloaded in the meantime: what is known is what the result file says

    def ensure_slice(self, name: str, properties: Mapping[str, Any]) -> bool:
        """Start `name` as a transient slice unless the host already has it
        (e.g. from units/unitbox.slice). Returns True if it was created."""
        body = self._call(b"LoadUnit", apply_signature(b"s", [name.encode()]))
        path = body if isinstance(body, bytes) else body[0]
        load_state = _text(self._blocking(f"systemd LoadUnit {name}", lambda bus: bus.get_property(
            DEST, path, UNIT_IFACE.encode(), b"LoadState", b"s")))
        if load_state == "loaded":
            return False
        args = apply_signature(b"ss", [name.encode(), b"fail"])
        args += encode_properties(properties)
        args += [(ord("a"), b"(sa(sv))"), (-1, None)]
        self._call(b"StartTransientUnit", args)
        return True

    def version(self) -> str:
        """systemd's version; doubles as a liveness check of the bus and PID 1."""
        return str(_text(self._blocking("systemd does not answer", lambda bus: bus.get_property(
            DEST, MANAGER_PATH, MANAGER, b"Version", b"s"))))


def _dbus_message(exc: DBusBaseError) -> str:
    parts = [str(_text(p)) for p in exc.args[1:] if p]
    return ": ".join(parts) or str(_text(exc.args[0]) if exc.args else exc)
