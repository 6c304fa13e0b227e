"""Per-run resource limits: the server's defaults and maxima, and the one
function that turns what a client asked for into the limits a run gets."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from unitbox.errors import InvalidLimits


@dataclass(frozen=True, slots=True)
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 256
    cpu_percent: int = 100
    tasks: int = 64
    output_kb: int = 1024
    disk_mb: int = 64

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


# The fewest tasks a run can start with (measured on systemd 252): with
# TasksMax=1 the unit fails with 217/USER before the program runs, since
# setting up PrivateUsers= forks a helper inside the unit's cgroup; with 2,
# a program, a thread or a child process works.
MIN_TASKS = 2
_MINIMA: dict[str, int] = {"tasks": MIN_TASKS}

LIMIT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Limits))
_INTEGER_LIMITS = frozenset(n for n in LIMIT_NAMES if n != "timeout_s")


def default_maxima() -> Limits:
    cores = os.cpu_count() or 1
    return Limits(
        timeout_s=300.0,
        memory_mb=4096,
        cpu_percent=100 * cores,
        tasks=1024,
        output_kb=65536,
        disk_mb=4096,
    )


def _check_one(name: str, value: object, maximum: float) -> float | int:
    # bool is an int subclass; "true" is not a limit.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidLimits(name, "must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidLimits(name, "must be a finite number")
    if value <= 0:
        raise InvalidLimits(name, f"must be greater than 0, got {value}")
    if value < _MINIMA.get(name, 0):
        raise InvalidLimits(name, f"must be at least {_MINIMA[name]} (systemd cannot start a run with fewer), "
                                  f"got {value}")
    if value > maximum:
        raise InvalidLimits(name, f"must be at most {maximum:g} (the server's maximum), got {value}")
    if name in _INTEGER_LIMITS:
        if isinstance(value, float) and not value.is_integer():
            raise InvalidLimits(name, f"must be a whole number, got {value}")
        return int(value)
    return float(value)


def resolve_limits(requested: Mapping[str, object] | None, defaults: Limits, maxima: Limits) -> Limits:
    """The effective limits of a run: each requested field checked against the
    server's maximum, each missing field taken from the defaults. Never clamps:
    a value out of range is an error naming the field."""
    requested = requested or {}
    unknown = sorted(set(requested) - set(LIMIT_NAMES))
    if unknown:
        raise InvalidLimits(unknown[0], "is not a known limit")
    values: dict[str, float | int] = defaults.as_dict()
    for name, value in requested.items():
        values[name] = _check_one(name, value, getattr(maxima, name))
    return Limits(**values)  # type: ignore[arg-type]
