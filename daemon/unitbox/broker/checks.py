"""What the broker accepts, checked again whatever the daemon already did:
the HTTP-facing process is the one exposed to clients, so nothing it sends
reaches PID 1 unchecked. A start names a run (16 hex digits), its limits
(each within the configured maxima), a runtime the broker itself knows, and
carries four descriptors: the program's stdin, stdout and stderr, and the
run's inputs directory (whose contents staging.py checks as it copies). No
path from the daemon is ever used: the broker has none to follow."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from unitbox.config import Config
from unitbox.errors import UnitboxError
from unitbox.limits import LIMIT_NAMES, Limits, resolve_limits
from unitbox.profile import LintMode, Runtime
from unitbox.runtimes import Runtimes

RUN_ID = re.compile(r"[0-9a-f]{16}")
STDIO = ("input", "output", "error")  # the program's, the first fds of a start
START_FDS = (*STDIO, "inputs")  # … and the run's inputs directory
MAX_FORGET = 1000  # run ids in one `forget`
# A start says what to run, never how: the profile (users, mounts, every
# property) is the broker's own. Any other field is refused, not ignored.
START_FIELDS = frozenset({"id", "op", "run", "limits", "runtime", "lint"})
SIGNALS = frozenset({15, 9})  # SIGTERM (a cancel's first step), SIGKILL


class Refused(UnitboxError):
    """The broker will not do this: the request is malformed or out of bounds."""

    status = 400


@dataclass(frozen=True, slots=True)
class StartOrder:
    run_id: str
    limits: Limits
    runtime: Runtime
    lint: LintMode = LintMode.OFF


def run_id(message: Mapping[str, Any]) -> str:
    return _checked_id(message.get("run"))


def _checked_id(value: Any) -> str:
    if not isinstance(value, str) or not RUN_ID.fullmatch(value):
        raise Refused(f"malformed run id {value!r}: expected 16 lowercase hex digits")
    return value


def signal_number(message: Mapping[str, Any]) -> int:
    value = message.get("signal")
    if not isinstance(value, int) or isinstance(value, bool) or value not in SIGNALS:
        raise Refused(f"signal {value!r} is not one the broker sends (SIGTERM or SIGKILL)")
    return value


def limits(message: Mapping[str, Any], config: Config) -> Limits:
    value = message.get("limits")
    if not isinstance(value, dict) or set(value) != set(LIMIT_NAMES):
        raise Refused(f"limits must name exactly {', '.join(LIMIT_NAMES)}")
    try:
        return resolve_limits(value, config.default_limits, config.maximum_limits)
    except UnitboxError as exc:
        raise Refused(f"limits refused: {exc.message}") from exc


def run_ids(message: Mapping[str, Any]) -> list[str]:
    value = message.get("runs")
    if not isinstance(value, list) or len(value) > MAX_FORGET:
        raise Refused(f"runs must be a list of at most {MAX_FORGET} run ids")
    return [_checked_id(item) for item in value]


def start_order(message: Mapping[str, Any], fds: list[int], config: Config, runtimes: Runtimes) -> StartOrder:
    if extra := sorted(set(message) - START_FIELDS):
        raise Refused(f"a start has no field {', '.join(map(repr, extra))}: the broker builds the unit itself")
    run = run_id(message)
    if len(fds) != len(START_FDS):
        raise Refused(f"a start carries {len(START_FDS)} file descriptors ({', '.join(START_FDS)}), got {len(fds)}")
    name = message.get("runtime")
    if not isinstance(name, str):
        raise Refused("runtime must be a name")
    try:
        runtime = runtimes.get(name)
    except UnitboxError as exc:
        raise Refused(exc.message) from exc
    try:
        lint = LintMode(message.get("lint", "off"))
    except ValueError:
        raise Refused(f"lint must be one of {', '.join(LintMode)}") from None
    return StartOrder(run, limits(message, config), runtime, lint)
