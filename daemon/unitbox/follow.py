"""Following a run as it goes (GET /runs/<id>/events): its state changes and
its output as the capture writes it, for any number of followers at little
cost to the daemon.

- No copies: the output is read from the run's output files (capture.py
  splices pipe → file), each follower at its own byte offsets. A read is a
  pread of at most READ_CHUNK bytes of a file just written (in the page
  cache), with the file opened and closed around it: a follower holds no
  descriptor between reads, so followers cost only their connection in the
  fd budget (fdbudget.py).
- No polling: each followed run has one `Feed`. The run's captures tell it
  when they kept bytes (coalesced: at most one wake-up per COALESCE_S, the
  first at once), the runner tells it every change of phase (at once);
  a wake-up resolves one future all its followers await. A run nobody
  follows costs a dict lookup per notification.
- Encoded once: the last chunk of each stream a follower read is kept on
  the Feed as the bytes sent (its `data:`); followers at the same offset —
  all of them, when they keep up — send those bytes instead of reading and
  encoding their own (bench/followers.py, 100 followers: a third of the CPU).
- Offsets: a follower's offset in a stream counts the bytes it has sent.
  A chunk's text never ends in an incomplete UTF-8 character: those bytes
  are left for the next read (until the run has ended: then they become
  U+FFFD, as GET /output decodes them), so the offsets, and so a resumed
  stream, always start on a character boundary of the writer's bytes.

A run's record turns final only once its output is all in the files
(runner._finish drains the captures before it concludes), so a follower
that sees a final state and reads to the end of the files has everything."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from unitbox.lifecycle import STREAMS, Phase, RunLife
from unitbox.rundir import RunDir
from unitbox.store import RunRecord

COALESCE_S = 0.05  # output wake-ups per run at most every 50 ms: a chatty run costs followers 20 reads a second
READ_CHUNK = 1 << 16  # bytes per read: bounds what a follower holds at a time (bytes, text, event)
# (≥ 4, so that a whole read is never just one incomplete character)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes [start, end) of a stream as a follower sent them."""

    start: int
    end: int
    final: bool  # read once the run had ended (an incomplete character at the end of the file became U+FFFD)
    payload: bytes


class Feed:
    """The wake-ups of one followed run, shared by all its followers."""

    def __init__(self) -> None:
        self.seq = 0  # counts wake-ups: a follower that saw `seq` before reading misses none
        self.final: RunRecord | None = None  # the final record, once the run is done
        self.followers = 0
        self.chunks: dict[str, Chunk] = {}  # the last chunk of each stream, for the next follower at its start
        self._loop = asyncio.get_running_loop()
        self._next: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last = -COALESCE_S

    def output_kept(self) -> None:
        """New output: wake the followers now, or once COALESCE_S has passed since the last wake-up."""
        if self._timer is not None:
            return
        delay = self._last + COALESCE_S - self._loop.time()
        if delay <= 0:
            self.wake()
        else:
            self._timer = self._loop.call_later(delay, self.wake)

    def wake(self) -> None:
        self.cancel_timer()
        self._last = self._loop.time()
        self.seq += 1
        if self._next is not None:
            self._next.set_result(None)
            self._next = None

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def changed(self, seen: int, timeout_s: float) -> bool:
        """Wait until a wake-up after `seen`; False if `timeout_s` passed first."""
        if self.seq != seen:
            return True
        if self._next is None:
            self._next = self._loop.create_future()
        done, _ = await asyncio.wait({self._next}, timeout=timeout_s)  # never cancels the shared future
        return bool(done)


class Followers:
    """Every followed run's Feed, by run id; told by the captures and the runner."""

    def __init__(self) -> None:
        self._feeds: dict[str, Feed] = {}
        self.closing = False

    def output_kept(self, run_id: str) -> None:
        if (feed := self._feeds.get(run_id)) is not None:
            feed.output_kept()

    def advanced(self, run: RunLife) -> None:
        if (feed := self._feeds.get(run.id)) is not None:
            if run.phase is Phase.DONE:
                feed.final = run.record
            feed.wake()

    def close(self) -> None:
        """The daemon is stopping: every follower ends its stream now."""
        self.closing = True
        for feed in self._feeds.values():
            feed.wake()

    @contextlib.asynccontextmanager
    async def follow(self, lookup: Callable[[], Awaitable[RunRecord]], live: Callable[[str], RunLife | None],
                     run_dir: Callable[[str], RunDir]) -> AsyncIterator[Follower]:
        """`lookup`: the run as its caller may see it (NotFound before anything else)."""
        record = await lookup()
        feed = self._feeds.get(record.id)
        if feed is None:
            feed = self._feeds[record.id] = Feed()
        feed.followers += 1
        try:
            yield Follower(record, feed, followers=self, lookup=lookup, live=live, run_dir=run_dir(record.id))
        finally:
            feed.followers -= 1
            if not feed.followers:
                feed.cancel_timer()
                del self._feeds[record.id]


class Follower:
    """One follower's view of its run: the record now, and waiting for a change."""

    def __init__(self, record: RunRecord, feed: Feed, *, followers: Followers,
                 lookup: Callable[[], Awaitable[RunRecord]], live: Callable[[str], RunLife | None],
                 run_dir: RunDir) -> None:
        self.id = record.id
        self.dir = run_dir
        self._first: RunRecord | None = record
        self._feed = feed
        self._followers = followers
        self._lookup = lookup
        self._live = live
        self.seen = feed.seq

    @property
    def closing(self) -> bool:
        return self._followers.closing

    async def record(self) -> RunRecord:
        """The run as it is now (as GET /status would answer)."""
        self.seen = self._feed.seq  # what comes after this is waited for by `changed`
        if self._first is not None:  # the one the lookup gave: no second look for the first event
            first, self._first = self._first, None
            return first
        if (run := self._live(self.id)) is not None:
            return run.live_view(early=False)
        if self._feed.final is None:
            record = await self._lookup()  # it ended before it was followed; or is not yet taken over
            if not record.state.terminal:
                return record
            self._feed.final = record  # final records do not change
        return self._feed.final

    def read(self, cursor: StreamCursor, *, final: bool, render: Callable[[str], bytes]) -> bytes | None:
        """The next chunk of the cursor's stream, rendered (or None: nothing
        new); the one another follower rendered, if it starts where this one is."""
        chunk = self._feed.chunks.get(cursor.stream)
        if chunk is None or chunk.start != cursor.offset or chunk.final != final:
            start = cursor.offset
            if (text := cursor.read(final=final)) is None:
                return None
            chunk = self._feed.chunks[cursor.stream] = Chunk(start, cursor.offset, final, render(text))
        cursor.offset = chunk.end
        return chunk.payload

    async def changed(self, timeout_s: float) -> bool:
        """Wait for new output or a change of phase since the last `record()`
        (or for the daemon to stop); False if `timeout_s` passed first."""
        if self.closing:
            return True
        return await self._feed.changed(self.seen, timeout_s)


@dataclass(slots=True)
class StreamCursor:
    """A follower's place in one captured stream: the bytes before `offset` were sent."""

    stream: str
    path: Path
    offset: int = 0

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def read(self, *, final: bool) -> str | None:
        """The text of up to READ_CHUNK bytes after `offset` (moving past them),
        or None if there is nothing new. An incomplete character at the end
        stays for the next read, unless `final` (the run has ended) and the
        file ends there: then it is U+FFFD."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # not launched (yet): no output
            return None
        try:
            data = os.pread(fd, READ_CHUNK, self.offset)
        finally:
            os.close(fd)
        if not data:
            return None
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = decoder.decode(data, final=final and len(data) < READ_CHUNK)
        used = len(data) - len(decoder.getstate()[0])
        if not used:
            return None
        self.offset += used
        return text


def cursors(run_dir: RunDir, offsets: tuple[int, int]) -> dict[str, StreamCursor]:
    return {stream: StreamCursor(stream, run_dir.output(stream), offset)
            for stream, offset in zip(STREAMS, offsets, strict=True)}
