"""The systemd adapter: the only module that imports pystemd.

One system-bus connection, driven from the asyncio loop (the bus fd under
`loop.add_reader`, no polling). `Subscribe()` and one wildcard
PropertiesChanged match are set up when the bus opens, i.e. before any
StartTransientUnit, so no state change of a unit is ever missed. Bytes,
D-Bus signatures and pystemd's quirks stay in here; the rest of unitbox
speaks in unit names and plain Python values."""

from __future__ import annotations

import asyncio
import errno
import logging
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pystemd.dbusexc import DBusBaseError
from pystemd.dbuslib import DBus, apply_signature

from unitbox.errors import SystemdError

log = logging.getLogger(__name__)

DEST = b"org.freedesktop.systemd1"
MANAGER_PATH = b"/org/freedesktop/systemd1"
MANAGER = b"org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
PROPERTIES = b"org.freedesktop.DBus.Properties"
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
MS_REC = 16384

# Signatures of the properties a transient unit gets from us. pystemd 0.15's
# table lacks many of the hardening ones (it raises KeyError), so the whole
# vocabulary unitbox uses is spelled out here, from org.freedesktop.systemd1(5).
_SIMPLE: dict[str, bytes] = {
    **dict.fromkeys(
        ["Description", "Slice", "Type", "KillMode", "OOMPolicy", "CollectMode", "WorkingDirectory",
         "ProtectSystem", "ProtectHome", "ProtectProc", "ProcSubset", "KeyringMode", "DevicePolicy"], b"s"),
    **dict.fromkeys(
        ["DynamicUser", "PrivateUsers", "PrivateNetwork", "PrivateDevices", "PrivateIPC", "PrivateTmp",
         "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
         "ProtectClock", "ProtectHostname", "NoNewPrivileges", "RestrictSUIDSGID", "LockPersonality",
         "RestrictRealtime", "CPUAccounting", "MemoryAccounting", "TasksAccounting", "IPAccounting",
         "Delegate", "MemoryDenyWriteExecute", "RemoveIPC"], b"b"),
    **dict.fromkeys(
        ["MemoryMax", "MemoryHigh", "MemorySwapMax", "TasksMax", "LimitFSIZE", "LimitNOFILE", "LimitCORE",
         "LimitNPROC", "CPUWeight", "CPUShares"], b"t"),
    **dict.fromkeys(["Environment", "InaccessiblePaths", "ReadOnlyPaths", "SystemCallArchitectures"], b"as"),
    **dict.fromkeys(["StandardInputFileDescriptor", "StandardOutputFileDescriptor",
                     "StandardErrorFileDescriptor"], b"h"),
    "UMask": b"u",
}
_USEC = 1_000_000


def _ip_any(_: Any) -> list[tuple[int, bytes, int]]:
    return [(2, bytes(4), 0), (10, bytes(16), 0)]  # AF_INET 0.0.0.0/0, AF_INET6 ::/0


_EXEC_PREFIXES = {"+": "privileged", ":": "no-env-expand", "-": "ignore-failure"}


def _exec(value: list[str]) -> tuple[str, bytes, Any]:
    """A command line in unit-file form, its prefixes (`+`, `:`, `-`) included."""
    path, *rest = value
    flags = []
    while path[:1] in _EXEC_PREFIXES:
        flags.append(_EXEC_PREFIXES[path[0]])
        path = path[1:]
    return "Ex", b"a(sasas)", [(path, [path, *rest], flags)]


def _split(spec: str) -> tuple[str, str]:
    head, _, tail = spec.partition(":")
    return head, tail


def _bind(spec: str) -> tuple[str, str, bool, int]:
    """`[-]SOURCE:DEST` (unit-file form; `-`: a missing source is ignored)."""
    source, dest = _split(spec.removeprefix("-"))
    return source, dest, spec.startswith("-"), MS_REC


# name -> (D-Bus name, signature, value) for the properties that need converting.
_CONVERTED: dict[str, Callable[[Any], tuple[str, bytes, Any]]] = {
    "CPUQuota": lambda pct: ("CPUQuotaPerSecUSec", b"t", int(pct * _USEC // 100)),
    "RuntimeMaxSec": lambda s: ("RuntimeMaxUSec", b"t", int(s * _USEC)),
    "TimeoutStopSec": lambda s: ("TimeoutStopUSec", b"t", int(s * _USEC)),
    "IPAddressDeny": lambda v: ("IPAddressDeny", b"a(iayu)", _ip_any(v)),
    "RestrictAddressFamilies": lambda fams: ("RestrictAddressFamilies", b"(bas)", (True, list(fams))),
    "TemporaryFileSystem": lambda specs: ("TemporaryFileSystem", b"a(ss)", [_split(s) for s in specs]),
    "BindReadOnlyPaths": lambda specs: ("BindReadOnlyPaths", b"a(ssbt)",
                                        [(*_split(s), False, MS_REC) for s in specs]),
    "BindPaths": lambda specs: ("BindPaths", b"a(ssbt)", [_bind(s) for s in specs]),
    "CapabilityBoundingSet": lambda caps: ("CapabilityBoundingSet", b"t", _capabilities(caps)),
    "AmbientCapabilities": lambda caps: ("AmbientCapabilities", b"t", _capabilities(caps)),
    "RestrictNamespaces": lambda on: ("RestrictNamespaces", b"t", 0 if on else (1 << 64) - 1),
    "SystemCallErrorNumber": lambda name: ("SystemCallErrorNumber", b"i", getattr(errno, name)),
    "LogExtraFields": lambda fields: ("LogExtraFields", b"aay", [f.encode() for f in fields]),
}


def _capabilities(caps: Iterable[str]) -> int:
    if list(caps):
        raise ValueError("only an empty capability set is supported")
    return 0


def _property_entries(name: str, value: Any) -> list[tuple[str, bytes, Any]]:
    if name in ("ExecStart", "ExecStopPost", "ExecStartPre", "ExecStartPost"):
        suffix, sig, converted = _exec(value)
        return [(name + suffix, sig, converted)]
    if name == "SystemCallFilter":  # one entry per line, like the unit-file form
        return [("SystemCallFilter", b"(bas)", (not rule.startswith("~"), rule.removeprefix("~").split()))
                for rule in value]
    if name in _CONVERTED:
        return [_CONVERTED[name](value)]
    if name in _SIMPLE:
        return [(name, _SIMPLE[name], value)]
    raise KeyError(f"the systemd adapter has no signature for property {name}")


def encode_properties(properties: Mapping[str, Any]) -> list[tuple[int, Any]]:
    """Unit-file style properties → pystemd's typed argument list a(sv)."""
    args: list[tuple[int, Any]] = [(ord("a"), b"(sv)")]
    for name, value in properties.items():
        for dbus_name, signature, dbus_value in _property_entries(name, value):
            args += [(ord("r"), b"sv"), (ord("s"), dbus_name.encode()), (ord("v"), signature)]
            args += apply_signature(signature, [dbus_value])
            args += [(-1, None), (-1, None)]
    args += [(-1, None)]
    return args


_PATH_SAFE = set(string.ascii_letters + string.digits)


def unit_path(name: str) -> str:
    """The unit's D-Bus object path: every byte that is not [A-Za-z0-9] as _xx."""
    return UNIT_PATH_PREFIX + "".join(c if c in _PATH_SAFE else f"_{ord(c):02x}" for c in name)


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(slots=True)
class UnitSnapshot:
    """What the signals told us about a unit so far."""

    active_state: str = ""
    sub_state: str = ""
    service: dict[str, Any] = field(default_factory=dict)
    started: bool = False
    """Seen in a state other than `inactive` (a new unit is loaded inactive)."""

    @property
    def finished(self) -> bool:
        return self.active_state == "failed" or (self.active_state == "inactive" and self.started)


@dataclass(frozen=True, slots=True)
class UnitInfo:
    name: str
    active_state: str
    sub_state: str


Watcher = Callable[[UnitSnapshot], None]


class Systemd:
    """A typed view of PID 1's manager, for one asyncio loop."""

    def __init__(self) -> None:
        self._bus: DBus | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchers: dict[str, tuple[Watcher, UnitSnapshot]] = {}
        # pystemd keeps only a borrowed pointer to the callback: hold it here.
        self._signal_callback = self._make_signal_callback()

    # -- connection ---------------------------------------------------------
    def open(self) -> None:
        loop = asyncio.get_running_loop()
        bus = DBus()
        try:
            bus.open()
            bus.match_signal(DEST, None, PROPERTIES, b"PropertiesChanged", self._signal_callback)
            bus.call_method(DEST, MANAGER_PATH, MANAGER, b"Subscribe", [])
        except DBusBaseError as exc:
            raise SystemdError(f"cannot talk to systemd over the system bus: {exc}") from exc
        self._bus, self._loop = bus, loop
        loop.add_reader(bus.get_fd(), self._drain)
        self._drain()

    def close(self) -> None:
        if self._bus is not None and self._loop is not None:
            self._loop.remove_reader(self._bus.get_fd())
            self._bus.close()
        self._bus = None

    @property
    def is_open(self) -> bool:
        return self._bus is not None

    def _drain(self) -> None:
        bus = self._bus
        if bus is None:
            return
        try:
            while not bus.process().is_empty():
                pass
        except DBusBaseError:
            log.exception("the system bus connection failed")
            self.close()

    def _call(self, method: bytes, args: list[tuple[int, Any]], path: bytes = MANAGER_PATH,
              interface: bytes = MANAGER) -> Any:
        if self._bus is None:
            raise SystemdError("not connected to systemd")
        try:
            return self._bus.call_method(DEST, path, interface, method, args).body
        except DBusBaseError as exc:
            raise SystemdError(f"systemd {method.decode()}: {_dbus_message(exc)}") from exc
        finally:
            # A blocking call can leave signals queued without the fd turning readable.
            if self._loop is not None:
                self._loop.call_soon(self._drain)

    def _get_property(self, path: bytes, interface: bytes, name: bytes, signature: bytes) -> Any:
        if self._bus is None:
            raise SystemdError("not connected to systemd")
        try:
            return self._bus.get_property(DEST, path, interface, name, signature)
        except DBusBaseError as exc:
            raise SystemdError(_dbus_message(exc)) from exc
        finally:
            # Like every blocking call, it may have read signals into sd-bus's
            # queue: drain them, or a unit's end could sit there unseen.
            if self._loop is not None:
                self._loop.call_soon(self._drain)

    # -- signals -------------------------------------------------------------
    def _make_signal_callback(self) -> Callable[..., None]:
        def on_properties_changed(msg: Any, error: Any = None, userdata: Any = None) -> None:
            try:
                self._on_signal(msg)
            except Exception:  # pystemd would swallow it silently
                log.exception("error while handling a systemd signal")
        return on_properties_changed

    def _on_signal(self, msg: Any) -> None:
        path = _text(msg.get_path())
        entry = self._watchers.get(path)
        if entry is None:
            return
        watcher, snapshot = entry
        msg.process_reply(False)
        interface, changed, _invalidated = msg.body
        interface = _text(interface)
        values = {_text(k): _text(v) for k, v in changed.items()}
        if interface == UNIT_IFACE:
            snapshot.active_state = values.get("ActiveState", snapshot.active_state)
            snapshot.sub_state = values.get("SubState", snapshot.sub_state)
            if snapshot.active_state not in ("", "inactive"):
                snapshot.started = True
        elif interface == SERVICE_IFACE:
            snapshot.service.update(values)
        else:
            return
        watcher(snapshot)

    def watch(self, name: str, watcher: Watcher) -> None:
        """Call `watcher` on every state change of unit `name`. Set it up before
        starting the unit."""
        self._watchers[unit_path(name)] = (watcher, UnitSnapshot())

    def unwatch(self, name: str) -> None:
        self._watchers.pop(unit_path(name), None)

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
        self._call(b"KillUnit", apply_signature(b"ssi", [name.encode(), b"all", signal]))

    def list_units(self, patterns: list[str]) -> list[UnitInfo]:
        body = self._call(b"ListUnitsByPatterns",
                          apply_signature(b"asas", [[], [p.encode() for p in patterns]]))
        return [UnitInfo(_text(u[0]), _text(u[3]), _text(u[4])) for u in body]  # the one out-arg, unwrapped

    def unit_state(self, name: str) -> UnitInfo | None:
        """The unit's current state, or None when systemd does not have it loaded."""
        infos = self.list_units([name])
        return infos[0] if infos else None

    def ensure_slice(self, name: str, properties: Mapping[str, Any]) -> bool:
        """Start `name` as a transient slice unless the host already has it
        (e.g. from units/unitbox.slice). Returns True if it was created."""
        try:
            body = self._call(b"LoadUnit", apply_signature(b"s", [name.encode()]))
            path = body if isinstance(body, bytes) else body[0]
            load_state = _text(self._get_property(path, UNIT_IFACE.encode(), b"LoadState", b"s"))
        except SystemdError as exc:
            raise SystemdError(f"systemd LoadUnit {name}: {exc.message}") from exc
        if load_state == "loaded":
            return False
        args = apply_signature(b"ss", [name.encode(), b"fail"])
        args += encode_properties(properties)
        args += [(ord("a"), b"(sa(sv))"), (-1, None)]
        self._call(b"StartTransientUnit", args)
        return True

    def version(self) -> str:
        """systemd's version; doubles as a liveness check of the bus and PID 1."""
        try:
            return str(_text(self._get_property(MANAGER_PATH, MANAGER, b"Version", b"s")))
        except SystemdError as exc:
            raise SystemdError(f"systemd does not answer: {exc.message}") from exc


def _dbus_message(exc: DBusBaseError) -> str:
    parts = [str(_text(p)) for p in exc.args[1:] if p]
    return ": ".join(parts) or str(exc)
