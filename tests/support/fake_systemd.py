"""A fake of the systemd adapter for the API tier: no D-Bus, no sandbox. It
plays a unit's life (active → output → ExecStopPost's result file →
inactive) so the HTTP layer can be tested fast. Everything SANDBOX.md
promises is tested against the real systemd in tests/integration/."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unitbox.systemd import UnitInfo, UnitSnapshot, Watcher


class FakeSystemd:
    def __init__(self, *, auto_finish: bool = True, stdout: bytes = b"fake output\n", exit_status: int = 0) -> None:
        self.auto_finish = auto_finish
        self.stdout = stdout
        self.exit_status = exit_status
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.properties: dict[str, Mapping[str, Any]] = {}
        self.reachable = True
        self._watchers: dict[str, Watcher] = {}
        self._pending: dict[str, tuple[Path, dict[str, int]]] = {}

    def open(self) -> None:
        pass

    def close(self) -> None:
        for _, fds in self._pending.values():
            for fd in fds.values():
                os.close(fd)
        self._pending.clear()

    def watch(self, name: str, watcher: Watcher) -> None:
        self._watchers[name] = watcher

    def unwatch(self, name: str) -> None:
        self._watchers.pop(name, None)

    def start_transient_service(self, name: str, properties: Mapping[str, Any],
                                stdio: Mapping[str, int] | None = None) -> None:
        self.started.append(name)
        self.properties[name] = properties
        run_dir = Path(properties["ExecStopPost"][-1])
        fds = {stream: os.dup(fd) for stream, fd in (stdio or {}).items()}  # the caller closes its own
        self._pending[name] = (run_dir, fds)
        if self.auto_finish:
            asyncio.get_running_loop().call_soon(self.finish, name)

    def finish(self, name: str, result: str = "success", exit_code: str = "exited",
               exit_status: str | None = None) -> None:
        run_dir, fds = self._pending.pop(name)
        snapshot = UnitSnapshot()
        self._emit(name, snapshot, "active")
        os.write(fds["output"], self.stdout)
        for fd in fds.values():
            os.close(fd)
        status = exit_status if exit_status is not None else str(self.exit_status)
        if result == "success" and status != "0":
            result = "exit-code"
        (run_dir / "result").write_text(
            f"service_result={result}\nexit_code={exit_code}\nexit_status={status}\n"
            "cpu_ns=1000000\nmemory_peak=4096\noom_kill=0\nend=1\n")
        self._emit(name, snapshot, "inactive")

    def _emit(self, name: str, snapshot: UnitSnapshot, state: str) -> None:
        snapshot.active_state = state
        if state != "inactive":
            snapshot.started = True
        watcher = self._watchers.get(name)
        if watcher is not None:
            watcher(snapshot)

    def stop_unit(self, name: str) -> None:
        self.stopped.append(name)
        if name in self._pending:
            self.finish(name, result="signal", exit_code="killed", exit_status="TERM")

    def list_units(self, patterns: list[str]) -> list[UnitInfo]:
        return [UnitInfo(name, "active", "running") for name in self._pending]

    def ensure_slice(self, name: str, properties: Mapping[str, Any]) -> bool:
        return False

    def version(self) -> str:
        if not self.reachable:
            from unitbox.errors import SystemdError
            raise SystemdError("systemd does not answer: fake outage")
        return "252-fake"
