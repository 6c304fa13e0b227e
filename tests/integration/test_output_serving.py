"""/output on the real daemon: many readers of 64 MiB outputs leave its memory
flat, and a live run shows its output so far and its truncation as soon as
it passes its cap, before it ends."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.support.daemon import Client, Daemon
from tests.support.testhost import wait_until

MIB = 1 << 20
LINE = '0123456789 "quoted" \\ back\ttab é € 😀 '.encode()
LINE += b"x" * (63 - len(LINE)) + b"\n"  # 64 bytes: 1 MiB is 16384 whole lines
BIG_MIB = 64
READERS = 10  # of each form
MAX_GROWTH_KIB = 40 * 1024


def big_program() -> str:
    return (f"import sys\nmib = {LINE!r} * {MIB // len(LINE)}\n"
            f"for _ in range({BIG_MIB}):\n    sys.stdout.buffer.write(mib)\n")


def digest_of(*parts: bytes | tuple[bytes, int]) -> str:
    """sha256 of the parts, a (piece, n) part being the piece n times over."""
    digest = hashlib.sha256()
    for part in parts:
        piece, times = part if isinstance(part, tuple) else (part, 1)
        for _ in range(times):
            digest.update(piece)
    return digest.hexdigest()


def expected_json_digest(run_id: str) -> str:
    """The JSON form's bytes (compact, UTF-8 unescaped, as the model serialises), hashed piecewise."""
    escaped = json.dumps(LINE.decode(), ensure_ascii=False)[1:-1].encode() * (MIB // len(LINE))
    return digest_of(f'{{"id":"{run_id}","state":"succeeded","stdout":"'.encode(), (escaped, BIG_MIB),
                     b'","stderr":"","stdout_truncated":false,"stderr_truncated":false,"encoding":"utf-8"}')


def read_hashed(port: int, path: str, start: threading.Barrier) -> tuple[int, str]:
    """GET path, body read in pieces and hashed, never held whole: (status, sha256)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        start.wait(30)
        connection.request("GET", path)
        reply = connection.getresponse()
        digest = hashlib.sha256()
        while piece := reply.read(MIB):
            digest.update(piece)
        return reply.status, digest.hexdigest()
    finally:
        connection.close()


def sample_peak(sample: Callable[[], int], until: threading.Event) -> list[int]:
    peak = [sample()]
    def loop() -> None:
        while not until.wait(0.02):
            peak[0] = max(peak[0], sample())
    threading.Thread(target=loop, daemon=True).start()
    return peak


def test_many_readers_of_big_outputs_leave_the_daemon_memory_flat(daemon: Daemon, client: Client) -> None:
    limits = {"output_kb": BIG_MIB * 1024, "timeout_s": 60}
    run_ids = [client.submit(big_program(), limits=limits) for _ in range(2)]
    for run_id in run_ids:
        run = client.wait(run_id, timeout=60)
        assert (run["state"], run["stdout_bytes"], run["stdout_truncated"]) == ("succeeded", BIG_MIB * MIB, False)
    raw_digest = digest_of((LINE * (MIB // len(LINE)), BIG_MIB))
    reads = [(f"/output/{run_ids[i % 2]}", expected_json_digest(run_ids[i % 2])) for i in range(READERS)]
    reads += [(f"/output/{run_ids[i % 2]}?stream=stdout", raw_digest) for i in range(READERS)]

    before = daemon.rss_kib()
    done = threading.Event()
    peak = sample_peak(daemon.rss_kib, done)
    start = threading.Barrier(len(reads))
    began = time.monotonic()
    with ThreadPoolExecutor(len(reads)) as pool:
        results = list(pool.map(lambda read: read_hashed(daemon.port, read[0], start), reads))
    done.set()
    took = time.monotonic() - began

    assert results == [(200, digest) for _, digest in reads]
    growth = peak[0] - before
    print(f"RSS {before} KiB before, {peak[0]} KiB at peak (+{growth} KiB); "
          f"{len(reads)} reads of {BIG_MIB} MiB in {took:.1f} s")
    assert growth < MAX_GROWTH_KIB, f"RSS grew {growth // 1024} MiB: {before} → {peak[0]} KiB"


def output_of(client: Client, run_id: str) -> dict[str, Any]:
    reply = client.get(f"/output/{run_id}")
    assert reply.status == 200, reply.body
    body: dict[str, Any] = reply.json()
    return body


def test_a_live_run_shows_its_output_and_its_truncation_before_it_ends(client: Client) -> None:
    lines = [f"{i:03d} {'x' * 95}\n" for i in range(100)]  # 100 bytes each; the cap is 4096
    code = ("import sys, time\n"
            f"lines = {lines!r}\n"
            "sys.stdout.write(''.join(lines[:20])); sys.stdout.flush()\n"
            "time.sleep(3)\n"
            "for line in lines[20:]:\n    sys.stdout.write(line); sys.stdout.flush(); time.sleep(0.005)\n"
            "time.sleep(60)\n")
    run_id = client.submit(code, limits={"output_kb": 4, "timeout_s": 90})
    written = "".join(lines)

    assert wait_until(lambda: output_of(client, run_id)["stdout"] == written[:2000], 20), output_of(client, run_id)
    so_far = output_of(client, run_id)
    assert (so_far["state"], so_far["stdout_truncated"]) == ("running", False)

    assert wait_until(lambda: output_of(client, run_id)["stdout_truncated"], 15), output_of(client, run_id)
    capped = output_of(client, run_id)
    assert (capped["state"], capped["stdout"]) == ("running", written[:4096])
    raw = client.get(f"/output/{run_id}?stream=stdout")
    assert raw.body == written[:4096].encode()
    assert (raw.headers["X-Unitbox-Truncated"], raw.headers["X-Unitbox-State"]) == ("true", "running")

    assert client.request("POST", f"/runs/{run_id}/cancel").status == 202
    assert client.wait(run_id)["state"] == "cancelled"
    assert output_of(client, run_id)["stdout_truncated"] is True
