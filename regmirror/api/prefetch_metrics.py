"""The prefetch policies' metrics (``regmirror.mirror.prefetch``), beside the mirror's
(``regmirror.api.metrics``): counters per policy, read at scrape time; a run in progress
is counted as it goes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from regmirror.mirror.prefetch import PolicyRunner, PrefetchService

COUNTERS = {
    "tags_checked": "Tags asked of the cache by prefetch runs (one HEAD upstream per "
    "freshness window)",
    "tags_changed": "Tags whose digest was new to the cache when a prefetch run checked them",
    "manifests_fetched": "Manifests fetched upstream by prefetch runs",
    "blobs_fetched": "Blobs fetched upstream by prefetch runs",
    "bytes_fetched": "Bytes of blobs fetched upstream by prefetch runs",
    "failures": "Tags, blobs and runs of prefetch policies that failed",
}
OUTCOMES = ("ok", "failed", "paused", "error")


class PrefetchCollector(Collector):
    def __init__(self, service: PrefetchService) -> None:
        self._service = service

    def collect(self) -> Iterator[Any]:
        runs = CounterMetricFamily(
            "regmirror_prefetch_runs",
            "Prefetch runs ended, by outcome (failed: some items failed; paused: the "
            "rate-limit reserve was reached; error: the run itself failed)",
            labels=["policy", "outcome"],
        )
        families = {
            key: CounterMetricFamily(f"regmirror_prefetch_{key}", text, labels=["policy"])
            for key, text in COUNTERS.items()
        }
        pauses = CounterMetricFamily(
            "regmirror_prefetch_pauses",
            "Times a prefetch policy paused: its upstream's rate limit at the reserve",
            labels=["policy"],
        )
        paused = GaugeMetricFamily(
            "regmirror_prefetch_paused",
            "1 while a prefetch policy waits for its upstream's rate limit to recover",
            labels=["policy"],
        )
        running = GaugeMetricFamily(
            "regmirror_prefetch_running", "1 while a prefetch run is going on", labels=["policy"]
        )
        last_ok = GaugeMetricFamily(
            "regmirror_prefetch_last_success_timestamp_seconds",
            "When the last prefetch run without failures ended (Unix time)",
            labels=["policy"],
        )
        for runner in self._service.runners:
            name = runner.policy.name
            for outcome in OUTCOMES:
                runs.add_metric([name, outcome], runner.totals[f"runs_{outcome}"])
            for key, family in families.items():
                family.add_metric([name], _count(runner, key))
            pauses.add_metric([name], runner.totals["pauses"])
            paused.add_metric([name], 1.0 if runner.paused else 0.0)
            running.add_metric([name], 1.0 if runner.current is not None else 0.0)
            if runner.last_ok is not None:
                last_ok.add_metric([name], runner.last_ok)
        yield runs
        yield from families.values()
        yield pauses
        yield paused
        yield running
        yield last_ok


def _count(runner: PolicyRunner, key: str) -> int:
    """Ended runs' total and the run in progress (monotonic: it is added once it ends)."""
    current = runner.current
    return runner.totals[key] + (getattr(current, key) if current is not None else 0)
