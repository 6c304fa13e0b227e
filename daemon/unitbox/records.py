"""Recording runs' state changes in the store. A final state the store cannot
take now (a full disk, a broken database) is kept in memory — the engine
serves it from here before asking the store — and written again every
PERSIST_RETRY_S, and once more at shutdown."""

from __future__ import annotations

import asyncio
import logging

from unitbox.errors import UnitboxError
from unitbox.store import RunRecord, RunStore

log = logging.getLogger(__name__)

PERSIST_RETRY_S = 2.0


class Records:
    def __init__(self, store: RunStore) -> None:
        self._store = store
        self.unsaved: dict[str, RunRecord] = {}  # final, but the store could not take it yet

    async def persist(self, record: RunRecord) -> None:
        try:
            await self._store.update(record)
        except Exception as exc:
            message = exc.message if isinstance(exc, UnitboxError) else repr(exc)
            log.error("run %s: cannot record state %s: %s", record.id, record.state, message)
            if record.state.terminal:
                self.unsaved[record.id] = record
        else:
            self.unsaved.pop(record.id, None)

    async def save_unsaved(self) -> None:
        for record in list(self.unsaved.values()):
            await self.persist(record)

    async def retry_unsaved(self) -> None:
        while True:
            await asyncio.sleep(PERSIST_RETRY_S)
            await self.save_unsaved()
