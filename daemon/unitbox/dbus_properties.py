"""Unit properties in unitbox's unit-file vocabulary → the typed D-Bus
arguments of StartTransientUnit, a(sv) (pure; used by the systemd adapter).
pystemd 0.15's signature table lacks many of the hardening properties (it
raises KeyError), so the whole vocabulary unitbox uses is spelled out here,
from org.freedesktop.systemd1(5)."""

from __future__ import annotations

import errno
import signal
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pystemd.dbuslib import apply_signature

MS_REC = 16384

_SIMPLE: dict[str, bytes] = {
    **dict.fromkeys(
        ["Description", "Slice", "Type", "KillMode", "OOMPolicy", "CollectMode", "WorkingDirectory",
         "ProtectSystem", "ProtectHome", "ProtectProc", "ProcSubset", "KeyringMode", "DevicePolicy",
         "ProtectControlGroupsEx"], b"s"),
    **dict.fromkeys(
        ["DynamicUser", "PrivateUsers", "PrivateNetwork", "PrivateDevices", "PrivateIPC", "PrivateTmp",
         "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
         "ProtectClock", "ProtectHostname", "NoNewPrivileges", "RestrictSUIDSGID", "LockPersonality",
         "RestrictRealtime", "CPUAccounting", "MemoryAccounting", "TasksAccounting", "IPAccounting",
         "Delegate", "MemoryDenyWriteExecute", "RemoveIPC", "SendSIGKILL"], b"b"),
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


def _exec(value: list[str] | list[list[str]]) -> tuple[str, bytes, Any]:
    """A command line in unit-file form, its prefixes (`+`, `:`, `-`) included;
    or a list of them, run one after the other."""
    commands = [value] if isinstance(value[0], str) else value
    converted = []
    for command in commands:
        path, *rest = command
        flags = []
        while path[:1] in _EXEC_PREFIXES:
            flags.append(_EXEC_PREFIXES[path[0]])
            path = path[1:]
        converted.append((path, [path, *rest], flags))
    return "Ex", b"a(sasas)", converted


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
    "TimeoutStartSec": lambda s: ("TimeoutStartUSec", b"t", int(s * _USEC)),
    "KillSignal": lambda name: ("KillSignal", b"i", int(signal.Signals[name])),
    "IPAddressDeny": lambda v: ("IPAddressDeny", b"a(iayu)", _ip_any(v)),
    "RestrictAddressFamilies": lambda fams: ("RestrictAddressFamilies", b"(bas)", (True, list(fams))),
    "TemporaryFileSystem": lambda specs: ("TemporaryFileSystem", b"a(ss)", [_split(s) for s in specs]),
    "BindReadOnlyPaths": lambda specs: ("BindReadOnlyPaths", b"a(ssbt)", [_bind(s) for s in specs]),
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
