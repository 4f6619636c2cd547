"""Probes: ``GET /healthz`` (the process is up) and ``GET /readyz`` (it can do its
work), never behind client authentication.

Ready means: the store is writable (a file created and removed in ``ROOT/_tmp``, at
most once per ``every`` seconds; a full disk still passes, since cached content can be
served) and the reaper's state is loaded. Each upstream's circuit breaker and last known
reachability are reported in the body but never fail readiness: a warm cache is useful
with its upstream down.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.web.resource import Resource
from twisted.web.server import Request

from regmirror.api.responses import json_body, render_error
from regmirror.domain.errors import Unsupported
from regmirror.expiry.view import ReaperView
from regmirror.mirror.cache import Cache
from regmirror.mirror.mirrors import Mirrors
from regmirror.reactor import ReactorTime
from regmirror.storage.store import Store


@attrs.frozen
class Check:
    ok: bool
    detail: str = ""


class Readiness:
    """The readiness checks, the store's probe remembered for ``every`` seconds."""

    def __init__(
        self, clock: ReactorTime, store: Store, reaper: ReaperView, *, every: float = 1.0
    ) -> None:
        self._clock = clock
        self._store = store
        self._reaper = reaper
        self._every = every
        self._probed: tuple[float, Check] | None = None

    def checks(self) -> dict[str, Check]:
        return {"store_writable": self._store_writable(), "state_loaded": self._state_loaded()}

    def _store_writable(self) -> Check:
        now = self._clock.seconds()
        if self._probed is None or now - self._probed[0] >= self._every:
            problem = self._store.probe_writable()
            self._probed = (now, Check(problem is None, problem or ""))
        return self._probed[1]

    def _state_loaded(self) -> Check:
        if self._reaper.ready:
            return Check(True)
        return Check(False, "the reaper's state is still being loaded")


def header_count(header: str | None) -> int | None:
    """The count of a ``ratelimit-remaining`` header (``76;w=21600``), or None."""
    text = (header or "").split(";", 1)[0].strip()
    return int(text) if text.isdigit() else None


def upstream_state(cache: Cache, default: bool) -> dict[str, Any]:
    """One upstream as ``/readyz`` and ``/status.json`` describe it."""
    remote = cache.upstream
    breaker = remote.breaker_state
    return {
        "name": remote.name,
        "url": remote.config.url,
        "default": default,
        "breaker": "open" if breaker.open else "closed",
        "reachable": breaker.reachable,
        "consecutive_failures": breaker.consecutive_failures,
        "last_success": breaker.last_success,
        "last_failure": breaker.last_failure,
        "ratelimit_remaining": header_count(remote.ratelimit_remaining),
    }


def upstream_states(mirrors: Mirrors) -> list[dict[str, Any]]:
    return [upstream_state(c, c is mirrors.default) for c in mirrors.caches]


def json_document(request: Request, document: object) -> bytes:
    """A JSON answer that no cache keeps."""
    request.setHeader(b"cache-control", b"no-store")
    return json_body(request, json.dumps(document).encode())


class ReadOnly(Resource):
    """A leaf answering ``GET`` and ``HEAD`` only: anything else gets a JSON 405."""

    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):
            error = Unsupported("only GET and HEAD are supported here", status=405)
            error.headers[b"allow"] = b"GET, HEAD"
            return render_error(request, error)
        result: bytes | int = super().render(request)
        return result


class Liveness(ReadOnly):
    """``GET /healthz``: 200 while the process answers."""

    def render_GET(self, request: Request) -> bytes:
        return json_document(request, {"status": "ok"})

    render_HEAD = render_GET


class ReadinessResource(ReadOnly):
    """``GET /readyz``: 200 when every check passes, else 503; the body says which."""

    def __init__(self, readiness: Readiness, mirrors: Mirrors) -> None:
        super().__init__()
        self._readiness = readiness
        self._mirrors = mirrors

    def render_GET(self, request: Request) -> bytes:
        checks = self._readiness.checks()
        ready = all(c.ok for c in checks.values())
        if not ready:
            request.setResponseCode(503)
        return json_document(
            request,
            {
                "status": "ready" if ready else "not ready",
                "checks": {name: attrs.asdict(c) for name, c in checks.items()},
                "upstreams": upstream_states(self._mirrors),
            },
        )

    render_HEAD = render_GET
