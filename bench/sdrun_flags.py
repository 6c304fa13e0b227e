"""unitbox's unit profile as `systemd-run -p` flags: what an operator would
script by hand to get the same sandbox without the daemon. Generated from
unitbox.profile.build_profile, so the baseline can never drift from the
daemon's profile; a property this module cannot spell is an error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The privileged shell scripts (ExecStartPre stages the run's inputs,
# ExecStopPost records its outcome) cannot travel inside a `-p` value
# (systemd-run parses it as a unit-file command line); the operator's version
# keeps each in a file and runs it the same way: same prefix, same arguments.
SCRIPT_FILES = {"ExecStartPre": "/var/lib/unitbox-baseline/start-pre.sh",
                "ExecStopPost": "/var/lib/unitbox-baseline/stop-post.sh"}


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def flags(profile: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(`-p` arguments, the command line) for `systemd-run`."""
    out: list[str] = []
    command: list[str] = []
    for name, value in profile.items():
        if name == "ExecStart":
            command = [value[0].lstrip("+:-"), *value[1:]]
        elif name in SCRIPT_FILES:  # [prefix…, "/bin/sh", "-c", SCRIPT, $0, args…]
            (command_line,) = _commands(value)  # the bench runs no lint: one command each
            split = command_line.index("-c")
            out.append(f"{name}={' '.join([*command_line[:split], SCRIPT_FILES[name], *command_line[split + 3:]])}")
        elif name == "CPUQuota":
            out.append(f"CPUQuota={value}%")
        elif name == "UMask":
            out.append(f"UMask={value:04o}")
        elif name == "RestrictNamespaces":
            out.append(f"RestrictNamespaces={_value(value)}")
        elif name in ("CapabilityBoundingSet", "AmbientCapabilities"):
            if value:
                raise ValueError(f"{name}: only an empty set is spelled here")
            out.append(f"{name}=")  # the empty assignment: no capabilities at all
        elif name in ("IPAddressDeny", "RestrictAddressFamilies", "SystemCallArchitectures"):
            out.append(f"{name}={' '.join(value)}")
        elif name in {"RuntimeMaxSec", "TimeoutStopSec", "TimeoutStartSec"}:
            out.append(f"{name}={value}s")
        elif isinstance(value, list):
            out += [f"{name}={_value(item)}" for item in value]
        elif isinstance(value, bool | int | str):
            out.append(f"{name}={_value(value)}")
        else:
            raise ValueError(f"no systemd-run spelling for {name}={value!r}")
    if not command:
        raise ValueError("the profile has no ExecStart")
    return [arg for item in out for arg in ("-p", item)], command


def _commands(value: list[Any]) -> list[list[str]]:
    """A property's command lines: one, or a list of them (ExecStartPre with lint)."""
    return value if isinstance(value[0], list) else [value]


def script_files(profile: Mapping[str, Any]) -> dict[str, str]:
    """{path: shell script} for every command spelled through SCRIPT_FILES."""
    found = {}
    for name, path in SCRIPT_FILES.items():
        if name in profile:
            (command_line,) = _commands(profile[name])
            found[path] = str(command_line[command_line.index("-c") + 1])
    return found
