"""Output capture: kept bytes go pipe → file by splice(2), never through
Python; the cap and the truncation marker are exact at every boundary; a
chatty writer costs a few wakeups, not one per write."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from unitbox import capture as capture_module
from unitbox.capture import CHUNK, StreamCapture, make_pipe, stored_output, truncation_marker

PIECE = 256 * 1024  # what is written between two drains: below the pipe's size


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = make_pipe()
    yield read_fd, write_fd
    os.close(write_fd)


def feed(capture: StreamCapture, write_fd: int, data: bytes) -> None:
    for start in range(0, len(data), PIECE):
        os.write(write_fd, data[start:start + PIECE])
        capture._read(None)


def not_for(fds: set[int], real: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(fd: int, *args: Any) -> Any:
        assert fd not in fds, f"{real.__name__} on a capture fd: the bytes went through Python"
        return real(fd, *args)
    return guarded


async def test_more_than_a_megabyte_is_kept_exactly_without_a_copy_through_python(
        tmp_path: Path, pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    read_fd, write_fd = pipe
    data = os.urandom(3 * 1024 * 1024 + 12345)
    path = tmp_path / "stdout"
    capture = StreamCapture(read_fd, path, cap=len(data) + 1)
    fds = {capture.fd, capture._out}
    for name in ("read", "readv", "write"):
        monkeypatch.setattr(os, name, not_for(fds, getattr(os, name)))
    feed(capture, write_fd, data)
    capture.finish()
    assert path.read_bytes() == data
    assert stored_output(path) == (len(data), False)


@pytest.mark.parametrize("extra", [-1, 0, 1, CHUNK + 7])
@pytest.mark.parametrize("cap", [1, CHUNK - 1, CHUNK, 3 * CHUNK + 17, 1024 * 1024])
async def test_cap_and_marker_are_exact_at_the_boundary(tmp_path: Path, pipe: tuple[int, int],
                                                        cap: int, extra: int) -> None:
    read_fd, write_fd = pipe
    data = os.urandom(cap + extra)
    path = tmp_path / "stdout"
    capture = StreamCapture(read_fd, path, cap=cap)
    feed(capture, write_fd, data)
    capture.finish()
    assert path.read_bytes() == data[:cap]
    assert capture.kept == min(cap, len(data))
    assert capture.truncated is (extra > 0)
    assert truncation_marker(path).exists() is (extra > 0)


async def test_a_readopted_capture_goes_on_at_the_end_of_the_file(tmp_path: Path, pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    path = tmp_path / "stdout"
    path.write_bytes(b"before the restart\n")
    capture = StreamCapture(read_fd, path, cap=25)
    assert capture.kept == 19
    feed(capture, write_fd, b"and after it\n")
    capture.finish()
    assert path.read_bytes() == b"before the restart\nand af"
    assert truncation_marker(path).exists()


async def test_a_filesystem_without_splice_is_copied_through_python(
        tmp_path: Path, pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_splice(*args: Any, **kwargs: Any) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(os, "splice", no_splice)
    read_fd, write_fd = pipe
    data = os.urandom(300_000)
    path = tmp_path / "stdout"
    capture = StreamCapture(read_fd, path, cap=200_000)
    feed(capture, write_fd, data)
    capture.finish()
    assert path.read_bytes() == data[:200_000] and capture.truncated


async def test_many_small_writes_take_a_few_wakeups(tmp_path: Path, pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    path = tmp_path / "stdout"
    capture = StreamCapture(read_fd, path, cap=1 << 20)
    wakeups = 0
    read = capture._read

    def counted(max_reads: int | None) -> bool:
        nonlocal wakeups
        wakeups += 1
        return read(max_reads)
    capture._read = counted  # type: ignore[method-assign]
    for number in range(200):
        os.write(write_fd, b"line %03d\n" % number)
        await asyncio.sleep(0)  # the loop looks at the pipe between two writes
    await asyncio.sleep(2 * capture_module.PAUSE_S)
    for _ in range(100):  # a loaded machine may take longer; the count of wakeups is what matters
        if capture.kept == 200 * 9:
            break
        await asyncio.sleep(0.05)
    assert capture.kept == 200 * 9  # all of it, without finish()
    assert wakeups < 50  # one a write without the pause
    capture.finish()
    assert path.read_bytes() == b"".join(b"line %03d\n" % n for n in range(200))
