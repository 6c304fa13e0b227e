"""The run engine: the service the HTTP handlers speak to (submit, look up,
wait for, cancel runs; health), and its start and stop.

A run's whole path: `submit` records it and queues it (admission.py); the
runner (runner.py) gives it a slot, starts its unit (launcher.py), follows
the unit's typed events through the lifecycle (lifecycle.py) and makes its
final record. Every call to systemd goes through the broker process
(broker/), so nothing here blocks on PID 1.

Durability: a run is recorded before it is acknowledged; its outcome is
written by the unit's own ExecStopPost; its output pipes are parked in
systemd's fd store. A daemon that restarts finds all three (recovery.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from unitbox import notify
from unitbox.admission import Admission
from unitbox.broker.client import Broker
from unitbox.budget import DiskBudget, submission_bytes
from unitbox.claims import Claimer
from unitbox.cluster import Cluster, Load
from unitbox.config import Config
from unitbox.errors import Busy, InvalidInput, NotFound, Unavailable, UnitboxError
from unitbox.follow import Follower, Followers
from unitbox.launcher import Launcher
from unitbox.leftovers import OutputFiles, RunDetails, load_details, load_files
from unitbox.lifecycle import Phase, RunLife
from unitbox.limits import Limits
from unitbox.lint import find_linter
from unitbox.metrics import Metrics
from unitbox.outcome import RunState
from unitbox.profile import LintMode
from unitbox.recovery import recover
from unitbox.retention import RunFiles, retention_loop
from unitbox.rundir import RunDir, prepare_data_dir
from unitbox.runner import Runner
from unitbox.runtimes import RuntimeInfo, Runtimes
from unitbox.store import RunInputs, RunRecord, RunStore
from unitbox.tokens import EVERYONE, Caller

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Submission:
    code: bytes
    stdin: bytes
    args: list[str]
    limits: Limits
    runtime: str
    owner: str | None = None  # the submitting token's name
    entrypoint: str | None = None
    lint: LintMode = LintMode.OFF
    files: tuple[tuple[str, bytes], ...] = ()  # input files: (checked relative path, content)


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    reason: str = ""
    systemd_version: str = ""


# The warm pools (broker/warm.py), as the broker's last heartbeat told them.
WARM_GAUGES = {
    "ready": "Warm units ready for a run, all pools together.",
    "warming": "Warm units starting (set-up and preloads).",
    "running": "Warm units running a run they were handed.",
    "hits": "Runs handed to a warm unit, since the broker started.",
    "misses": "Runs that found no fitting warm unit and started cold, since the broker started.",
    "started": "Warm units started, since the broker started.",
    "failed": "Warm units that ended before they were ready, since the broker started.",
    "last_warmup_s": "Seconds the last ready warm unit took from its start to ready.",
}


def _warm_count(broker: Broker, key: str) -> float:
    return broker.warm.get(key, 0.0)


def new_run_id() -> str:
    return secrets.token_hex(8)


class Engine:
    def __init__(self, config: Config, broker: Broker, store: RunStore, runtimes: Runtimes, *,
                 metrics: Metrics | None = None, stored_fds: Mapping[str, list[int]] | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self._broker = broker
        self._store = store
        self._runtimes = runtimes
        self.budget = DiskBudget(config.runs_dir, config.retention, ends_dir=config.ends_dir)
        self._followers = Followers()
        self._launcher = Launcher(config, broker, use_fd_store=notify.fd_store_available(), budget=self.budget,
                                  on_output=self._followers.output_kept)
        self._admission = Admission(config.queue_size, config.max_concurrent)
        self._runner = Runner(broker, store, self._launcher, self._admission, metrics=self.metrics,
                              run_dir=self.run_dir, stored_fds=stored_fds, on_advance=self._advanced)
        self._stopped = False
        self._linter = find_linter(config)  # the broker finds the same one
        self.cluster = Cluster(config, store, lambda: Load(self.executing, self.queue_depth))
        self._claims = Claimer(store, free=self._free_for_claims, adopt=self._adopt) \
            if self.cluster.shared else None
        self._adopting: dict[str, asyncio.Event] = {}  # claimed here, being staged: not yet in the runner
        if self.cluster.shared:
            self.metrics.gauge("unitbox_cluster_queue_depth", "Runs queued on any node of the cluster "
                               "(as of this node's last heartbeat).", lambda: self.cluster.queued_everywhere)
        self.metrics.gauge("unitbox_runs_in_flight", "Runs starting or running.", lambda: self.executing)
        self.metrics.gauge("unitbox_queue_depth", "Runs waiting for a free slot.", lambda: self.queue_depth)
        self.metrics.gauge("unitbox_stored_bytes", "Bytes stored for runs, against retention.max_total_mb.",
                           lambda: self.budget.total)
        self.metrics.gauge("unitbox_broker_restarts", "Times the broker (the process that talks to systemd) "
                           "was started again after it died or lost the bus, since start.", lambda: broker.restarts)
        for key, help_text in WARM_GAUGES.items():
            self.metrics.gauge(f"unitbox_warm_{key}", help_text, functools.partial(_warm_count, broker, key))

    # -- start and stop ------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(prepare_data_dir, self.config)
        await self._store.open()
        await self.budget.load()  # before runs are adopted: their captures charge only what comes next
        runner = self._runner
        await self._broker.start(runner.on_broker_down, runner.on_broker_up)  # SystemdError if it cannot
        runner.broker_ok = True
        runner.accepting = True
        await runner.take_over(await recover(self._store, self._broker, self.config))
        runner.spawn(runner.records.retry_unsaved())
        if self.cluster.shared:
            runner.spawn(self.cluster.heartbeat_loop())
        if self._claims is not None:
            runner.spawn(self._claims.listen_loop())
            runner.spawn(self._claims.claim_loop())
        files = RunFiles(self.config.runs_dir, self.config.ends_dir, self._broker.forget)
        runner.spawn(retention_loop(self._store, files, self.config.retention, self.budget,
                                    is_live=runner.runs.__contains__))

    def begin_shutdown(self) -> None:
        """Stop accepting; answer every held `wait` request now (with the run as it is),
        end every followed run's event stream."""
        self._runner.accepting = False
        self._runner.closing.set()
        self._followers.close()

    async def stop(self, grace_s: float = 0.0) -> None:
        """Give running runs `grace_s` to finish, then save what is unsaved and
        let go. Queued runs stay recorded and start at the next start; runs
        still going are systemd units and go on (picked up again then)."""
        if self._stopped:
            return
        self._stopped = True
        self.begin_shutdown()
        await self._runner.shutdown(grace_s)
        await self._broker.close()
        await self._runner.records.save_unsaved()
        await self._store.close()

    @property
    def queue_depth(self) -> int:
        return self._admission.depth

    @property
    def executing(self) -> int:
        return self._admission.executing

    @property
    def runner(self) -> Runner:
        """The lifecycle driver (tests reach in through here)."""
        return self._runner

    # -- the service: what the HTTP handlers may call ------------------------------
    async def submit(self, submission: Submission) -> RunRecord:
        if not self._runner.accepting:
            raise Busy("the server is shutting down", retry_after_s=5)
        self._runtimes.get(submission.runtime)  # unknown → 422 before anything is written
        if submission.lint is not LintMode.OFF and self._linter is None:
            raise InvalidInput("lint is not available on this server: ruff is not installed",
                               details=[{"field": "lint", "message": "no linter"}])
        entry = f"{submission.entrypoint} {self.config.result_kb * 1024}" if submission.entrypoint else None
        if self._claims is not None and self._admission.free_now() == 0:
            return await self._enqueue(submission, entry)  # every slot here is taken: the shared queue
        stored = submission_bytes(submission.code, submission.stdin, submission.args) + \
            sum(len(content) for _, content in submission.files)
        self.budget.check_submission(stored)  # disk budget or free-space floor reached → 503
        self._admission.reserve()  # before the first await: concurrent submissions cannot overshoot
        run_id = new_run_id()
        self.budget.charge(run_id, stored)  # also before the first await, for the same reason
        run_dir = RunDir.of(self.config, run_id)
        record = RunRecord(id=run_id, state=RunState.QUEUED, created_at=time.time(),
                           limits=submission.limits, runtime=submission.runtime, owner=submission.owner,
                           entrypoint=submission.entrypoint, lint=submission.lint.value,
                           input_files=len(submission.files), node=self._store.node)
        try:
            # In a thread: its 6 fsyncs would hold the loop ≈0.7 ms (more on a slow disk); the hop costs ≈0.08.
            await asyncio.to_thread(run_dir.create, submission.code, submission.stdin, submission.args,
                                    files=submission.files, entry=entry)
            record = await self._store.insert(record)
        except BaseException as exc:
            self._admission.unreserve()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(run_dir.remove)
            self.budget.forget([run_id])
            if isinstance(exc, OSError):
                raise Unavailable(f"the run cannot be recorded ({exc.strerror or exc}); nothing was started") from exc
            raise
        run = RunLife(record, run_dir)
        self._runner.runs[run_id] = run
        self._admission.admit(run_id)
        log.debug("run %s queued", run_id, extra={"run_id": run_id, "state": "queued"})
        self._runner.pump()
        return run.live_view()

    async def _enqueue(self, submission: Submission, entry: str | None) -> RunRecord:
        """Into the shared queue, inputs and all, for the first node with a free slot (claims.py)."""
        if self.cluster.queued_everywhere >= self.config.queue_size:
            raise Busy(f"the queue is full ({self.config.queue_size} runs waiting on the nodes); try again later",
                       retry_after_s=5)
        self.cluster.queued_everywhere += 1  # until the next heartbeat counts again
        record = RunRecord(id=new_run_id(), state=RunState.QUEUED, created_at=time.time(),
                           limits=submission.limits, runtime=submission.runtime, owner=submission.owner,
                           entrypoint=submission.entrypoint, lint=submission.lint.value,
                           input_files=len(submission.files))
        inputs = RunInputs(code=submission.code, stdin=submission.stdin, args=list(submission.args), entry=entry,
                           files=tuple(submission.files))
        record = await self._store.enqueue(record, inputs)
        log.debug("run %s queued for any node", record.id, extra={"run_id": record.id, "state": "queued"})
        return record

    async def _adopt(self, record: RunRecord, inputs: RunInputs) -> None:
        """A run this node claimed from the shared queue: staged here, then run as if accepted here."""
        run_dir = RunDir.of(self.config, record.id)
        staged = self._adopting[record.id] = asyncio.Event()  # a cancel meanwhile waits for it (cancel)
        try:
            await self._stage(record, inputs, run_dir)
        finally:
            staged.set()
            del self._adopting[record.id]

    async def _stage(self, record: RunRecord, inputs: RunInputs, run_dir: RunDir) -> None:
        self._admission.reserve_claimed()
        self.budget.charge(record.id, submission_bytes(inputs.code, inputs.stdin, inputs.args)
                           + sum(len(content) for _, content in inputs.files))
        try:
            await asyncio.to_thread(run_dir.create, inputs.code, inputs.stdin, inputs.args, files=inputs.files,
                                    entry=inputs.entry)
        except OSError as exc:
            self._admission.unreserve()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(run_dir.remove)
            self.budget.forget([record.id])
            log.error("run %s: cannot be staged here: %s", record.id, exc, extra={"run_id": record.id})
            await self._runner.records.persist(record.evolve(
                state=RunState.ERROR, finished_at=time.time(),
                error=f"its inputs could not be staged on node {self.cluster.name}: {exc.strerror or exc}"))
            return
        self._runner.runs[record.id] = RunLife(record, run_dir)
        self._admission.admit(record.id)
        self._runner.pump()

    def _free_for_claims(self) -> int:
        """Slots for runs of the shared queue: none while shutting down or without systemd."""
        runner = self._runner
        return self._admission.free_now() if runner.accepting and runner.broker_ok else 0

    async def queued_code(self, record: RunRecord) -> bytes | None:
        """The code of a run waiting in the shared queue (no node has staged it yet)."""
        inputs = await self._store.inputs(record.id) if self.cluster.unclaimed(record) else None
        return inputs.code if inputs is not None else None

    def _advanced(self, run: RunLife) -> None:
        self._followers.advanced(run)
        if run.phase is Phase.DONE and self._claims is not None:
            self._claims.wake()  # a slot is free: the shared queue may have a run for it

    # Every look at a run goes through `get` with the caller (the HTTP side's
    # RunService requires one; EVERYONE is for the daemon's own use): a run
    # the caller may not see is answered exactly like an unknown id.
    async def get(self, run_id: str, caller: Caller = EVERYONE) -> RunRecord:
        run = self._runner.runs.get(run_id)
        if run is not None:
            record: RunRecord | None = run.live_view()
        elif run_id in self._runner.records.unsaved:
            record = self._runner.records.unsaved[run_id]
        else:
            record = await self._store.get(run_id)
        if record is None or not caller.sees(record.owner):
            raise NotFound(f"no run with id {run_id!r}")
        return record

    async def page(self, state: RunState | None, limit: int, before_seq: int | None,
                   caller: Caller = EVERYONE) -> list[RunRecord]:
        """Newest first; runs in flight as they are now, not as last stored.
        Only the caller's own runs (filtered in SQL, so pages stay full)."""
        records = await self._store.page(state, limit, before_seq, owner=caller.only_owner)
        runs, unsaved = self._runner.runs, self._runner.records.unsaved
        return [runs[r.id].live_view() if r.id in runs else unsaved.get(r.id, r) for r in records]

    def run_dir(self, run_id: str) -> RunDir:
        return RunDir.of(self.config, run_id)

    async def details(self, record: RunRecord, *, include_output: bool) -> RunDetails:
        """What one run left (result, diagnostics, files) and, if asked, its output inline: read from its
        directory, in a thread (a result may be a MiB of JSON)."""
        config = self.config
        if not include_output and record.result_bytes is None and record.lint_findings is None \
                and record.output_files is None:
            return RunDetails()
        return await asyncio.to_thread(load_details, self.run_dir(record.id), record,
                                       result_cap=config.result_kb * 1024,
                                       inline_cap=config.inline_output_kb * 1024 if include_output else None)

    async def output_files(self, run_id: str, caller: Caller) -> tuple[RunRecord, OutputFiles]:
        """The files a run left, from its manifest (none while it runs)."""
        record = await self.get(run_id, caller)
        found = await asyncio.to_thread(load_files, self.run_dir(run_id)) if record.output_files is not None else None
        return record, found or OutputFiles()

    async def runtimes(self) -> list[RuntimeInfo]:
        return await self._runtimes.describe()

    async def wait(self, run_id: str, timeout_s: float, caller: Caller = EVERYONE) -> RunRecord:
        """The run once it has finished, or as it is when `timeout_s` runs out
        or the daemon begins to shut down."""
        record = await self.get(run_id, caller)  # another's run: 404 at once, nothing held
        run, closing = self._runner.runs.get(run_id), self._runner.closing
        if run is None and self.cluster.shared:  # queued for any node, or claimed by another
            record = await self.cluster.until(record, lambda r: r.state.terminal or run_id in self._runner.runs,
                                              functools.partial(self.get, run_id, caller), timeout_s, closing)
            run = self._runner.runs.get(run_id)  # claimed here meanwhile: waited for as ours
            if run is None:
                return record
        if run is not None and not closing.is_set():
            waiters = [asyncio.ensure_future(run.done.wait()), asyncio.ensure_future(closing.wait()),
                       asyncio.ensure_future(run.answerable.wait())]  # a warm unit's program has exited
            try:
                await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
        return await self.get(run_id, caller)

    def follow(self, run_id: str, caller: Caller = EVERYONE) -> contextlib.AbstractAsyncContextManager[Follower]:
        """A run's state and output as they change (follow.py); NotFound exactly as `get`."""
        return self._followers.follow(functools.partial(self.get, run_id, caller), self._runner.runs.get,
                                      self.run_dir)

    async def cancel(self, run_id: str, caller: Caller = EVERYONE) -> tuple[RunRecord, bool]:
        """Cancel a run. Returns the run and whether it was still going (202)
        or had already finished (200, unchanged)."""
        record = await self.get(run_id, caller)  # another's run: 404, untouched
        if (staging := self._adopting.get(run_id)) is not None:  # claimed here a moment ago: being staged
            await staging.wait()
            record = await self.get(run_id, caller)
        run = self._runner.runs.get(run_id)
        if run is None and self.cluster.unclaimed(record) and self.cluster.shared:
            cancelled = await self._store.cancel_unclaimed(run_id, time.time())
            if cancelled is not None:
                return cancelled, True
            run = self._runner.runs.get(run_id)  # claimed meanwhile: here, or elsewhere
            if run is None:
                raise Unavailable(f"run {run_id} was taken by a node just now; send the cancel again",
                                  retry_after_s=1)
        if run is None:
            return record, False
        return await self._runner.cancel(run)

    async def home_of(self, run_id: str, caller: Caller = EVERYONE, *,
                      placed_within_s: float = 0.0) -> tuple[str, str] | None:
        """(node, URL) of the node a run is on, when that is another node of
        the cluster (api/relay.py relays there); None: answered here.
        `placed_within_s`: a run no node has taken yet is waited for that long."""
        if not self.cluster.shared or run_id in self._runner.runs:
            return None
        record = await self.get(run_id, caller)
        if placed_within_s and self.cluster.unclaimed(record):
            record = await self.cluster.until(record, lambda r: not self.cluster.unclaimed(r),
                                              functools.partial(self.get, run_id, caller), placed_within_s,
                                              self._runner.closing)
        return await self.cluster.home_of(record)

    async def health(self) -> Health:
        """systemd answering (the broker's heartbeat, cached: no call to PID 1
        here) and the store answering. The watchdog is pinged only while ok."""
        if (problem := self._broker.liveness()) is not None:
            return Health(False, problem)
        try:
            await self._store.ping()
        except UnitboxError as exc:
            return Health(False, f"run store: {exc.message}")
        return Health(True, systemd_version=self._broker.version)
