"""A run's unit, mechanically: its output pipes (the read ends, and a write
end so a stored pipe never hangs up, parked in systemd's fd store), the
captures draining them, the StartTransientUnit call; and, once the unit is
over, the rest of its output and the outcome its ExecStopPost recorded.

`launch` either starts the unit or raises having undone everything it made
(fds closed, fd store entries forgotten, watch removed): whatever fails —
a full disk, EMFILE, the fd store, systemd — the engine only has to end the
run as `error`."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
from collections.abc import Callable
from pathlib import PurePosixPath

from unitbox import notify
from unitbox.budget import DiskBudget, RunAccount
from unitbox.capture import StreamCapture, make_pipe, stored_output, truncation_marker
from unitbox.config import Config
from unitbox.lifecycle import STREAMS, RunLife, StoredStreams
from unitbox.outcome import Outcome
from unitbox.profile import build_profile, unit_name
from unitbox.runtimes import Runtimes
from unitbox.systemd import UnitManager, Watcher

log = logging.getLogger(__name__)


def fd_name(run_id: str, stream: str) -> str:
    return f"{run_id}.{stream}"


class Launcher:
    def __init__(self, config: Config, systemd: UnitManager, runtimes: Runtimes, *, use_fd_store: bool,
                 secret_paths: tuple[str, ...] = (), budget: DiskBudget | None = None) -> None:
        self.config = config
        self.budget = budget  # captures charge what they keep to it
        self.systemd = systemd
        self.runtimes = runtimes
        self.use_fd_store = use_fd_store
        self.native_private_tmpfs = False  # these two are set once systemd's version is known
        self.native_private_cgroups = False
        self.secret_paths = secret_paths

    def launch(self, run: RunLife, watcher: Watcher) -> None:
        record = run.record
        name = unit_name(record.id)
        runtime = self.runtimes.get(record.runtime)  # it may have been removed while the run was queued
        profile = build_profile(record.id, record.limits, run_dir=PurePosixPath(run.dir.path),
                                state_dir=PurePosixPath(self.config.state_dir), slice_name=self.config.slice,
                                runtime=runtime, native_private_tmpfs=self.native_private_tmpfs,
                                native_private_cgroups=self.native_private_cgroups,
                                secret_paths=self.secret_paths)
        ours: list[int] = []  # our copies, closed whatever happens: the unit has its own
        undo: list[Callable[[], object]] = []  # run in reverse if the launch fails
        try:
            try:
                stdin_fd = os.open(run.dir.stdin, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError as exc:
                raise OSError(exc.errno, f"the run's input is gone ({exc.filename})") from exc
            ours.append(stdin_fd)
            stdio = {"input": stdin_fd}
            for stream, unit_side in (("stdout", "output"), ("stderr", "error")):
                read_fd, write_fd = make_pipe()
                ours.append(write_fd)
                try:
                    capture = StreamCapture(read_fd, run.dir.output(stream), record.limits.output_kb * 1024,
                                            self._allowance(record.id))
                except BaseException:
                    os.close(read_fd)
                    raise
                run.captures[stream] = capture
                undo.append(capture.close)
                stdio[unit_side] = write_fd
                if self.use_fd_store:  # both ends: a stored pipe never hangs up, so systemd keeps it
                    undo.append(functools.partial(notify.forget_fd, fd_name(record.id, stream)))
                    if not notify.store_fd([read_fd, write_fd], fd_name(record.id, stream)):
                        raise OSError(f"systemd's fd store refused the {stream} pipe")
            self.systemd.watch(name, watcher)
            undo.append(lambda: self.systemd.unwatch(name))
            self.systemd.start_transient_service(name, profile, stdio)
        except BaseException:
            for step in reversed(undo):
                with contextlib.suppress(Exception):
                    step()
            run.captures.clear()
            raise
        finally:
            for fd in ours:
                os.close(fd)

    def adopt(self, run: RunLife, stored: dict[str, list[int]]) -> list[str]:
        """Take back a running run's pipes from the fd store after a restart.
        Returns the streams that had none (no fd store: their output is lost)."""
        cap = run.record.limits.output_kb * 1024
        missing = []
        for stream in STREAMS:
            for fd in stored.pop(fd_name(run.id, stream), []):
                if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY and stream not in run.captures:
                    run.captures[stream] = StreamCapture(fd, run.dir.output(stream), cap, self._allowance(run.id))
                else:
                    os.close(fd)  # our copy of the write end; the store keeps its own
            if stream not in run.captures:
                missing.append(stream)
        return missing

    def _allowance(self, run_id: str) -> RunAccount | None:
        return self.budget.account(run_id) if self.budget is not None else None

    def drain(self, run: RunLife) -> None:
        """The unit is over: every writer is dead, so what is in the pipes is all
        there is. Take it, close, and drop the pipes from the fd store."""
        for stream, capture in run.captures.items():
            try:
                capture.finish()
            except Exception:
                log.exception("run %s: collecting its %s failed", run.id, stream)
                capture.close()
            if self.use_fd_store:
                notify.forget_fd(fd_name(run.id, stream))

    @staticmethod
    def collect(run: RunLife) -> tuple[tuple[Outcome, float] | None, StoredStreams]:
        """The recorded outcome and the output as stored (a few stats and one small read)."""
        out, err = (stored_output(run.dir.output(stream)) for stream in STREAMS)
        return run.dir.read_outcome(), StoredStreams(out[0], err[0], out[1], err[1])

    @staticmethod
    def mark_lost(run: RunLife, streams: list[str]) -> None:
        """Output of these streams was lost (the daemon restarted without an fd
        store): flag them truncated, the way every reader learns it."""
        for stream in streams:
            with contextlib.suppress(OSError):
                truncation_marker(run.dir.output(stream)).touch(0o600)

