"""The status page: ``GET /`` (one self-contained HTML page, ``status.html`` beside
this module) and ``GET /status.json`` (what it polls; docs/status.md documents every
field), with the probes of ``regmirror.api.health`` mounted beside them.

``regmirror.status_page`` says who sees the page: ``auth`` (the default) puts it behind
the client authentication of ``/v2/`` when ``auth`` is configured; ``open`` never asks;
``off`` does not serve it (``/`` answers the JSON 404 as any unknown path). The probes
are always open.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

import attrs
from twisted.web.resource import Resource
from twisted.web.server import Request

from regmirror.api.auth import ClientAuth, behind
from regmirror.api.health import (
    Liveness,
    Readiness,
    ReadinessResource,
    ReadOnly,
    json_document,
    upstream_states,
)
from regmirror.domain.events import RecentErrors
from regmirror.expiry.view import ReaperView
from regmirror.fetch.inflight import FetchProgress
from regmirror.mirror.mirrors import Mirrors
from regmirror.mirror.observe import Sampler, Traffic
from regmirror.reactor import ReactorTime

SCHEMA = 1

# The page has no external asset: everything it needs is inline, and it may only talk
# to its own origin (status.json).
PAGE_HEADERS = {
    b"content-type": b"text/html; charset=utf-8",
    b"cache-control": b"no-store",
    b"content-security-policy": (
        b"default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        b"connect-src 'self'; img-src data:; frame-ancestors 'none'"
    ),
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
}


class Status:
    """What ``/status.json`` says, read at each request from what the mirror keeps.
    ``sections`` add documents of other services under their names (``{"prefetch":
    prefetch.status}``): each is called at every request and must return JSON-able data."""

    def __init__(
        self,
        clock: ReactorTime,
        mirrors: Mirrors,
        reaper: ReaperView,
        sampler: Sampler,
        errors: RecentErrors,
        readiness: Readiness,
        sections: Mapping[str, Callable[[], object]] | None = None,
    ) -> None:
        self._clock = clock
        self._mirrors = mirrors
        self._reaper = reaper
        self._sampler = sampler
        self._errors = errors
        self._readiness = readiness
        self._sections = dict(sections or {})

    def document(self) -> dict[str, Any]:
        checks = self._readiness.checks()
        sampler = self._sampler
        document = {
            "schema": SCHEMA,
            "now": self._clock.seconds(),
            "started": sampler.started,
            "ready": all(c.ok for c in checks.values()),
            "checks": {name: attrs.asdict(c) for name, c in checks.items()},
            "store": self._store(),
            "traffic": {
                "since_start": _traffic(sampler.totals()),
                "last_hour": _traffic(sampler.last_hour()),
                "minutes": [_traffic(t) for t in sampler.minutes()],
            },
            "upstreams": upstream_states(self._mirrors),
            "fetches": [self._fetch(p) for p in self._mirrors.inflight.fetches()],
            "errors": [attrs.asdict(e) for e in self._errors.events()],
            "error_totals": dict(self._errors.totals),
        }
        for name, read in self._sections.items():
            document[name] = read()
        return document

    def _store(self) -> dict[str, Any]:
        reaper = self._reaper
        return {
            "bytes": reaper.usage,
            "entries": reaper.entry_count,
            "reserved_bytes": reaper.reserved,
            "max_bytes": reaper.max_size,
            "high_watermark_bytes": reaper.high,
            "low_watermark_bytes": reaper.low,
        }

    def _fetch(self, p: FetchProgress) -> dict[str, Any]:
        rate = self._sampler.rate(p)
        eta = None
        if p.size is not None and rate:
            eta = max(0, p.size - p.received) / rate
        return {
            "digest": str(p.digest),
            "upstream": p.upstream,
            "repository": p.repository,
            "received_bytes": p.received,
            "size_bytes": p.size,
            "clients": p.readers,
            "started": p.started or None,
            "rate_bytes_per_second": rate,
            "eta_seconds": eta,
        }


def _traffic(t: Traffic) -> dict[str, Any]:
    return {
        "since": t.since,
        "until": t.until,
        "served_bytes": t.served,
        "fetched_bytes": t.fetched,
        "saved_bytes": t.saved,
        "blob_requests": t.requests,
        "blob_hits": t.hits,
        "hit_ratio": t.hit_ratio,
    }


class StatusJSON(ReadOnly):
    """``GET /status.json``."""

    def __init__(self, status: Status, auth: ClientAuth | None) -> None:
        super().__init__()
        self._status = status
        self._auth = auth

    def render_GET(self, request: Request) -> bytes | int:
        return behind(self._auth, request, lambda r: json_document(r, self._status.document()))

    render_HEAD = render_GET


class StatusPage(ReadOnly):
    """``GET /``: the page (it polls ``status.json``)."""

    def __init__(self, auth: ClientAuth | None) -> None:
        super().__init__()
        self._auth = auth
        self._page = resources.files("regmirror.api").joinpath("status.html").read_bytes()

    def render_GET(self, request: Request) -> bytes | int:
        return behind(self._auth, request, self._render)

    render_HEAD = render_GET

    def _render(self, request: Request) -> bytes:
        for name, value in PAGE_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"content-length", b"%d" % len(self._page))
        return b"" if request.method == b"HEAD" else self._page


@attrs.frozen
class OperatorPages:
    """The probes and the status page, mounted on a listener's root resource by
    ``mount`` (with that listener's client authentication)."""

    status: Status
    readiness: Readiness
    mirrors: Mirrors
    mode: str = "auth"  # regmirror.status_page: auth | open | off

    def mount(self, root: Resource, auth: ClientAuth | None) -> None:
        root.putChild(b"healthz", Liveness())
        root.putChild(b"readyz", ReadinessResource(self.readiness, self.mirrors))
        if self.mode == "off":
            return
        guard = auth if self.mode == "auth" else None
        root.putChild(b"", StatusPage(guard))
        root.putChild(b"status.json", StatusJSON(self.status, guard))
