"""The shared queue of nodes on one PostgreSQL store (docs/operations.md
"Several nodes"): a node that accepts a run while all its slots are busy
records it unclaimed, with its inputs, and NOTIFY wakes every node; each
claims queued runs up to its free slots, oldest first (FOR UPDATE SKIP
LOCKED: never one run on two nodes), stages their inputs on its own disk
and runs them as its own. A node with a free slot runs what it accepts at
once, as a single daemon does: the queue costs nothing until it is needed.

A node looks for work when woken (a run queued anywhere, a slot of its own
freed) and every LOOK_S besides, in case a wake-up was missed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from unitbox.errors import UnitboxError
from unitbox.store import RunInputs, RunRecord, RunStore

log = logging.getLogger(__name__)

LOOK_S = 2.0


class Claimer:
    def __init__(self, store: RunStore, *, free: Callable[[], int],
                 adopt: Callable[[RunRecord, RunInputs], Awaitable[None]]) -> None:
        self._store = store
        self._free = free
        self._adopt = adopt
        self._woken = asyncio.Event()

    def wake(self) -> None:
        """A slot of this node was freed (or work is known to be there)."""
        self._woken.set()

    async def listen_loop(self) -> None:
        """The store's wake-ups (NOTIFY) turned into `wake`."""
        while True:
            await self._store.wait_for_work(LOOK_S)
            self._woken.set()

    async def claim_loop(self) -> None:
        while True:
            self._woken.clear()
            try:
                if await self._claim():
                    continue  # there may be more, and room for them
            except Exception:  # a bug must not stop this node from taking work for good
                log.exception("claiming queued runs failed; looking again in %g s", LOOK_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), LOOK_S)

    async def _claim(self) -> bool:
        """Claims and adopts what fits; True if that filled every free slot."""
        free = self._free()
        if free <= 0:
            return False
        try:
            claimed = await self._store.claim(free)
        except UnitboxError as exc:  # the store is down: /healthz says so; look again later
            log.debug("claiming queued runs: %s", exc.message)
            return False
        for record, inputs in claimed:
            waited_ms = (time.time() - record.created_at) * 1000
            log.info("run %s claimed from the shared queue, %.1f ms after it was queued", record.id, waited_ms,
                     extra={"run_id": record.id})
            await self._adopt(record, inputs)
        return bool(claimed) and len(claimed) == free
