"""Reading /metrics the way Prometheus does, with prometheus_client's own
parser: no regex over the text, whose number format is the library's call."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def value(text: str, name: str, **labels: str) -> float:
    """The one sample called `name` with exactly these labels."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no {name}{labels or ''} in /metrics")


def buckets(text: str, histogram: str) -> dict[float, int]:
    """A histogram's cumulative bucket counts by upper bound (+Inf: math.inf)."""
    return {float(sample.labels["le"]): int(sample.value)
            for family in text_string_to_metric_families(text) if family.name == histogram
            for sample in family.samples if sample.name == f"{histogram}_bucket"}
