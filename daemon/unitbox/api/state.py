"""Typed application state (aiohttp AppKeys), and the narrow service the HTTP
handlers speak to: runs in, runs out. They never reach the store or systemd."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from aiohttp import ClientSession, web

from unitbox.cluster import Cluster
from unitbox.config import Config
from unitbox.engine import Health, Submission
from unitbox.follow import Follower
from unitbox.leftovers import OutputFiles, RunDetails
from unitbox.metrics import Metrics
from unitbox.outcome import RunState
from unitbox.rundir import RunDir
from unitbox.runtimes import RuntimeInfo
from unitbox.store import RunRecord
from unitbox.tokens import Caller


class RunService(Protocol):
    """Every call about existing runs takes the caller (api/auth.py): it sees
    only what that caller may, so no endpoint can forget the ownership check."""

    config: Config
    metrics: Metrics
    cluster: Cluster

    @property
    def executing(self) -> int: ...
    @property
    def queue_depth(self) -> int: ...
    async def submit(self, submission: Submission) -> RunRecord: ...
    async def get(self, run_id: str, caller: Caller) -> RunRecord: ...
    async def wait(self, run_id: str, timeout_s: float, caller: Caller) -> RunRecord: ...
    async def cancel(self, run_id: str, caller: Caller) -> tuple[RunRecord, bool]: ...
    def follow(self, run_id: str, caller: Caller) -> AbstractAsyncContextManager[Follower]: ...
    async def page(self, state: RunState | None, limit: int, before_seq: int | None,
                   caller: Caller) -> list[RunRecord]: ...
    def run_dir(self, run_id: str) -> RunDir: ...
    async def details(self, record: RunRecord, *, include_output: bool) -> RunDetails: ...
    async def output_files(self, run_id: str, caller: Caller) -> tuple[RunRecord, OutputFiles]: ...
    async def runtimes(self) -> list[RuntimeInfo]: ...
    async def health(self) -> Health: ...
    async def queued_code(self, record: RunRecord) -> bytes | None: ...
    async def home_of(self, run_id: str, caller: Caller, *,
                      placed_within_s: float = 0.0) -> tuple[str, str] | None: ...


ENGINE = web.AppKey("engine", RunService)
OPENAPI = web.AppKey("openapi", dict[str, Any])
RELAY_SESSION = web.AppKey("relay_session", ClientSession)
