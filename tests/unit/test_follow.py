"""follow.py: a run's feed wakes its followers once per COALESCE_S however
often output comes, at once for a change of phase, and loses no wake-up;
a stream cursor never splits a character and moves by the bytes it sent;
the capture tells of kept bytes once a wakeup, never of dropped ones."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from unitbox.capture import StreamCapture, make_pipe
from unitbox.follow import COALESCE_S, Feed, Followers, StreamCursor, cursors
from unitbox.limits import Limits
from unitbox.outcome import RunState
from unitbox.rundir import RunDir
from unitbox.store import RunRecord


async def test_output_wakes_followers_at_once_then_at_most_once_per_interval() -> None:
    feed = Feed()
    feed.output_kept()
    assert feed.seq == 1  # the first output after a quiet spell: no delay
    began = asyncio.get_running_loop().time()
    woke = asyncio.ensure_future(feed.changed(feed.seq, 5))
    for _ in range(200):
        feed.output_kept()
    assert feed.seq == 1
    assert await woke
    assert feed.seq == 2 and asyncio.get_running_loop().time() - began >= COALESCE_S * 0.9


async def test_a_change_of_phase_wakes_at_once_and_none_is_lost() -> None:
    feed = Feed()
    seen = feed.seq
    feed.wake()  # before the follower waits: it still sees it
    assert await feed.changed(seen, 0.01)
    assert not await feed.changed(feed.seq, 0.01)  # nothing new: a timeout
    waiters = [asyncio.ensure_future(feed.changed(feed.seq, 5)) for _ in range(100)]
    await asyncio.sleep(0)
    feed.wake()
    assert all(await asyncio.gather(*waiters))


def test_a_cursor_holds_back_an_incomplete_character_until_it_is_whole_or_the_end(tmp_path: Path) -> None:
    path = tmp_path / "stdout"
    cursor = StreamCursor("stdout", path)
    assert cursor.read(final=False) is None  # no file yet
    path.write_bytes(b"a\xe2\x82")
    assert (cursor.read(final=False), cursor.offset) == ("a", 1)
    assert cursor.read(final=False) is None
    path.write_bytes(b"a\xe2\x82\xac\xff")  # the character completed, and an invalid byte
    assert (cursor.read(final=False), cursor.offset) == ("€\ufffd", 5)
    path.write_bytes(b"a\xe2\x82\xac\xff\xf0\x9f")
    assert cursor.read(final=False) is None
    assert (cursor.read(final=True), cursor.offset) == ("\ufffd", 7)


async def test_followers_at_the_same_offset_share_one_read_and_encoding(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path, tmp_path)
    run_dir.output("stdout").write_bytes(b"hello ")
    record = RunRecord(id="0123456789abcdef", state=RunState.RUNNING, created_at=0.0, limits=Limits())
    rendered: list[str] = []

    def render(text: str) -> bytes:
        rendered.append(text)
        return text.upper().encode()

    async def lookup() -> RunRecord:
        return record

    followers = Followers()
    async with followers.follow(lookup, lambda _: None, lambda _: run_dir) as first, \
            followers.follow(lookup, lambda _: None, lambda _: run_dir) as second:
        mine, theirs = cursors(run_dir, (0, 0))["stdout"], cursors(run_dir, (0, 0))["stdout"]
        assert first.read(mine, final=False, render=render) == b"HELLO "
        with run_dir.output("stdout").open("ab") as out:
            out.write(b"world")
        assert second.read(theirs, final=False, render=render) == b"HELLO "  # the same chunk, not read again
        assert rendered == ["hello "] and mine.offset == theirs.offset == 6
        assert second.read(theirs, final=False, render=render) == b"WORLD"
        assert first.read(mine, final=True, render=render) == b"WORLD"  # read once the run ended: its own
        assert rendered == ["hello ", "world", "world"]
        assert first.read(mine, final=True, render=render) is None


async def test_the_capture_tells_of_kept_bytes_once_a_wakeup_and_not_of_dropped_ones(tmp_path: Path) -> None:
    told: list[int] = []
    read_fd, write_fd = make_pipe()
    capture = StreamCapture(read_fd, tmp_path / "out", 10)
    capture.on_kept = lambda: told.append(capture.kept)
    try:
        os.write(write_fd, b"x" * 8)
        os.write(write_fd, b"y" * 8)
        for _ in range(50):
            if told:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert told == [10]  # one wakeup kept both writes (up to the cap)
        os.write(write_fd, b"z" * 8)  # beyond the cap: dropped, nobody told
        await asyncio.sleep(0.05)
        assert told == [10] and capture.truncated
    finally:
        capture.close()
        os.close(write_fd)
