"""The few Prometheus metrics unitbox exports, rendered in the text format."""

from __future__ import annotations

import asyncio
import bisect
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class Histogram:
    name: str
    help: str
    buckets: Sequence[float]
    counts: list[int] = field(init=False)
    total: float = 0.0
    observations: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.observations += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {cumulative}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.observations}',
                  f"{self.name}_sum {self.total:.6f}", f"{self.name}_count {self.observations}"]
        return lines


class Metrics:
    def __init__(self) -> None:
        self.finished: Counter[str] = Counter()
        self.run_duration = Histogram("unitbox_run_duration_seconds", "Wall time of finished runs.",
                                      (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.submission_latency = Histogram("unitbox_submission_latency_seconds",
                                            "Time to accept a submission (not waiting for the run).",
                                            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
        self.loop_lag = Histogram("unitbox_event_loop_lag_seconds",
                                  f"How late the event loop woke a {LOOP_LAG_INTERVAL_S:g} s sleep (sampled).",
                                  (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1))
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        lines = ["# HELP unitbox_runs_finished_total Runs that reached a final state, by state.",
                 "# TYPE unitbox_runs_finished_total counter"]
        lines += [f'unitbox_runs_finished_total{{state="{state}"}} {count}'
                  for state, count in sorted(self.finished.items())]
        for name, (help_text, read) in sorted(self.gauges.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {read():g}"]
        lines += self.run_duration.render() + self.submission_latency.render() + self.loop_lag.render()
        return "\n".join(lines) + "\n"


LOOP_LAG_INTERVAL_S = 0.05


async def watch_loop_lag(histogram: Histogram, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
    """Sleep `interval_s` again and again; how much later than asked the loop
    woke us is how long something held it (20 cheap wake-ups a second)."""
    loop = asyncio.get_running_loop()
    while True:
        began = loop.time()
        await asyncio.sleep(interval_s)
        histogram.observe(max(0.0, loop.time() - began - interval_s))
