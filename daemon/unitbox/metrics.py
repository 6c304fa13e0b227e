"""The Prometheus metrics unitbox exports, on prometheus_client. Each Metrics
has its own CollectorRegistry, not the library's global one: several engines
live in one test process, and each serves only its own numbers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics

from unitbox.outcome import RunState

LOOP_LAG_INTERVAL_S = 0.05
# No `*_created` series: one more sample per series that no rule of ours uses
# (the text format as unitbox always served it). A process-wide switch.
disable_created_metrics()  # type: ignore[no-untyped-call]  # the library leaves it unannotated


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_open_fds, …
        # Exposed as unitbox_runs_finished_total (the library adds the suffix).
        self.finished = Counter("unitbox_runs_finished", "Runs that reached a final state, by state.",
                                ["state"], registry=self.registry)
        for state in RunState:
            if state.terminal:  # every state from the start, so a rate() over one is never absent
                self.finished.labels(state=state)
        self.run_duration = Histogram("unitbox_run_duration_seconds", "Wall time of finished runs.",
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
                                      registry=self.registry)
        self.submission_latency = Histogram("unitbox_submission_latency_seconds",
                                            "Time to accept a submission (not waiting for the run).",
                                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
                                            registry=self.registry)
        self.loop_lag = Histogram("unitbox_event_loop_lag_seconds",
                                  f"How late the event loop woke a {LOOP_LAG_INTERVAL_S:g} s sleep (sampled).",
                                  buckets=(0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1),
                                  registry=self.registry)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A gauge read at scrape time. Totals that are gauges (the guard's
        refusals) stay gauges: as counters they would be renamed `…_total`."""
        Gauge(name, help_text, registry=self.registry).set_function(read)


async def watch_loop_lag(histogram: Histogram, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
    """Sleep `interval_s` again and again; how much later than asked the loop
    woke us is how long something held it (20 cheap wake-ups a second).
    Ours, not the library's: prometheus_client knows nothing of asyncio."""
    loop = asyncio.get_running_loop()
    while True:
        began = loop.time()
        await asyncio.sleep(interval_s)
        histogram.observe(max(0.0, loop.time() - began - interval_s))
