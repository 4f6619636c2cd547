"""Prometheus metrics, served at ``regmirror.metrics_path`` (default ``/metrics``).

Everything is read at scrape time from counters the mirror keeps anyway (plain integer
increments on the request path), by a custom collector on a private registry: nothing
here costs a request more than an addition.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request

from regmirror.expiry.view import ReaperView
from regmirror.mirror.mirrors import Mirrors


class ClusterState(Protocol):
    """What the metrics read of the cluster's coordinator."""

    @property
    def connected(self) -> bool: ...

    @property
    def outages(self) -> int: ...


class MirrorCollector(Collector):
    def __init__(
        self,
        mirrors: Mirrors,
        reaper: ReaperView | None,
        responses: Counter[int],
        cluster: ClusterState | None = None,
    ) -> None:
        self._mirrors = mirrors
        self._reaper = reaper
        self._responses = responses
        self._cluster = cluster

    def collect(self) -> Iterator[Any]:
        responses = CounterMetricFamily(
            "regmirror_http_responses", "HTTP responses sent, by status code", labels=["code"]
        )
        for code, count in sorted(self._responses.items()):
            responses.add_metric([str(code)], count)
        yield responses

        per_upstream = {
            "blob_hits": ("regmirror_blob_hits", "Blob requests answered from the store"),
            "blob_fetches": ("regmirror_upstream_blob_fetches", "Blob downloads from upstream"),
            "blob_joins": (
                "regmirror_blob_joins",
                "Blob requests that joined a download already in flight",
            ),
            "manifest_hits": (
                "regmirror_manifest_hits",
                "Manifest requests answered from memory or disk without asking upstream",
            ),
            "manifest_fast_hits": (
                "regmirror_manifest_fast_hits",
                "Manifest hits answered by the connection's fast path (part of manifest_hits)",
            ),
            "manifest_fetches": ("regmirror_upstream_manifest_fetches", "Manifest GETs upstream"),
            "tag_checks": ("regmirror_tag_revalidations", "Tag revalidations (HEAD) upstream"),
            "stale": ("regmirror_stale_tags_served", "Tags served stale: upstream unavailable"),
            "referrers_hits": (
                "regmirror_referrers_hits",
                "Referrers lists answered from the cache within their freshness window",
            ),
            "referrers_checks": (
                "regmirror_upstream_referrers_checks",
                "Referrers lists asked of the upstream (its API, else the fallback tag)",
            ),
            "referrers_stale": (
                "regmirror_referrers_stale_served",
                "Referrers lists served stale: upstream unavailable",
            ),
            "blob_bytes_served": (
                "regmirror_blob_bytes_served",
                "Body bytes of blob responses sent to clients, counted as each ends",
            ),
            "blob_bytes_fetched": (
                "regmirror_upstream_blob_bytes",
                "Body bytes of blobs received from upstream, counted as each fetch ends",
            ),
        }
        families = {
            key: CounterMetricFamily(name, text, labels=["upstream"])
            for key, (name, text) in per_upstream.items()
        }
        ratelimit = GaugeMetricFamily(
            "regmirror_upstream_ratelimit_remaining",
            "The upstream's last ratelimit-remaining header (Docker Hub), when it sent one",
            labels=["upstream"],
        )
        limit = GaugeMetricFamily(
            "regmirror_upstream_ratelimit_limit",
            "The upstream's last ratelimit-limit header (Docker Hub), when it sent one",
            labels=["upstream"],
        )
        breaker = GaugeMetricFamily(
            "regmirror_upstream_breaker_open",
            "1 while the upstream's circuit breaker is open",
            labels=["upstream"],
        )
        for cache in self._mirrors.caches:
            name = cache.upstream.name
            for key, family in families.items():
                family.add_metric([name], cache.stats.get(key, 0))
            remaining = cache.upstream.ratelimit_remaining
            if remaining is not None:
                try:
                    ratelimit.add_metric([name], float(remaining.split(";")[0]))
                except ValueError:
                    pass
            limit_seen = cache.upstream.ratelimit_limit
            if limit_seen is not None and limit_seen.split(";")[0].strip().isdigit():
                limit.add_metric([name], float(limit_seen.split(";")[0]))
            breaker.add_metric([name], 1.0 if cache.upstream.breaker_open else 0.0)
        yield from families.values()
        yield ratelimit
        yield limit
        yield breaker

        ns = CounterMetricFamily(
            "regmirror_ns_unmatched",
            "Requests whose ?ns= named no upstream: served by the only upstream, or refused",
            labels=["outcome"],
        )
        for outcome in ("served", "refused"):
            ns.add_metric([outcome], self._mirrors.stats.get(f"ns_{outcome}", 0))
        yield ns

        inflight = self._mirrors.inflight
        failures = CounterMetricFamily(
            "regmirror_fetch_failures",
            "Blob downloads that failed, by reason (digest: wrong bytes, discarded)",
            labels=["reason"],
        )
        for reason, count in sorted(inflight.failures().items()):
            failures.add_metric([reason], count)
        yield failures
        yield GaugeMetricFamily(
            "regmirror_fetches_in_flight", "Blob downloads in flight", value=inflight.count()
        )
        yield GaugeMetricFamily(
            "regmirror_blob_readers", "Clients reading blobs now", value=inflight.readers()
        )

        reaper = self._reaper
        if reaper is not None:
            yield GaugeMetricFamily(
                "regmirror_store_bytes",
                "Bytes of verified content in the store",
                value=reaper.usage,
            )
            yield GaugeMetricFamily(
                "regmirror_store_entries",
                "Blobs and manifests in the store",
                value=reaper.entry_count,
            )
            yield GaugeMetricFamily(
                "regmirror_store_max_bytes", "The quota (0: none)", value=reaper.max_size
            )
            removed = CounterMetricFamily(
                "regmirror_reaper_removed", "Entries removed by the reaper", labels=["why"]
            )
            for why in ("expired", "evicted"):
                removed.add_metric([why], reaper.stats[why])
            yield removed

        cluster = self._cluster
        if cluster is not None:
            yield GaugeMetricFamily(
                "regmirror_cluster_connected",
                "1 while the cluster's Redis is reachable (0: this replica works alone)",
                value=1.0 if cluster.connected else 0.0,
            )
            yield CounterMetricFamily(
                "regmirror_cluster_outages",
                "Times the cluster's Redis became unreachable",
                value=cluster.outages,
            )
            leader = getattr(reaper, "leader", None)
            yield GaugeMetricFamily(
                "regmirror_cluster_reaper_leader",
                "1 while this replica leads the cluster's reaper",
                value=1.0 if leader else 0.0,
            )


class MetricsResource(Resource):
    """``GET /metrics``: the Prometheus text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        body = generate_latest(self._registry)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return body

    render_HEAD = render_GET


def metrics_resource(
    mirrors: Mirrors,
    reaper: ReaperView | None,
    responses: Counter[int],
    collectors: Iterable[Collector] = (),
    cluster: ClusterState | None = None,
) -> MetricsResource:
    """``collectors``: more metrics, beside the mirror's (prefetch policies, ...)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MirrorCollector(mirrors, reaper, responses, cluster))
    for collector in collectors:
        registry.register(collector)
    return MetricsResource(registry)
