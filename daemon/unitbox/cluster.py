"""Nodes sharing one PostgreSQL store (docs/operations.md "Several nodes").

A run runs on the node that accepted it, or, when that node's slots were
full, on the node that claimed it from the shared queue (claims.py): its
units and files are that node's. Every node answers for every run: status
and listings from the store; output, events, files, code and cancel
relayed to the node the run is on (api/relay.py), at the URL that node
publishes in its heartbeat (here). A waited submission is answered by the
node that accepted it, looking the run up here until it is over.

A node silent for `node_grace_s` is lost: the others put its claimed,
unstarted runs back in the queue and end its other unfinished runs as
`error` ("node lost"); when it comes back its recovery finds them settled,
and stops their units as orphans.

With a store of its own (SQLite) a daemon is the only node: no heartbeat,
no relay."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from unitbox.config import Config
from unitbox.errors import UnitboxError
from unitbox.outcome import RunState
from unitbox.store import NodeInfo, RunRecord, RunStore

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
ALIVE_S = 3 * HEARTBEAT_S  # a node whose last heartbeat is older is shown as not alive
URLS_FOR_S = 5 * HEARTBEAT_S  # the nodes' URLs are read again after this (a node may move)
LOOK_S = 0.2  # how often a run of another node, or one no node has taken yet, is looked up again


@dataclass(frozen=True, slots=True)
class Load:
    running: int
    queued: int


class Cluster:
    def __init__(self, config: Config, store: RunStore, load: Callable[[], Load]) -> None:
        self.config = config
        self.name = store.node or config.node_name
        self.shared = store.node is not None
        self._store = store
        self._load = load
        self._started_at = time.time()
        self._urls: dict[str, str] = {}  # node → URL, as last read from the store
        self._urls_read_at = 0.0  # monotonic
        self.queued_everywhere = 0  # runs queued on any node, as of the last heartbeat
        self._beating_since: float | None = None  # since when this node's heartbeats succeed without a gap

    def me(self) -> NodeInfo:
        load, now = self._load(), time.time()
        return NodeInfo(name=self.name, url=self.config.advertise_url, capacity=self.config.max_concurrent,
                        running=load.running, queued=load.queued, started_at=self._started_at, heartbeat_at=now)

    async def beat(self) -> None:
        """This node's row, the cluster's queue depth, the inputs of finished
        runs dropped; then the runs of nodes silent for `node_grace_s` are
        settled: unstarted ones back to the queue, the others `error`
        (whichever node gets there first: one statement each, a run is
        settled once)."""
        me = self.me()
        await self._store.heartbeat(me)
        self.queued_everywhere = await self._store.queued()
        await self._store.forget_inputs()
        if self._beating_since is None:
            self._beating_since = me.heartbeat_at
        grace = self.config.node_grace_s
        if me.heartbeat_at - self._beating_since < grace:
            # Judge others only after beating for a grace ourselves: after the store was down
            # for everyone, every node first gets the time to beat again.
            return
        for run_id in await self._store.settle_lost(me.heartbeat_at, me.heartbeat_at - grace, grace):
            log.warning("run %s: its node sent no heartbeat for %g s: ended as error", run_id, grace,
                        extra={"run_id": run_id, "state": "error"})

    async def heartbeat_loop(self) -> None:
        """This node's row, every HEARTBEAT_S. A store that does not answer is
        /healthz's to report; the beats resume when it is back."""
        while True:
            try:
                await self.beat()
            except UnitboxError as exc:
                self._beating_since = None
                log.debug("heartbeat: %s", exc.message)
            await asyncio.sleep(HEARTBEAT_S)

    async def nodes(self) -> list[NodeInfo]:
        if not self.shared:
            return [self.me()]
        nodes = await self._store.nodes()
        self._urls, self._urls_read_at = {node.name: node.url for node in nodes}, time.monotonic()
        return nodes

    def elsewhere(self, record: RunRecord) -> bool:
        """`record` is a run of another node."""
        return self.shared and record.node is not None and record.node != self.name

    @staticmethod
    def unclaimed(record: RunRecord) -> bool:
        """In the shared queue: no node has taken it yet."""
        return record.node is None and record.state is RunState.QUEUED

    async def until(self, record: RunRecord, done: Callable[[RunRecord], bool],
                    get: Callable[[], Awaitable[RunRecord]], timeout_s: float, closing: asyncio.Event) -> RunRecord:
        """`record` looked up again (from the store) until `done` says so,
        `timeout_s` runs out or the daemon begins to shut down: a run on
        another node, or one waiting for a node."""
        deadline = time.monotonic() + timeout_s
        while not done(record) and not closing.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(min(LOOK_S, max(0.0, deadline - time.monotonic())))
            record = await get()
        return record

    async def home_of(self, record: RunRecord) -> tuple[str, str] | None:
        """(node, URL) of the node `record` is on, when that is another one."""
        if not self.elsewhere(record) or record.node is None:
            return None
        if record.node not in self._urls or time.monotonic() - self._urls_read_at > URLS_FOR_S:
            await self.nodes()
        url = self._urls.get(record.node)
        return (record.node, url) if url is not None else None
