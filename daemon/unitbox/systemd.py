"""The systemd adapter: the only module that talks to PID 1 (through pystemd).

One system-bus connection, driven from the asyncio loop (the bus fd under
`loop.add_reader`, no polling). `Subscribe()`, one wildcard
PropertiesChanged match and the Manager's UnitRemoved are set up when the bus
opens, i.e. before any StartTransientUnit, so no change of a unit is missed.
What comes out is typed: a watcher gets `UnitActive` once and `UnitEnd` once;
D-Bus names, signatures and timestamp formats never leave this module.

When is a unit over? As `systemd-run --wait` decides it: ActiveState is
`inactive` or `failed` *with no job pending*, or the unit was unloaded. It
never needs to have been seen active: systemd merges queued signals when its
bus queue is long, and a short run can arrive as one final `inactive`.

A lost bus (dbus restarted, the connection dropped) is detected from sd-bus's
local `Disconnected` message or from a call failing with ENOTCONN; the reader
is removed at once (sd-bus closes the fd, and its number may be reused) and
`on_lost` is called: the owner reconnects and looks at every unit again."""

from __future__ import annotations

import asyncio
import logging
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
PROPERTIES = b"org.freedesktop.DBus.Properties"
LOCAL_PATH = b"/org/freedesktop/DBus/Local"
LOCAL_IFACE = b"org.freedesktop.DBus.Local"
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
OVER = ("inactive", "failed")
_CONNECTION_GONE = ("ENOTCONN", "ECONNRESET", "EPIPE", "err -107", "err -104", "err -32")
_END_PROPERTIES = {"Result": b"s", "ExecMainCode": b"i", "ExecMainStatus": b"i",
                   "ExecMainStartTimestamp": b"t", "ExecMainExitTimestamp": b"t"}
_EXEC_CODES = {1: "exited", 2: "killed", 3: "dumped"}  # CLD_EXITED, CLD_KILLED, CLD_DUMPED


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


UnitEvent = UnitActive | UnitEnd
Watcher = Callable[[UnitEvent], None]


@dataclass(frozen=True, slots=True)
class UnitInfo:
    name: str
    active_state: str
    sub_state: str
    has_job: bool = False

    @property
    def over(self) -> bool:
        return self.active_state in OVER and not self.has_job


def _seconds(usec: Any) -> float | None:
    return usec / 1e6 if isinstance(usec, int) and usec > 0 else None


@dataclass(slots=True)
class UnitTracker:
    """What the signals said about one unit so far; turns them into events
    (pure: fed decoded signal bodies, testable without a bus)."""

    active_state: str = ""
    has_job: bool = True  # a unit is watched before its start job exists
    service: dict[str, Any] = field(default_factory=dict)
    announced: bool = False
    ended: bool = False

    def apply(self, interface: str, values: Mapping[str, Any]) -> list[UnitEvent]:
        if interface == SERVICE_IFACE:
            self.service.update(values)  # systemd sends these just before the Unit's own
            return []
        if interface != UNIT_IFACE:
            return []
        self.active_state = values.get("ActiveState", self.active_state)
        if isinstance(job := values.get("Job"), tuple | list) and job:
            self.has_job = job[0] != 0
        events: list[UnitEvent] = []
        if self.active_state == "active" and not self.announced:
            self.announced = True
            events.append(UnitActive(_seconds(self.service.get("ExecMainStartTimestamp"))))
        if self.active_state in OVER and not self.has_job:
            events += self.end()
        return events

    def end(self) -> list[UnitEvent]:
        """The unit is over (or unloaded): its one UnitEnd, if not given yet."""
        if self.ended:
            return []
        self.ended = True
        return [end_from_service(self.service)]


def end_from_service(service: Mapping[str, Any]) -> UnitEnd:
    code = service.get("ExecMainCode")
    status = service.get("ExecMainStatus")
    exit_code = _EXEC_CODES.get(code, "") if isinstance(code, int) else ""
    return UnitEnd(result=str(service.get("Result") or ""), exit_code=exit_code,
                   exit_status=str(status) if exit_code and isinstance(status, int) else "",
                   started_at=_seconds(service.get("ExecMainStartTimestamp")),
                   exited_at=_seconds(service.get("ExecMainExitTimestamp")))


class UnitManager(Protocol):
    """What the engine needs of systemd: `Systemd` below, or a fake in the fast tests."""

    def open(self, on_lost: Callable[[str], None] | None = None) -> None: ...
    def close(self) -> None: ...
    def watch(self, name: str, watcher: Watcher) -> None: ...
    def unwatch(self, name: str) -> None: ...
    def start_transient_service(self, name: str, properties: Mapping[str, Any],
                                stdio: Mapping[str, int] | None = None) -> None: ...
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


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


class Systemd:
    """A typed view of PID 1's manager, for one asyncio loop."""

    def __init__(self) -> None:
        self._bus: DBus | None = None
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: dict[str, tuple[str, Watcher, UnitTracker]] = {}  # path → (name, watcher, tracker)
        self._on_lost: Callable[[str], None] = lambda reason: None
        self._disconnected = False
        # pystemd keeps only a borrowed pointer to each callback: hold them here.
        self._callbacks = (self._guarded(self._on_properties), self._guarded(self._on_unit_removed),
                           self._guarded(self._on_disconnected))

    # -- connection ---------------------------------------------------------
    def open(self, on_lost: Callable[[str], None] | None = None) -> None:
        """Connect and subscribe. `on_lost(reason)` is called once if the
        connection later breaks; `open()` again to reconnect."""
        self.close()
        if on_lost is not None:
            self._on_lost = on_lost
        loop = asyncio.get_running_loop()
        bus = DBus()
        properties, removed, disconnected = self._callbacks
        try:
            bus.open()
            bus.match_signal(None, LOCAL_PATH, LOCAL_IFACE, b"Disconnected", disconnected)
            bus.match_signal(DEST, None, PROPERTIES, b"PropertiesChanged", properties)
            bus.match_signal(DEST, MANAGER_PATH, MANAGER, b"UnitRemoved", removed)
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
        """One blocking round trip to PID 1. A broken connection is reported
        (`_lost`); any D-Bus error becomes a SystemdError saying `what` failed."""
        if self._bus is None:
            raise SystemdError(f"{what}: not connected to the system bus")
        try:
            return call(self._bus)
        except DBusBaseError as exc:
            message = _dbus_message(exc)
            if any(mark in message for mark in _CONNECTION_GONE):
                self._lost(message)
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

    def _on_properties(self, msg: Any) -> None:
        entry = self._watched.get(_text(msg.get_path()))
        if entry is None:
            return
        msg.process_reply(False)
        interface, changed, _invalidated = msg.body
        values = {_text(k): _text(v) for k, v in changed.items()}
        self._deliver(entry, entry[2].apply(_text(interface), values))

    def _on_unit_removed(self, msg: Any) -> None:
        msg.process_reply(False)
        _name, path = msg.body
        entry = self._watched.get(_text(path))
        if entry is not None:
            self._deliver(entry, entry[2].end())

    def _deliver(self, entry: tuple[str, Watcher, UnitTracker], events: list[UnitEvent]) -> None:
        name, watcher, _tracker = entry
        for event in events:
            if isinstance(event, UnitEnd):
                self._watched.pop(unit_path(name), None)
            watcher(event)

    def watch(self, name: str, watcher: Watcher) -> None:
        """Call `watcher` with UnitActive (at most once), then UnitEnd (once).
        Set it up before starting the unit."""
        self._watched[unit_path(name)] = (name, watcher, UnitTracker())

    def unwatch(self, name: str) -> None:
        self._watched.pop(unit_path(name), None)

    # -- units ---------------------------------------------------------------
    def start_transient_service(self, name: str, properties: Mapping[str, Any],
                                stdio: Mapping[str, int] | None = None) -> None:
        props = dict(properties)
        for stream, fd in (stdio or {}).items():
            props[f"Standard{stream.capitalize()}FileDescriptor"] = fd
        args = apply_signature(b"ss", [name.encode(), b"fail"])
        args += encode_properties(props)
        args += [(ord("a"), b"(sa(sv))"), (-1, None)]  # no auxiliary units
        self._call(b"StartTransientUnit", args)

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
            return UnitEnd("", "", "", None, None)
        path = unit_path(name).encode()
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
