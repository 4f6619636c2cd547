"""The probes and the status page without sockets: the production site in memory
(tests.support.sitestub), the upstream a StubTreq over an in-memory registry, time a
``task.Clock``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import treq
from treq.testing import StubTreq
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from regmirror.api.auth import ClientAuth, Htpasswd
from regmirror.api.health import Readiness
from regmirror.api.status import OperatorPages, Status
from regmirror.config import UpstreamConfig
from regmirror.domain.events import RecentErrors
from regmirror.expiry.ledger import Ledger
from regmirror.expiry.reaper import Reaper
from regmirror.fetch.inflight import LocalInFlight
from regmirror.http.site import make_site
from regmirror.mirror.cache import Cache
from regmirror.mirror.manifests import ManifestLRU
from regmirror.mirror.mirrors import Mirrors
from regmirror.mirror.observe import Sampler
from regmirror.storage.store import Store
from regmirror.testing import FakeRegistry
from regmirror.upstream.client import Upstream
from regmirror.upstream.remote import RemoteRegistry
from tests.support.sitestub import StubSite
from tests.unit.test_cache_web import Reactor

BLOB = bytes(range(256)) * 4096  # 1 MiB
T0 = 1_000_000.0


class Harness:
    """What ``regmirror.app.service.build`` wires for the status page, on a Clock."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        mode: str = "auth",
        auth: ClientAuth | None = None,
        load_state: bool = True,
    ) -> None:
        self.clock = Reactor()
        self.clock.advance(T0)
        self.upstream = FakeRegistry()
        self.upstream_client = StubTreq(self.upstream)
        config = UpstreamConfig(
            name="up", url="http://upstream.test", username="", password="", docker_hub=False
        )
        self.store = Store(tmp_path / "store")
        self.store.prepare()
        self.errors = RecentErrors(self.clock.seconds)
        self.ledger = Ledger(self.clock, ttl=0, max_size=10 << 20, wall_clock=self.clock.seconds)
        self.inflight = LocalInFlight()
        remote = RemoteRegistry(
            Upstream(
                self.clock,
                config,
                client=self.upstream_client,  # type: ignore[arg-type]
                breaker_failures=2,
                errors=self.errors,
            ),
            self.clock,
        )
        cache = Cache(
            self.clock,
            self.store,
            remote,
            inflight=self.inflight,
            lru=ManifestLRU(),
            usage=self.ledger,
            fsync=False,
            errors=self.errors,
        )
        self.mirrors = Mirrors([cache])
        self.reaper = Reaper(
            self.clock,
            self.store,
            self.ledger,
            run_in_thread=lambda f, *a: maybeDeferred(f, *a),
            in_use=self.inflight.in_use,
            on_removed=self.mirrors.forget,
        )
        if load_state:
            self.reaper.load()
        self.sampler = Sampler(self.clock, self.mirrors)
        self.sampler.startService()
        readiness = Readiness(self.clock, self.store, self.reaper)
        status = Status(self.clock, self.mirrors, self.reaper, self.sampler, self.errors, readiness)
        self.site = make_site(self.mirrors, reactor=MemoryReactorClock(), auth=auth)
        OperatorPages(status, readiness, self.mirrors, mode).mount(self.site.resource, auth)
        self.client = StubSite(self.site)

    def pump(self) -> None:
        for _ in range(20):
            self.upstream_client.flush()
            self.client.flush()

    def request(self, path: str, method: str = "GET", **kwargs: Any) -> tuple[Any, bytes]:
        t = SynchronousTestCase()
        d = self.client.request(method, "http://mirror.test" + path, **kwargs)
        self.pump()
        response = t.successResultOf(d)
        body = treq.content(response)
        self.pump()
        return response, t.successResultOf(body)

    def json(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        response, body = self.request(path, **kwargs)
        return response.code, json.loads(body)

    def tick(self, seconds: int) -> None:
        """Let ``seconds`` pass, one second at a time (the sampler ticks every second)."""
        for _ in range(seconds):
            self.clock.advance(1)
            self.pump()


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def htpasswd_auth(tmp_path: Path, *, anonymous_read: bool = False) -> ClientAuth:
    path = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"ops:{hashed}\n")
    htpasswd = Htpasswd(str(path), Clock())
    htpasswd.load()
    return ClientAuth(htpasswd, "regmirror", anonymous_read)


CREDENTIALS = {"Authorization": "Basic b3BzOnNlY3JldA=="}  # ops:secret


# -- probes --------------------------------------------------------------------------


def test_healthz_says_ok(h: Harness) -> None:
    assert h.json("/healthz") == (200, {"status": "ok"})


def test_readyz_is_ready_with_a_writable_store_and_the_state_loaded(h: Harness) -> None:
    code, body = h.json("/readyz")
    assert code == 200 and body["status"] == "ready"
    assert body["checks"] == {
        "store_writable": {"ok": True, "detail": ""},
        "state_loaded": {"ok": True, "detail": ""},
    }
    assert [u["name"] for u in body["upstreams"]] == ["up"]
    assert body["upstreams"][0]["reachable"] is None  # never asked yet
    assert list(h.store.tmp.iterdir()) == []  # the probe left nothing behind


def test_readyz_is_503_while_the_store_is_not_writable_probed_once_a_second(
    h: Harness,
) -> None:
    shutil.rmtree(h.store.tmp)  # (tests run as root: a read-only mode would not stop us)
    code, body = h.json("/readyz")
    assert code == 503 and body["status"] == "not ready"
    assert body["checks"]["store_writable"]["ok"] is False
    assert "_tmp" in body["checks"]["store_writable"]["detail"]
    h.store.tmp.mkdir()
    assert h.json("/readyz")[0] == 503  # the last probe is kept for a second
    h.clock.advance(1)
    assert h.json("/readyz")[0] == 200


def test_readyz_is_503_until_the_reaper_state_is_loaded(tmp_path: Path) -> None:
    h = Harness(tmp_path, load_state=False)
    code, body = h.json("/readyz")
    assert code == 503 and body["checks"]["state_loaded"]["ok"] is False
    h.reaper.load()
    assert h.json("/readyz")[0] == 200


def test_an_upstream_down_is_reported_but_the_mirror_stays_ready(h: Harness) -> None:
    digest = h.upstream.add_blob(BLOB)
    h.request(f"/v2/a/blobs/{digest}")  # cached while the upstream is up
    h.upstream.down = True
    missing = h.upstream.add_blob(b"not cached")
    for _ in range(2):  # breaker_failures=2
        response, _ = h.request(f"/v2/a/blobs/{missing}")
        assert response.code == 503
    code, body = h.json("/readyz")
    assert code == 200 and body["status"] == "ready"
    (up,) = body["upstreams"]
    assert up["breaker"] == "open" and up["reachable"] is False
    assert up["consecutive_failures"] == 2 and up["last_failure"] == T0
    assert up["last_success"] == T0  # the first fetch
    response, got = h.request(f"/v2/a/blobs/{digest}")
    assert response.code == 200 and got == BLOB  # the warm cache still serves
    _, status = h.json("/status.json")
    assert status["upstreams"] == body["upstreams"]
    (event,) = status["errors"]  # two equal failures: one event, counted twice
    assert event["kind"] == "upstream" and event["upstream"] == "up"
    assert event["count"] == 2 and "HTTP 503" in event["message"]


def test_probes_need_no_credentials_when_auth_is_on(tmp_path: Path) -> None:
    h = Harness(tmp_path, auth=htpasswd_auth(tmp_path))
    assert h.request("/v2/")[0].code == 401
    assert h.json("/healthz")[0] == 200
    assert h.json("/readyz")[0] == 200


def test_probes_answer_only_get_and_head(h: Harness) -> None:
    response, body = h.request("/healthz", method="POST")
    assert response.code == 405
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    response, body = h.request("/readyz", method="HEAD")
    assert response.code == 200 and body == b""


# -- status.json ---------------------------------------------------------------------


def test_status_json_reports_a_fetch_in_flight_with_its_progress(h: Harness) -> None:
    digest = h.upstream.add_blob(BLOB)
    h.upstream.ratelimit = (99, 100)
    h.upstream.hold_blobs = True
    pending = [h.client.get(f"http://mirror.test/v2/team/app/blobs/{digest}") for _ in range(2)]
    h.pump()
    h.upstream.release(chunk=256 * 1024)
    h.pump()
    h.tick(1)
    h.upstream.release(chunk=256 * 1024)
    h.pump()
    h.tick(2)
    _, doc = h.json("/status.json")
    (fetch,) = doc["fetches"]
    assert fetch == {
        "digest": digest,
        "upstream": "up",
        "repository": "team/app",
        "received_bytes": 512 * 1024,
        "size_bytes": len(BLOB),
        "clients": 2,
        "started": T0,
        # 256 KiB arrived in the 2 s since the first tick that saw 256 KiB
        "rate_bytes_per_second": 128 * 1024,
        "eta_seconds": 4.0,
    }
    assert doc["upstreams"][0]["ratelimit_remaining"] == 99
    assert doc["store"]["reserved_bytes"] == len(BLOB)
    while h.upstream.held:
        h.upstream.release(chunk=256 * 1024)
        h.pump()
    for d in pending:
        assert SynchronousTestCase().successResultOf(d).code == 200
    assert h.json("/status.json")[1]["fetches"] == []


def test_status_json_counts_traffic_since_start_and_per_minute(h: Harness) -> None:
    digest = h.upstream.add_blob(BLOB)
    h.request(f"/v2/a/blobs/{digest}")  # a miss: fetched and served
    h.tick(60)  # a minute's snapshot
    for _ in range(3):  # three hits
        assert h.request(f"/v2/a/blobs/{digest}")[1] == BLOB
    h.request(f"/v2/a/blobs/{digest}", headers={"Range": "bytes=0-99"})  # a hit too
    h.tick(5)
    _, doc = h.json("/status.json")
    assert doc["schema"] == 1 and doc["now"] == T0 + 65 and doc["started"] == T0
    assert doc["ready"] is True
    since = doc["traffic"]["since_start"]
    assert since == {
        "since": T0,
        "until": T0 + 65,
        "served_bytes": 4 * len(BLOB) + 100,
        "fetched_bytes": len(BLOB),
        "saved_bytes": 3 * len(BLOB) + 100,
        "blob_requests": 5,
        "blob_hits": 4,
        "hit_ratio": 0.8,
    }
    assert doc["traffic"]["last_hour"] == since  # younger than an hour
    first, current = doc["traffic"]["minutes"]
    assert (first["since"], first["until"]) == (T0, T0 + 60)
    assert (first["served_bytes"], first["fetched_bytes"], first["saved_bytes"]) == (
        len(BLOB),
        len(BLOB),
        0,
    )
    assert first["hit_ratio"] == 0.0
    assert current["since"] == T0 + 60 and current["hit_ratio"] == 1.0
    assert current["saved_bytes"] == 3 * len(BLOB) + 100
    assert doc["store"] == {
        "bytes": len(BLOB),
        "entries": 1,
        "reserved_bytes": 0,
        "max_bytes": 10 << 20,
        "high_watermark_bytes": int((10 << 20) * 0.95),
        "low_watermark_bytes": int((10 << 20) * 0.85),
    }
    assert doc["errors"] == [] and doc["error_totals"] == {}


def test_the_last_hour_keeps_sixty_minutes(h: Harness) -> None:
    digest = h.upstream.add_blob(BLOB)
    h.request(f"/v2/a/blobs/{digest}")
    h.tick(61 * 60)
    _, doc = h.json("/status.json")
    minutes = doc["traffic"]["minutes"]
    assert len(minutes) == 61  # 60 kept, and the one under way
    assert minutes[0]["since"] == T0 + 60  # the first minute, with the fetch, is gone
    assert doc["traffic"]["last_hour"]["fetched_bytes"] == 0
    assert doc["traffic"]["since_start"]["fetched_bytes"] == len(BLOB)


def test_a_digest_mismatch_is_a_recent_error(h: Harness) -> None:
    digest = h.upstream.add_blob(BLOB)
    h.upstream.served_blobs[digest] = BLOB[:-1] + b"\x00"
    h.request(f"/v2/a/blobs/{digest}")
    _, doc = h.json("/status.json")
    (event,) = doc["errors"]
    assert event["kind"] == "digest" and event["digest"] == digest
    assert event["upstream"] == "up" and event["first"] == T0
    assert "upstream sent content with digest sha256:" in event["message"]
    assert doc["error_totals"] == {"digest": 1}
    assert doc["traffic"]["since_start"]["fetched_bytes"] == len(BLOB)  # fetched all the same


def test_the_sampler_survives_failing_ticks(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    failures = 0

    def broken() -> list[Any]:
        nonlocal failures
        failures += 1
        raise RuntimeError("boom")

    digest = h.upstream.add_blob(BLOB)
    h.upstream.hold_blobs = True
    pending = h.client.get(f"http://mirror.test/v2/a/blobs/{digest}")
    h.pump()
    h.upstream.release(chunk=100_000)
    h.pump()
    with monkeypatch.context() as patch:
        patch.setattr(h.inflight, "fetches", broken)
        for _ in range(6):  # (bytes every 10 s, or the upstream read timeout cuts it)
            h.tick(10)
            h.upstream.release(chunk=10_000)
            h.pump()
    assert failures == 60
    assert len(h.sampler.minutes()) == 2  # the minute's snapshot was taken all the same
    h.tick(2)
    progress = h.inflight.fetches()
    assert h.sampler.rate(progress[0]) == 0.0  # the loop still runs: seen twice, no bytes
    while h.upstream.held:
        h.upstream.release(chunk=100_000)
        h.pump()
    assert SynchronousTestCase().successResultOf(pending).code == 200


def test_recent_errors_are_bounded_newest_first() -> None:
    clock = Clock()
    errors = RecentErrors(clock.seconds, size=3)
    for i in range(5):
        clock.advance(1)
        errors.record("upstream", f"failure {i}", upstream="up")
    errors.record("upstream", "failure 4", upstream="up")
    assert [(e.message, e.count) for e in errors.events()] == [
        ("failure 4", 2),
        ("failure 3", 1),
        ("failure 2", 1),
    ]
    assert errors.totals == {"upstream": 6}


# -- who sees the page ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/status.json"])
def test_the_status_page_is_behind_the_client_auth_by_default(tmp_path: Path, path: str) -> None:
    h = Harness(tmp_path, auth=htpasswd_auth(tmp_path))
    response, body = h.request(path)
    assert response.code == 401
    assert response.headers.getRawHeaders("www-authenticate") == ['Basic realm="regmirror"']
    assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    assert h.request(path, headers={"Authorization": "Basic b3BzOndyb25n"})[0].code == 401
    assert h.request(path, headers=CREDENTIALS)[0].code == 200


def test_anonymous_read_opens_the_status_page_as_it_opens_v2(tmp_path: Path) -> None:
    h = Harness(tmp_path, auth=htpasswd_auth(tmp_path, anonymous_read=True))
    assert h.request("/v2/")[0].code == 200
    assert h.request("/status.json")[0].code == 200


def test_status_page_open_needs_no_credentials(tmp_path: Path) -> None:
    h = Harness(tmp_path, mode="open", auth=htpasswd_auth(tmp_path))
    assert h.request("/")[0].code == 200
    assert h.json("/status.json")[0] == 200
    assert h.request("/v2/")[0].code == 401  # the API keeps its authentication


def test_status_page_off_is_not_served(tmp_path: Path) -> None:
    h = Harness(tmp_path, mode="off")
    for path in ("/", "/status.json"):
        code, body = h.json(path)
        assert code == 404 and body["errors"][0]["code"] == "UNSUPPORTED"
    assert h.json("/healthz")[0] == 200


def test_the_page_is_self_contained(h: Harness) -> None:
    response, body = h.request("/")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    csp = response.headers.getRawHeaders("content-security-policy")[0]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    page = body.decode()
    assert 'fetch("status.json"' in page
    assert not re.search(r"<(script|link|img|iframe)[^>]*\b(src|href)=", page)
    assert "@import" not in page and "url(" not in page
    # The one absolute URL is the SVG namespace, which is a name, never fetched.
    assert re.findall(r"https?://[^\s\"']+", page) == ["http://www.w3.org/2000/svg"]


def test_metrics_count_the_blob_bytes_served_and_fetched(h: Harness) -> None:
    from collections import Counter

    from regmirror.api.metrics import metrics_resource

    h.site.resource.putChild(b"metrics", metrics_resource(h.mirrors, h.reaper, Counter()))
    digest = h.upstream.add_blob(BLOB)
    for _ in range(2):
        h.request(f"/v2/a/blobs/{digest}")
    samples = dict(
        line.rsplit(" ", 1)
        for line in h.request("/metrics")[1].decode().splitlines()
        if not line.startswith("#")
    )
    assert float(samples['regmirror_blob_bytes_served_total{upstream="up"}']) == 2 * len(BLOB)
    assert float(samples['regmirror_upstream_blob_bytes_total{upstream="up"}']) == len(BLOB)


def test_other_services_add_their_sections(h: Harness) -> None:
    readiness = Readiness(h.clock, h.store, h.reaper)
    status = Status(
        h.clock,
        h.mirrors,
        h.reaper,
        h.sampler,
        h.errors,
        readiness,
        sections={"prefetch": lambda: {"policies": []}},
    )
    assert status.document()["prefetch"] == {"policies": []}
