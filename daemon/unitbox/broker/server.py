"""`unitbox broker`: owns the system-bus connection (systemd.py) and does
what the daemon asks, one request at a time and answered in order (the
daemon pipelines them): start run R, stop R, send R a signal, list our
units, look at R, forget what root wrote for R, health. Each start is
checked (checks.py), its inputs staged (staging.py) and its unit profile
built here (profile.py), from the broker's own configuration. Every
refusal is logged: in the packaged split the daemon is another user, and a
refused request from it means a bug or a daemon taken over.

It tells the daemon `ready` once subscribed, then each of our units'
`active` and `end`. If the bus is lost it says `down` and exits: the daemon
starts a new broker and looks at every run again, which is the one recovery
path for a dead broker and a lost bus alike. It exits, too, when the daemon
hangs up."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from unitbox import collect
from unitbox.broker import checks
from unitbox.broker.checks import Refused
from unitbox.broker.peer import peer_of
from unitbox.broker.staging import InputBudget, drop_stage, forget_ends, make_ends, stage_inputs
from unitbox.broker.warm import WarmPools, lifetime_s
from unitbox.broker.wire import Channel, Message, end_to_wire, info_to_wire
from unitbox.config import Config, WarmSection
from unitbox.errors import SystemdError, UnitboxError
from unitbox.limits import Limits
from unitbox.lint import find_linter
from unitbox.outcome import parse_result_file
from unitbox.profile import (
    STAGE_ROOT,
    UNIT_PREFIX,
    WARM_PREFIX,
    Collector,
    LintMode,
    Runtime,
    build_profile,
    build_warm_profile,
    fallback_result,
    run_id_of,
    unit_name,
)
from unitbox.runtimes import Runtimes
from unitbox.systemd import (
    UNKNOWN_END,
    MainExited,
    NoAnswer,
    Systemd,
    UnitActive,
    UnitEnd,
    UnitEvent,
    UnitInfo,
    UnitManager,
)

UNITS_PREFIX = "unitbox-"  # run units and warm units (profile.UNIT_PREFIX, WARM_PREFIX)

log = logging.getLogger(__name__)

NATIVE_PRIVATE_CGROUPS_SINCE = 257  # ProtectControlGroups=private
# Live run units the broker allows: the daemon keeps max_concurrent executing;
# runs still stopping and a restart's overlap fit in twice that and a margin.
# A daemon taken over cannot start more (it could otherwise start thousands).
LIVE_UNITS_SLACK = 16
SLICE_PROPERTIES: Mapping[str, Any] = {
    "Description": "unitbox runs (created by the daemon: the host has no unitbox.slice)",
    "CPUAccounting": True, "MemoryAccounting": True, "TasksAccounting": True,
}


def systemd_major(version: str) -> int:
    """"252.39-1~deb12u2" → 252 (0 if unreadable)."""
    digits = ""
    for char in version.strip():
        if not char.isdigit():
            break
        digits += char
    return int(digits or 0)


def error_kind(exc: Exception) -> str:
    """How the daemon should read a failure: `refused` and `systemd` mean
    nothing was done; `no_answer` that it may have been; `exists` that the
    unit is there already."""
    if isinstance(exc, Refused):
        return "refused"
    if isinstance(exc, NoAnswer):
        return "no_answer"
    if isinstance(exc, SystemdError):
        return "exists" if "already exists" in exc.message else "systemd"
    return "internal"


def collector_of(config: Config) -> Collector:
    """collect.py, run by the interpreter the broker runs on, with the configured caps (collect.Caps)."""
    files, mib = config.files, 1 << 20
    caps = (files.output_count, files.output_file_mb * mib, files.output_total_mb * mib, files.output_depth,
            files.path_chars, files.output_entries, config.result_kb * 1024)
    return Collector(python=sys.executable, script=collect.__file__, caps=caps)


class BrokerServer:
    def __init__(self, sock: socket.socket, config: Config, systemd: UnitManager,
                 runtimes: Runtimes | None = None, stage_root: Path = Path(STAGE_ROOT)) -> None:
        self._sock = sock
        self._peer = peer_of(sock)  # whose inputs it may copy: the daemon's user's
        self._stage_root = stage_root
        self._input_budget = InputBudget.of(config)
        self._live_cap = 2 * config.max_concurrent + LIVE_UNITS_SLACK
        self._live: set[str] = set()  # our units believed live: seeded from systemd, +start, -end
        self.config = config
        self._systemd = systemd
        self._runtimes = runtimes or Runtimes(config)
        source = config.source
        # A config given with --config outside /etc/unitbox may hold tokens: hide it from runs too.
        self._secret_paths = (str(source),) if source and not source.is_relative_to("/etc/unitbox") else ()
        self._collector = collector_of(config)
        self._linter = find_linter(config)
        self._native_private_cgroups = False
        self._warm = WarmPools(config, systemd, self._runtimes, stage_root=stage_root, build=self._warm_profile,
                                on_exit=self._on_program_exit)
        self._channel: Channel | None = None
        self.done = asyncio.Event()
        self._ops: dict[str, Callable[[Message, list[int]], Any]] = {
            "start": self._start, "stop": self._stop, "kill": self._kill, "list": self._list,
            "probe": self._probe, "forget": self._forget,
            "health": self._health,
        }

    def start(self) -> None:
        self._channel = Channel(self._sock, self._on_message, self._on_closed)
        try:
            # A warm unit's program's end is reported before its unit's (answering fast: warm.py).
            self._systemd.open(self._on_event, self._on_lost, UNITS_PREFIX,
                               exits_of=WARM_PREFIX if self._warm.enabled else "")
            version = self._systemd.version()
            major = systemd_major(version)
            self._native_private_cgroups = major >= NATIVE_PRIVATE_CGROUPS_SINCE
            if self._systemd.ensure_slice(self.config.slice, SLICE_PROPERTIES):
                log.info("created transient %s (install units/unitbox.slice for the shipped caps)",
                         self.config.slice)
            self._warm.start()  # adopts an earlier broker's units that hold a run, before they are listed
            self._live = self._live_runs()
        except SystemdError as exc:
            self._say_down(exc.message)
            return
        self._send({"ev": "ready", "version": version, "pid": os.getpid()})

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._warm.close()
        self._systemd.close()
        self.done.set()

    def _warm_profile(self, slot: str, runtime: Runtime, floor: Limits, section: WarmSection) -> dict[str, Any]:
        return build_warm_profile(slot, floor, ends_root=PurePosixPath(self.config.ends_dir),
                                  lifetime_s=lifetime_s(self.config, section), preload=tuple(section.preload),
                                  max_tasks=self.config.maximum_limits.tasks, **self._profile_common(runtime))

    def _profile_common(self, runtime: Runtime) -> dict[str, Any]:
        return {"state_dir": PurePosixPath(self.config.state_dir), "slice_name": self.config.slice,
                "runtime": runtime, "collector": self._collector,
                "native_private_cgroups": self._native_private_cgroups, "secret_paths": self._secret_paths}

    def _health(self, message: Message, fds: list[int]) -> Message:
        stats = self._warm.stats
        return {"version": self._systemd.version(), "warm": {
            **self._warm.counts(), "hits": stats.hits, "misses": stats.misses, "started": stats.started,
            "failed": stats.failed, "last_warmup_s": round(stats.last_warmup_s, 4)}}

    # -- requests ----------------------------------------------------------------------
    def _on_message(self, message: Message, fds: list[int]) -> None:
        request = message.get("id")
        try:
            op = message.get("op")
            handler = self._ops.get(op) if isinstance(op, str) else None
            if handler is None:
                raise Refused(f"unknown operation {op!r}")
            reply: Message = {"id": request, "ok": handler(message, fds)}
        except Exception as exc:
            kind = error_kind(exc)
            if kind == "internal":
                log.exception("broker: %s failed", message.get("op"))
            elif kind == "refused":
                log.warning("broker: refused %s from pid %d (uid %d): %s", str(message.get("op"))[:40],
                            self._peer.pid, self._peer.uid, exc)
            text = exc.message if isinstance(exc, UnitboxError) else repr(exc)
            reply = {"id": request, "error": text, "kind": kind}
        finally:
            for fd in fds:
                os.close(fd)  # PID 1 has its own copies once the start call returned
        self._send(reply)

    def _start(self, message: Message, fds: list[int]) -> Message | None:
        order = checks.start_order(message, fds, self.config, self._runtimes)
        if order.lint is not LintMode.OFF and self._linter is None:
            raise Refused("lint was asked for, but no linter (ruff) is installed")
        *stdio_fds, inputs_fd = fds
        run = order.run_id
        if len(self._live) >= self._live_cap:
            self._live = self._live_runs()  # the truth, asked only at the cap
            if len(self._live) >= self._live_cap:
                raise Refused(f"{len(self._live)} runs are live: the broker starts at most {self._live_cap} "
                              "(twice max_concurrent, and 16)")
        if (slot := self._warm.take(order.runtime.name, order.limits, order.lint)) is not None:
            try:
                make_ends(self.config.ends_dir, run)
                self._warm.hand_over(slot, run, order.limits, stdio=stdio_fds, inputs_fd=inputs_fd,
                                     owner=self._peer.uid, budget=dataclasses.replace(self._input_budget))
            except Refused:
                raise
            except Exception as exc:  # the unit was stopped: the run starts cold
                log.warning("run %s: the hand-over to %s failed (%s); starting it cold", run, slot.unit,
                            getattr(exc, "message", exc))
            else:
                self._live.add(run)
                asyncio.get_running_loop().call_soon(self._send, {"ev": "active", "run": run, "at": None})
                return {"warm": slot.unit}
        try:
            stage_inputs(self._stage_root, run, inputs_fd, self._peer.uid, dataclasses.replace(self._input_budget))
            ends = make_ends(self.config.ends_dir, run)
            profile = build_profile(run, order.limits, ends_dir=PurePosixPath(ends), lint=order.lint,
                                    linter=self._linter, **self._profile_common(order.runtime))
            self._systemd.start_transient_service(unit_name(run), profile, dict(zip(checks.STDIO, stdio_fds,
                                                                                    strict=True)))
            self._live.add(run)
        except Exception as exc:
            # Only when nothing was done: a unit that exists already, or that PID 1 may still create
            # (no answer in time), runs on the staged inputs; a later start of the same run reuses them.
            if error_kind(exc) in ("refused", "systemd"):
                drop_stage(self._stage_root, run)
            raise
        return None

    def _unit(self, run: str) -> str:
        """The unit a run runs in: its own, or the warm unit it was handed."""
        return self._warm.unit_of(run) or unit_name(run)

    def _stop(self, message: Message, fds: list[int]) -> None:
        self._systemd.stop_unit(self._unit(checks.run_id(message)))

    def _kill(self, message: Message, fds: list[int]) -> None:
        self._systemd.kill_unit(self._unit(checks.run_id(message)), checks.signal_number(message))

    def _forget(self, message: Message, fds: list[int]) -> None:
        """What root wrote for these runs (the daemon cannot remove it: its retention asks here)."""
        for run in checks.run_ids(message):
            forget_ends(self.config.ends_dir, run)

    def _list(self, message: Message, fds: list[int]) -> list[list[Any]]:
        return [info_to_wire(unit) for unit in self._run_units()]

    def _run_units(self) -> list[UnitInfo]:
        """Every run's unit, a warm unit under its run's name (the daemon knows runs, not slots)."""
        units = self._systemd.list_units([f"{UNIT_PREFIX}*.service"])
        warm = {unit: run for run, unit in self._warm.running()}
        if warm:
            units += [dataclasses.replace(info, name=unit_name(warm[info.name]))
                      for info in self._systemd.list_units(list(warm)) if info.name in warm]
        return units

    def _live_runs(self) -> set[str]:
        return {run for unit in self._run_units() if not unit.over and (run := run_id_of(unit.name)) is not None}

    def _probe(self, message: Message, fds: list[int]) -> Message:
        run = checks.run_id(message)
        seen = self._systemd.probe(self._unit(run))
        if isinstance(seen, UnitInfo):
            return {"info": info_to_wire(dataclasses.replace(seen, name=unit_name(run)))}
        return {"end": end_to_wire(seen)}

    # -- events ----------------------------------------------------------------------------
    def _on_event(self, name: str, event: UnitEvent) -> None:
        if isinstance(event, MainExited):  # asked for warm units only
            self._warm.main_exited(name, event)
            return
        if name.startswith(WARM_PREFIX):
            self._on_warm_event(name, event)
            return
        run = run_id_of(name)
        if run is None or not checks.RUN_ID.fullmatch(run):
            return
        if self._warm.unit_of(run) is not None:
            # Its unit is a warm one: a unitbox-run-<id> of this name was only loaded by someone's
            # lookup (`systemctl status`), and unloaded at once; it says nothing of the run.
            return
        if isinstance(event, UnitActive):
            self._send({"ev": "active", "run": run, "at": event.started_at})
        else:
            self._live.discard(run)
            if event == UNKNOWN_END:
                event = self._fallback_end(Path(fallback_result(run))) or event
            self._send({"ev": "end", "run": run, "end": end_to_wire(event)})

    def _on_warm_event(self, name: str, event: UnitActive | UnitEnd) -> None:
        """A warm unit's start is the pool's business; its end, if it had a run, is the run's end."""
        if isinstance(event, UnitActive):
            return
        ended = self._warm.ended(name)
        if ended is None:
            return
        run, stage = ended
        self._live.discard(run)
        if event == UNKNOWN_END:
            event = self._fallback_end(Path(f"{stage}.result")) or event
        self._send({"ev": "end", "run": run, "end": end_to_wire(event)})

    def _on_program_exit(self, run: str, code: int) -> None:
        self._send({"ev": "exited", "run": run, "code": code})

    @staticmethod
    def _fallback_end(path: Path) -> UnitEnd | None:
        """The outcome ExecStopPost left on /run (`path`) because the run's
        directory could not take it (a full state disk): the end's facts, once."""
        try:
            text = path.read_text(errors="replace")
            written = path.stat().st_mtime
            path.unlink()
        except OSError:
            return None
        outcome = parse_result_file(text, written)
        if outcome is None:
            return None
        return UnitEnd(outcome.service_result, outcome.exit_code, outcome.exit_status, outcome.started_at,
                       outcome.exited_at)

    def _on_lost(self, reason: str) -> None:
        self._say_down(f"lost the system bus: {reason}")

    def _say_down(self, reason: str) -> None:
        log.error("broker: %s; exiting (the daemon starts a new broker)", reason)
        self._send({"ev": "down", "reason": reason})
        self.close()

    def _on_closed(self, reason: str) -> None:
        self._warm.close()  # the daemon is gone: no run will come for the idle units
        self._systemd.close()
        self.done.set()

    def _send(self, message: Message) -> None:
        channel = self._channel
        if channel is None or channel.closed:
            return
        with contextlib.suppress(ConnectionResetError):  # the daemon is gone: _on_closed ends the broker
            channel.send(message)


async def run_broker(config: Config, fd: int) -> None:
    """The broker process: serve the daemon on inherited socket `fd` until it hangs up."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # Ctrl-C is for the daemon; it then hangs up
    server = BrokerServer(socket.socket(fileno=fd), config, Systemd())
    server.start()
    await server.done.wait()
