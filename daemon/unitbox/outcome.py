"""Run states and how a finished unit's outcome maps onto them (pure)."""

from __future__ import annotations

import math
import signal as signals
from dataclasses import dataclass
from enum import StrEnum


class RunState(StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    OOM_KILLED = "oom_killed"
    CANCELLED = "cancelled"
    ERROR = "error"

    @property
    def terminal(self) -> bool:
        return self not in (RunState.QUEUED, RunState.STARTING, RunState.RUNNING)


# Exit statuses systemd itself uses when it cannot set up or exec the program
# (203/EXEC, 226/NAMESPACE, …); see systemd.exec(5), "Process Exit Codes".
SYSTEMD_SETUP_STATUSES = range(200, 244)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What ExecStopPost recorded in the run's `result` file."""

    service_result: str  # $SERVICE_RESULT: success, exit-code, signal, timeout, oom-kill, …
    exit_code: str  # $EXIT_CODE: exited, killed, dumped, or "" if nothing ran
    exit_status: str  # $EXIT_STATUS: a number, or a signal name such as KILL
    cpu_ns: int | None = None
    memory_peak: int | None = None
    oom_kills: int = 0
    started_at: float | None = None  # wall clock: the run set up, its program about to start
    exited_at: float | None = None  # … and every process of it gone


def parse_result_file(text: str, written_at: float | None = None) -> Outcome | None:
    """The result file's key=value lines; None if it is missing or incomplete.
    `written_at`: the file's mtime, which turns the recorder's uptime
    readings into wall-clock times."""
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if values.get("end") != "1":
        return None

    def number(key: str) -> int | None:
        raw = values.get(key, "")
        return int(raw) if raw.isdigit() else None

    def uptime(key: str) -> float | None:
        try:
            value = float(values.get(key, ""))
        except ValueError:
            return None
        return value if math.isfinite(value) and value >= 0 else None

    started, exited, written = (uptime(f"{k}_uptime") for k in ("started", "exited", "written"))
    clock = written_at - written if written_at is not None and written is not None else None
    return Outcome(
        service_result=values.get("service_result", ""),
        exit_code=values.get("exit_code", ""),
        exit_status=values.get("exit_status", ""),
        cpu_ns=number("cpu_ns"),
        memory_peak=number("memory_peak"),
        oom_kills=number("oom_kill") or 0,
        started_at=started + clock if clock is not None and started is not None and exited is not None
        and started <= exited else None,
        exited_at=exited + clock if clock is not None and exited is not None else None,
    )


@dataclass(frozen=True, slots=True)
class Verdict:
    state: RunState
    exit_code: int | None = None
    signal: str | None = None
    error: str | None = None


def signal_name(status: str) -> str:
    """EXIT_STATUS of a killed process ("KILL", or a number) as "SIGKILL"."""
    if status.isdigit():
        try:
            return signals.Signals(int(status)).name
        except ValueError:
            return f"SIG{status}"
    return status if status.startswith("SIG") else f"SIG{status}"


def classify(outcome: Outcome, *, cancelled: bool, ran: bool, exited_in_time: bool = False) -> Verdict:
    """The run state for a finished unit. `ran`: the program itself was
    executed. `exited_in_time`: its main process ended before timeout_s."""
    exit_code = int(outcome.exit_status) if outcome.exit_code == "exited" and outcome.exit_status.isdigit() else None
    sig = signal_name(outcome.exit_status) if outcome.exit_code in ("killed", "dumped") else None
    if cancelled:
        return Verdict(RunState.CANCELLED, exit_code, sig)
    leftover_stop_timed_out = outcome.exit_code == "exited" and exited_in_time
    if outcome.service_result == "timeout" and not leftover_stop_timed_out:
        return Verdict(RunState.TIMED_OUT, exit_code, sig, "the run reached its timeout_s limit")
    if outcome.service_result == "oom-kill" or (outcome.oom_kills > 0 and exit_code != 0):
        return Verdict(RunState.OOM_KILLED, exit_code, sig, "the run reached its memory_mb limit")
    if not outcome.exit_code or (not ran and exit_code in SYSTEMD_SETUP_STATUSES):
        return Verdict(RunState.ERROR, None, None,
                       f"systemd could not start the program (result {outcome.service_result or 'unknown'}, "
                       f"status {outcome.exit_status or 'none'})")
    if exit_code == 0:
        return Verdict(RunState.SUCCEEDED, 0)
    return Verdict(RunState.FAILED, exit_code, sig)
