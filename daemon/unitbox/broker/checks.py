"""What the broker accepts, checked again whatever the daemon already did:
the HTTP-facing process is the one exposed to clients, so nothing it sends
reaches PID 1 unchecked. A start names a run (16 hex digits), its limits
(each within the configured maxima), a runtime the broker itself knows, and
the run's directory: `<state_dir>/runs/<id>`, a real directory, no symlink
anywhere on the way."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unitbox.config import Config
from unitbox.errors import UnitboxError
from unitbox.limits import LIMIT_NAMES, Limits, resolve_limits
from unitbox.profile import LintMode, Runtime
from unitbox.runtimes import Runtimes

RUN_ID = re.compile(r"[0-9a-f]{16}")
STDIO = ("input", "output", "error")  # the fds of a start, in this order
SIGNALS = frozenset({15, 9})  # SIGTERM (a cancel's first step), SIGKILL


class Refused(UnitboxError):
    """The broker will not do this: the request is malformed or out of bounds."""

    status = 400


@dataclass(frozen=True, slots=True)
class StartOrder:
    run_id: str
    limits: Limits
    runtime: Runtime
    run_dir: Path
    lint: LintMode = LintMode.OFF


def run_id(message: Mapping[str, Any]) -> str:
    value = message.get("run")
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


def run_dir(message: Mapping[str, Any], config: Config, run: str) -> Path:
    value = message.get("dir")
    expected = config.runs_dir / run
    if not isinstance(value, str) or Path(value) != expected or os.path.normpath(value) != value:
        raise Refused(f"run directory {value!r} is not {expected}")
    # Every component from / down must be a real directory: a symlink could
    # point the unit's mounts (and the privileged staging step) anywhere.
    path = Path("/")
    for part in expected.parts[1:]:
        path /= part
        try:
            mode = os.lstat(path).st_mode
        except OSError as exc:
            raise Refused(f"run directory {expected}: {path} is missing ({exc.strerror})") from exc
        if stat.S_ISLNK(mode):
            raise Refused(f"run directory {expected}: {path} is a symlink")
        if not stat.S_ISDIR(mode):
            raise Refused(f"run directory {expected}: {path} is not a directory")
    return expected


def start_order(message: Mapping[str, Any], fds: list[int], config: Config, runtimes: Runtimes) -> StartOrder:
    run = run_id(message)
    if len(fds) != len(STDIO):
        raise Refused(f"a start carries {len(STDIO)} file descriptors ({', '.join(STDIO)}), got {len(fds)}")
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
    return StartOrder(run, limits(message, config), runtime, run_dir(message, config, run), lint)
