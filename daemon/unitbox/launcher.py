"""A run's unit, mechanically: its output pipes (the read ends, and a write
end so a stored pipe never hangs up, parked in systemd's fd store), the
captures draining them, the StartTransientUnit call; and, once the unit is
over, the rest of its output and the outcome its ExecStopPost recorded.

`launch` either starts the unit or raises having undone everything it made
(fds closed, fd store entries forgotten, watch removed): whatever fails —
a full disk, EMFILE, the fd store, the broker's checks, systemd — the engine
only has to end the run as `error`. The one exception is a start that went
unanswered (NoAnswer): the unit may exist, so everything is kept for the
runner to look and, if there is no unit, to launch again with the same pipes.

The unit's profile is not built here: the broker builds it (broker/)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
from collections.abc import Callable

from unitbox import notify
from unitbox.broker.client import Broker, Watcher
from unitbox.budget import DiskBudget, RunAccount
from unitbox.capture import StreamCapture, make_pipe, stored_output, truncation_marker
from unitbox.config import Config
from unitbox.leftovers import summarize
from unitbox.lifecycle import STREAMS, RunLife, StoredStreams, with_leftovers
from unitbox.outcome import Outcome
from unitbox.profile import LintMode
from unitbox.store import RunRecord
from unitbox.systemd import NoAnswer

log = logging.getLogger(__name__)


def fd_name(run_id: str, stream: str) -> str:
    return f"{run_id}.{stream}"


class Launcher:
    def __init__(self, config: Config, broker: Broker, *, use_fd_store: bool,
                 budget: DiskBudget | None = None, on_output: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.budget = budget  # captures charge what they keep to it
        self.on_output = on_output  # told a run's id when its captures kept more output
        self.broker = broker
        self.use_fd_store = use_fd_store

    async def launch(self, run: RunLife, watcher: Watcher) -> None:
        """Ask the broker to start the run's unit. Raises NoAnswer (the unit
        may or may not exist: pipes, captures and watch are kept, and a
        repeated launch sends the same pipes) or any other error, having
        undone everything."""
        record = run.record
        run.launches += 1
        try:
            if not run.stdio:
                run.stdio = self._prepare(run)
            self.broker.watch(record.id, watcher)
            warm = await self.broker.start_run(record.id, record.limits, record.runtime, run.dir.inputs, run.stdio,
                                               lint=record.lint)
        except NoAnswer:
            raise
        except BaseException:
            self.discard(run)
            raise
        self.release(run)
        if warm is not None:
            run.record = run.record.evolve(unit=warm)  # stored with its start (runner._running)
            log.debug("run %s handed to %s", record.id, warm, extra={"run_id": record.id, "unit": warm})

    def _prepare(self, run: RunLife) -> list[int]:
        """The unit's stdin, stdout and stderr: the input file, and the write
        ends of two pipes whose read ends the captures drain."""
        record = run.record
        stdio: list[int] = []
        try:
            try:
                stdio.append(os.open(run.dir.stdin, os.O_RDONLY | os.O_CLOEXEC))
            except FileNotFoundError as exc:
                raise OSError(exc.errno, f"the run's input is gone ({exc.filename})") from exc
            for stream in STREAMS:
                read_fd, write_fd = make_pipe()
                stdio.append(write_fd)
                try:
                    capture = StreamCapture(read_fd, run.dir.output(stream), record.limits.output_kb * 1024,
                                            self._allowance(record.id))
                    capture.on_kept = self._output_seen(record.id)
                except BaseException:
                    os.close(read_fd)
                    raise
                run.captures[stream] = capture
                # Both ends into the fd store: a stored pipe never hangs up, so systemd keeps it.
                if self.use_fd_store and not notify.store_fd([read_fd, write_fd], fd_name(record.id, stream)):
                    raise OSError(f"systemd's fd store refused the {stream} pipe")
        except BaseException:
            run.stdio = stdio
            raise
        return stdio

    @staticmethod
    def release(run: RunLife) -> None:
        """systemd has the unit's fds (or never will): close our copies."""
        for fd in run.stdio:
            os.close(fd)
        run.stdio = []
        run.start_unanswered = False

    def discard(self, run: RunLife) -> None:
        """Undo a launch whose unit does not exist: captures, fd store, watch."""
        self.broker.unwatch(run.id)
        for stream, capture in run.captures.items():
            with contextlib.suppress(Exception):
                capture.close()
            if self.use_fd_store:
                notify.forget_fd(fd_name(run.id, stream))
        run.captures.clear()
        self.release(run)

    def adopt(self, run: RunLife, stored: dict[str, list[int]]) -> list[str]:
        """Take back a running run's pipes from the fd store after a restart.
        Returns the streams that had none (no fd store: their output is lost)."""
        cap = run.record.limits.output_kb * 1024
        missing = []
        for stream in STREAMS:
            for fd in stored.pop(fd_name(run.id, stream), []):
                if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY and stream not in run.captures:
                    run.captures[stream] = StreamCapture(fd, run.dir.output(stream), cap, self._allowance(run.id))
                    run.captures[stream].on_kept = self._output_seen(run.id)
                else:
                    os.close(fd)  # our copy of the write end; the store keeps its own
            if stream not in run.captures:
                missing.append(stream)
        return missing

    def _allowance(self, run_id: str) -> RunAccount | None:
        return self.budget.account(run_id) if self.budget is not None else None

    def _output_seen(self, run_id: str) -> Callable[[], None] | None:
        return functools.partial(self.on_output, run_id) if self.on_output is not None else None

    def drain(self, run: RunLife) -> None:
        """The unit is over: every writer is dead, so what is in the pipes is all
        there is. Take it, close, and drop the pipes from the fd store."""
        self.release(run)
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

    async def take_leftovers(self, run: RunLife, record: RunRecord) -> RunRecord:
        """The final `record` with what the run left besides its output
        (leftovers.py), charged to the disk budget. Most runs leave nothing:
        one stat. Until this returns, the run is seen as it was (not ended):
        a poller never sees it final without its result."""
        if record.entrypoint is None and record.lint == LintMode.OFF and not run.dir.manifest.exists():
            return record
        summary = await asyncio.to_thread(summarize, run.dir, entrypoint=record.entrypoint,
                                          linted=record.lint != LintMode.OFF, result_cap=self.config.result_kb * 1024)
        if self.budget is not None:
            self.budget.charge(record.id, summary.stored_bytes)
        return with_leftovers(record, summary)

    @staticmethod
    def mark_lost(run: RunLife, streams: list[str]) -> None:
        """Output of these streams was lost (the daemon restarted without an fd
        store): flag them truncated, the way every reader learns it."""
        for stream in streams:
            with contextlib.suppress(OSError):
                truncation_marker(run.dir.output(stream)).touch(0o600)

