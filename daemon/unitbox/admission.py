"""Admission: a bounded FIFO of accepted runs in front of a cap on runs
executing at once. Synchronous on purpose: a submission reserves its place
before its first await, so concurrent submissions can never overshoot
`queue_size` (they used to be counted only once recorded)."""

from __future__ import annotations

from collections import deque

from unitbox.errors import Busy


class Admission:
    def __init__(self, queue_size: int, max_concurrent: int) -> None:
        self.queue_size = queue_size
        self.max_concurrent = max_concurrent
        self._queue: deque[str] = deque()
        self._reserved = 0  # submissions being recorded, not yet queued
        self.executing = 0  # slots in use

    @property
    def depth(self) -> int:
        return len(self._queue)

    def free_now(self) -> int:
        """Slots no run holds or waits for: runs taken now would start at once."""
        return max(0, self.max_concurrent - self.executing - self._reserved - len(self._queue))

    def reserve(self) -> None:
        """Take a place for a new submission or raise Busy (503). A place is
        a free slot or room in the queue; undo with `unreserve` or `admit`."""
        waiting = self._reserved + len(self._queue)
        free_slots = max(0, self.max_concurrent - self.executing)
        if waiting >= self.queue_size + free_slots:
            raise Busy(f"the queue is full ({self.queue_size} runs waiting); try again later",
                       retry_after_s=max(1, waiting // max(1, self.max_concurrent)))
        self._reserved += 1

    def reserve_claimed(self) -> None:
        """A place for a run claimed from the shared queue: claimed for a free slot, so never refused."""
        self._reserved += 1

    def unreserve(self) -> None:
        self._reserved -= 1

    def admit(self, run_id: str) -> None:
        self._reserved -= 1
        self._queue.append(run_id)

    def requeue(self, run_id: str) -> None:
        """A run recovered at start that had never been started."""
        self._queue.append(run_id)

    def withdraw(self, run_id: str) -> bool:
        try:
            self._queue.remove(run_id)
        except ValueError:
            return False
        return True

    def next_to_launch(self) -> str | None:
        """The oldest queued run, with a slot taken for it; None if no slot or no run."""
        if not self._queue or self.executing >= self.max_concurrent:
            return None
        self.executing += 1
        return self._queue.popleft()

    def take_slot(self) -> None:
        """A slot for a run that is already going (re-attached at start)."""
        self.executing += 1

    def release_slot(self) -> None:
        if self.executing <= 0:
            raise RuntimeError("a slot was released twice")
        self.executing -= 1
