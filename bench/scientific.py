"""A numpy + pandas program cold against a pool of warm units that imported
numpy and pandas while they waited (docs/operations.md "Warm units").

Boots the project's systemd test host and starts one daemon in it with two
configured runtimes on the same interpreter (the host's /usr/bin/python3,
with Debian's python3-numpy and python3-pandas): `sci-cold`, which has no
pool, and `sci`, with `[warm.sci] preload = ["numpy", "pandas"]`. The same
program is then run through HTTP wait=true, one at a time, alternating:
cold with runtime `sci-cold`, warm with runtime `sci` (after waiting for a ready unit, as a
person pressing "Run" now and then would find one). Prints and writes the
client-side latency (p50, p90, max) of each, their ratio, and the share of
`sci` runs that really were warm (their `unit` is a unitbox-warm-* unit).

    sudo .venv/bin/python bench/scientific.py [--runs 40] [--out bench/results/scientific]

`make bench-scientific` installs the two Debian packages and runs it. Not
part of `make test` or `make bench`; run it on a quiet machine."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.daemon import Client, serving, warm_ready  # noqa: E402
from tests.support.testhost import booted  # noqa: E402

PROGRAM = """\
import numpy as np
import pandas as pd

frame = pd.DataFrame(np.random.default_rng(1).normal(size=(1000, 4)), columns=list("abcd"))
print(frame.describe().loc["mean"].round(3).to_dict())
"""
POOL = 4
CONFIG = f"""\
[runtimes.sci]
python = "/usr/bin/python3"

[runtimes.sci-cold]
python = "/usr/bin/python3"

[warm.sci]
size = {POOL}
preload = ["numpy", "pandas"]
"""
LIMITS = {"memory_mb": 1024, "timeout_s": 30}  # memory well above what a unit uses importing pandas


def run_once(client: Client, runtime: str) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    reply = client.post_json("/run-json?wait=true", {"code": PROGRAM, "runtime": runtime, "limits": LIMITS}, timeout=60)
    elapsed = (time.perf_counter() - start) * 1000
    if reply.status != 200:
        raise RuntimeError(f"{runtime}: HTTP {reply.status}: {reply.body[:300]!r}")
    run: dict[str, Any] = reply.json()
    if run["state"] != "succeeded":
        output = client.get(f"/output/{run['id']}").json()
        raise RuntimeError(f"{runtime}: the program ended {run['state']}: {output['stderr'][-600:]}")
    return elapsed, run


def wait_for_ready(client: Client, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while warm_ready(client) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError("no warm unit got ready: see journalctl -u 'unitbox-warm-*' in the test host")
        time.sleep(0.05)


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p90": ordered[len(ordered) * 9 // 10], "max": ordered[-1],
            "n": len(ordered)}


def metric(client: Client, name: str) -> float:
    for line in client.get("/metrics").body.decode().splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40, help="runs of each kind, after 3 of each to warm caches")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/scientific")
    args = parser.parse_args()
    check = subprocess.run(["/usr/bin/python3", "-c", "import numpy, pandas"], capture_output=True, check=False)
    if check.returncode != 0:
        sys.exit("bench/scientific.py needs numpy and pandas in /usr/bin/python3: "
                 "apt-get install python3-numpy python3-pandas (make bench-scientific does)")
    load = os.getloadavg()
    times: dict[str, list[float]] = {"cold": [], "warm": []}
    warm_hits = 0
    with tempfile.TemporaryDirectory(prefix="unitbox-bench-sci-") as tmp, booted("bench-sci") as host:
        for daemon in serving(host, Path(tmp), CONFIG, "bench-sci"):
            client = daemon.client
            wait_for_ready(client)
            for index in range(3 + args.runs):
                cold, _ = run_once(client, "sci-cold")
                wait_for_ready(client)
                warm, run = run_once(client, "sci")
                if index >= 3:
                    times["cold"].append(cold)
                    times["warm"].append(warm)
                    warm_hits += run["unit"].startswith("unitbox-warm-")
                print(f"\r{index + 1}/{3 + args.runs}: cold {cold:7.1f} ms   warm {warm:7.1f} ms", end="", flush=True)
            print()
            warm_up_s = metric(client, "unitbox_warm_last_warmup_s")
    result = {"program": PROGRAM, "limits": LIMITS, "pool": POOL, "load_at_start": load,
              "cold_ms": summary(times["cold"]), "warm_ms": summary(times["warm"]),
              "warm_share": warm_hits / args.runs, "last_warmup_s": warm_up_s,
              "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    cold_ms, warm_ms = result["cold_ms"], result["warm_ms"]
    ratio = cold_ms["p50"] / warm_ms["p50"]
    lines = [
        "# numpy + pandas: cold against a preloaded warm pool (bench/scientific.py)",
        "",
        f"{result['at']}, load average at the start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"{args.runs} runs of each, one at a time, alternating; HTTP wait=true, client-side.",
        "",
        "| | p50 | p90 | max |",
        "|---|---:|---:|---:|",
        *(f"| {kind} | {s['p50']:.0f} ms | {s['p90']:.0f} ms | {s['max']:.0f} ms |"
          for kind, s in (("cold (runtime sci-cold)", cold_ms),
                          ("warm (runtime sci, numpy+pandas preloaded)", warm_ms))),
        "",
        f"p50 ratio cold / warm: **{ratio:.1f}×** (target ≥ 10×); {warm_hits} of {args.runs} sci runs were warm; "
        f"a unit's warm-up (start to ready, pandas imported) took {warm_up_s:.2f} s.",
    ]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({**result, "ratio_p50": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
