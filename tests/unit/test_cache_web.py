"""The mirror end to end without sockets: in-memory HTTP clients of the production site
(tests.support.sitestub), whose upstream is a StubTreq over an in-memory registry
(regmirror.testing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import treq
from treq.testing import StubTreq
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from regmirror.config import UpstreamConfig
from regmirror.domain.digest import Digest
from regmirror.expiry.ledger import Ledger
from regmirror.expiry.reaper import Reaper
from regmirror.fetch.inflight import LocalInFlight
from regmirror.http.site import make_site
from regmirror.mirror.cache import Cache
from regmirror.mirror.manifests import ManifestLRU
from regmirror.storage.store import Store
from regmirror.testing import FakeRegistry, digest_of
from regmirror.upstream.client import Upstream
from regmirror.upstream.credentials import Credentials
from regmirror.upstream.remote import RemoteRegistry
from tests.support.sitestub import StubSite

OCI = "application/vnd.oci.image.manifest.v1+json"
DOCKER = "application/vnd.docker.distribution.manifest.v2+json"


class Reactor(Clock):
    def getThreadPool(self) -> None:
        raise AssertionError("no threads in unit tests")


class Harness:
    def __init__(
        self,
        tmp_path: Path,
        *,
        freshness: float = 30.0,
        hub: bool = False,
        max_size: int = 0,
        password: str = "",
        max_fetches: int = 0,
    ) -> None:
        self.clock = Reactor()
        self.upstream = FakeRegistry()
        self.upstream_client = StubTreq(self.upstream)
        config = UpstreamConfig(
            name="up",
            url="http://upstream.test",
            username="mirror" if password else "",
            password=password,
            docker_hub=hub,
        )
        self.store = Store(tmp_path)
        self.store.prepare()
        self.ledger = Ledger(self.clock, ttl=0, max_size=max_size, wall_clock=self.clock.seconds)
        self.reaper = Reaper(
            self.clock,
            self.store,
            self.ledger,
            run_in_thread=lambda f, *a: maybeDeferred(f, *a),
            in_use=lambda digest: self.cache.in_use(digest),
            on_removed=lambda kind, digest: self.cache.forget(kind, digest),
        )
        self.reaper.load()
        self.inflight = LocalInFlight(max_fetches)
        self.cache = Cache(
            self.clock,
            self.store,
            RemoteRegistry(
                Upstream(
                    self.clock,
                    config,
                    client=self.upstream_client,  # type: ignore[arg-type]
                    credentials=Credentials(
                        config, clock=self.clock.seconds, run_in_thread=maybeDeferred
                    ),
                ),
                self.clock,
            ),
            inflight=self.inflight,
            lru=ManifestLRU(),
            usage=self.ledger,
            tag_freshness=freshness,
            fsync=False,
        )
        self.serve()

    def serve(self, **kwargs: Any) -> None:
        """Serve the cache on the production site, request and channel classes, in
        memory (``kwargs`` go to ``make_site``: auth, access)."""
        self.site = make_site(self.cache, reactor=MemoryReactorClock(), **kwargs)
        self.root: Resource = self.site.resource
        self.client = StubSite(self.site)

    def pump(self) -> None:
        for _ in range(20):
            self.upstream_client.flush()
            self.client.flush()

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[Any, bytes]:
        d = self.client.request(method, "http://mirror.test" + path, **kwargs)
        self.pump()
        response = SynchronousTestCase().successResultOf(d)
        body_d = treq.content(response)
        self.pump()
        return response, SynchronousTestCase().successResultOf(body_d)

    def manifest(self, name: str, tag: str, media_type: str = OCI, extra: str = "") -> str:
        data = json.dumps({"schemaVersion": 2, "mediaType": media_type, "x": extra}).encode()
        return self.upstream.add_manifest(name, tag, data, media_type)


def header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


def error_code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_base_endpoint_announces_the_api_version(h: Harness) -> None:
    response, _body = h.request("GET", "/v2/")
    assert response.code == 200
    assert header(response, "docker-distribution-api-version") == "registry/2.0"


def test_manifest_by_tag_then_by_digest_has_the_spec_headers(h: Harness) -> None:
    digest = h.manifest("team/app", "1.0")
    response, body = h.request("GET", "/v2/team/app/manifests/1.0")
    assert response.code == 200
    assert header(response, "content-type") == OCI
    assert header(response, "docker-content-digest") == digest
    assert header(response, "etag") == f'"{digest}"'
    # (StubTreq's in-memory transport drops Content-Length; the integration tests check it.)
    assert digest_of(body) == digest
    response, body2 = h.request("HEAD", f"/v2/team/app/manifests/{digest}")
    assert response.code == 200 and body2 == b""
    assert h.upstream.count("GET", "/manifests/") == 1


def test_cached_manifest_by_digest_needs_no_upstream(h: Harness) -> None:
    digest = h.manifest("team/app", "1.0")
    h.request("GET", "/v2/team/app/manifests/1.0")
    h.upstream.down = True
    response, body = h.request("GET", f"/v2/team/app/manifests/{digest}")
    assert response.code == 200 and digest_of(body) == digest


def test_fresh_tag_is_served_without_asking_upstream(h: Harness) -> None:
    h.manifest("a", "latest")
    h.request("GET", "/v2/a/manifests/latest")
    for _ in range(5):
        h.request("HEAD", "/v2/a/manifests/latest")
    assert h.upstream.count("GET", "/manifests/") == 1
    assert h.upstream.count("HEAD", "/manifests/") == 0


def test_stale_tag_is_revalidated_with_one_head(h: Harness) -> None:
    h.manifest("a", "latest")
    h.request("GET", "/v2/a/manifests/latest")
    h.clock.advance(31)
    for _ in range(3):
        response, _ = h.request("GET", "/v2/a/manifests/latest")
        assert response.code == 200
    assert h.upstream.count("HEAD", "/manifests/latest") == 1
    assert h.upstream.count("GET", "/manifests/") == 1


def test_moved_tag_is_fetched_again(h: Harness) -> None:
    h.manifest("a", "latest", extra="one")
    h.request("GET", "/v2/a/manifests/latest")
    new = h.manifest("a", "latest", extra="two")
    h.clock.advance(31)
    response, body = h.request("GET", "/v2/a/manifests/latest")
    assert header(response, "docker-content-digest") == new
    assert digest_of(body) == new


def test_upstream_down_serves_stale_tag_and_503_for_unknown(h: Harness) -> None:
    old = h.manifest("a", "latest")
    h.request("GET", "/v2/a/manifests/latest")
    h.upstream.down = True
    h.clock.advance(31)
    response, body = h.request("GET", "/v2/a/manifests/latest")
    assert response.code == 200 and digest_of(body) == old
    response, body = h.request("GET", "/v2/a/manifests/other")
    assert response.code == 503 and error_code(body) == "UNAVAILABLE"


def test_tag_deleted_upstream_is_manifest_unknown(h: Harness) -> None:
    h.manifest("a", "latest")
    h.request("GET", "/v2/a/manifests/latest")
    del h.upstream.manifests[("a", "latest")]
    h.clock.advance(31)
    response, body = h.request("GET", "/v2/a/manifests/latest")
    assert response.code == 404 and error_code(body) == "MANIFEST_UNKNOWN"


def test_accept_header_is_honoured_for_cached_manifests(h: Harness) -> None:
    digest = h.manifest("a", "latest", media_type=OCI)
    h.request("GET", "/v2/a/manifests/latest")
    response, body = h.request("GET", f"/v2/a/manifests/{digest}", headers={"accept": DOCKER})
    assert response.code == 404 and error_code(body) == "MANIFEST_UNKNOWN"
    response, _ = h.request("GET", f"/v2/a/manifests/{digest}", headers={"accept": OCI})
    assert response.code == 200


def test_wrong_manifest_bytes_from_upstream_are_not_cached(h: Harness) -> None:
    data = b'{"schemaVersion":2}'
    h.upstream.manifests[("a", "sha256:" + "0" * 64)] = (data, OCI)
    response, _body = h.request("GET", "/v2/a/manifests/sha256:" + "0" * 64)
    assert response.code == 503
    assert h.store.read_manifest(Digest("sha256", "0" * 64)) is None


def test_blob_is_fetched_once_verified_and_then_served_from_disk(h: Harness) -> None:
    data = bytes(range(256)) * 5000
    digest = h.upstream.add_blob(data)
    response, body = h.request("GET", f"/v2/a/blobs/{digest}")
    assert response.code == 200 and body == data
    assert header(response, "docker-content-digest") == digest
    h.upstream.down = True
    response, body = h.request("GET", f"/v2/b/blobs/{digest}")
    assert response.code == 200 and body == data
    assert h.upstream.count("GET", "/blobs/") == 1


def test_blob_range_and_unsatisfiable_range(h: Harness) -> None:
    data = bytes(range(256)) * 100
    digest = h.upstream.add_blob(data)
    h.request("GET", f"/v2/a/blobs/{digest}")
    response, body = h.request("GET", f"/v2/a/blobs/{digest}", headers={"range": "bytes=10-19"})
    assert response.code == 206 and body == data[10:20]
    assert header(response, "content-range") == f"bytes 10-19/{len(data)}"
    response, body = h.request("GET", f"/v2/a/blobs/{digest}", headers={"range": "bytes=99999-"})
    assert response.code == 416
    assert header(response, "content-range") == f"bytes */{len(data)}"


def test_head_of_uncached_blob_asks_upstream_without_fetching(h: Harness) -> None:
    data = b"x" * 1000
    digest = h.upstream.add_blob(data)
    response, _body = h.request("HEAD", f"/v2/a/blobs/{digest}")
    assert response.code == 200 and header(response, "content-length") == "1000"
    assert h.upstream.count("GET", "/blobs/") == 0
    assert not h.store.blob_path(Digest.parse(digest)).exists()


def test_concurrent_misses_share_one_upstream_fetch(h: Harness) -> None:
    data = bytes(range(256)) * 4096
    digest = h.upstream.add_blob(data)
    h.upstream.hold_blobs = True
    ds = [h.client.get(f"http://mirror.test/v2/a/blobs/{digest}") for _ in range(5)]
    h.pump()
    h.upstream.release(chunk=100_000)
    h.pump()
    ds.append(h.client.get(f"http://mirror.test/v2/a/blobs/{digest}"))  # joins mid-flight
    h.pump()
    while h.upstream.held:
        h.upstream.release(chunk=100_000)
        h.pump()
    t = SynchronousTestCase()
    for d in ds:
        response = t.successResultOf(d)
        body = treq.content(response)
        h.pump()
        assert t.successResultOf(body) == data
    assert h.upstream.count("GET", "/blobs/") == 1


def test_corrupt_upstream_blob_breaks_every_transfer_and_is_not_cached(h: Harness) -> None:
    data = bytes(range(256)) * 1000
    digest = h.upstream.add_blob(data)
    h.upstream.served_blobs[digest] = data[:-1] + b"\x00"
    h.upstream.hold_blobs = True
    ds = [h.client.get(f"http://mirror.test/v2/a/blobs/{digest}") for _ in range(3)]
    h.pump()
    h.upstream.release(chunk=100_000)
    h.pump()
    t = SynchronousTestCase()
    bodies = [treq.content(t.successResultOf(d)) for d in ds]
    h.pump()
    h.upstream.release()
    h.pump()
    for body in bodies:
        t.failureResultOf(body)  # a broken transfer, never a complete-looking body
    assert not h.store.blob_path(Digest.parse(digest)).exists()
    assert list(h.store.tmp.iterdir()) == []
    # Before any byte was sent, the failure is a clean 503.
    h.upstream.hold_blobs = False
    response, got = h.request("GET", f"/v2/a/blobs/{digest}")
    assert response.code == 503 and error_code(got) == "UNAVAILABLE"
    del h.upstream.served_blobs[digest]
    response, got = h.request("GET", f"/v2/a/blobs/{digest}")
    assert got == data and h.upstream.count("GET", "/blobs/") == 3


def test_client_going_away_does_not_cancel_the_fetch(h: Harness) -> None:
    data = bytes(range(256)) * 4096
    digest = h.upstream.add_blob(data)
    h.upstream.hold_blobs = True
    d = h.client.get(f"http://mirror.test/v2/a/blobs/{digest}")
    h.pump()
    h.upstream.release(chunk=50_000)
    h.pump()
    d.cancel()
    h.pump()
    while h.upstream.held:
        h.upstream.release(chunk=100_000)
        h.pump()
    assert h.store.blob_path(Digest.parse(digest)).read_bytes() == data


def test_errors_use_the_spec_format(h: Harness) -> None:
    cases = [
        ("GET", "/v2/UPPER/manifests/x", 400, "NAME_INVALID"),
        ("GET", "/v2/a/manifests/.bad", 400, "TAG_INVALID"),
        ("GET", "/v2/a/blobs/sha256:xyz", 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/manifests/missing", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/a/blobs/sha256:" + "1" * 64, 404, "BLOB_UNKNOWN"),
        ("GET", "/v2/a/tags/list", 404, "NAME_UNKNOWN"),
        ("PUT", "/v2/a/manifests/latest", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/a/blobs/sha256:" + "1" * 64, 405, "UNSUPPORTED"),
        ("POST", "/v2/a/blobs/uploads/", 405, "UNSUPPORTED"),
        ("GET", "/v2/_catalog?n=abc", 400, "PAGINATION_NUMBER_INVALID"),
    ]
    for method, path, status, code in cases:
        response, body = h.request(method, path)
        assert (response.code, error_code(body)) == (status, code), (method, path)
        assert header(response, "content-type") == "application/json"
    assert sorted(p.name for p in h.store.repositories.iterdir()) == []


def test_tag_list_passes_through_and_is_served_stale(h: Harness) -> None:
    h.upstream.tag_lists["a"] = ["3", "1", "2"]
    response, body = h.request("GET", "/v2/a/tags/list")
    assert json.loads(body) == {"name": "a", "tags": ["1", "2", "3"]}  # lexical order
    response, body = h.request("GET", "/v2/a/tags/list?n=1&last=1")
    assert json.loads(body) == {"name": "a", "tags": ["2"]}
    assert header(response, "link") == '</v2/a/tags/list?n=1&last=2>; rel="next"'
    h.upstream.down = True
    response, body = h.request("GET", "/v2/a/tags/list?n=2")
    assert json.loads(body) == {"name": "a", "tags": ["1", "2"]}
    assert header(response, "link") == '</v2/a/tags/list?n=2&last=2>; rel="next"'


def test_docker_hub_official_images_are_normalised(tmp_path: Path) -> None:
    h = Harness(tmp_path, hub=True)
    digest = h.manifest("library/alpine", "3.19")
    response, _body = h.request("GET", "/v2/alpine/manifests/3.19")
    assert response.code == 200 and header(response, "docker-content-digest") == digest
    assert h.upstream.count("GET", "/v2/library/alpine/manifests/3.19") == 1


def test_tls_handshake_on_the_plain_port_is_answered_at_once() -> None:
    from twisted.internet.testing import StringTransport

    from regmirror.http.site import RegistrySite

    site = RegistrySite(Resource(), access_log=False)
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert transport.value().startswith(b"HTTP/1.0 400 Bad Request")
    assert transport.disconnecting


def test_a_blob_too_large_for_the_quota_is_passed_through_verified(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_size=100_000)
    data = bytes(range(256)) * 1000  # 256 kB: more than the whole quota
    digest = h.upstream.add_blob(data)
    response, body = h.request("GET", f"/v2/a/blobs/{digest}")
    assert response.code == 200 and body == data
    assert not h.store.blob_path(Digest.parse(digest)).exists()
    assert list(h.store.tmp.iterdir()) == []
    # Wrong bytes passed through are cut before the last byte.
    h.upstream.served_blobs[digest] = data[:-1] + b"\x00"
    d = h.client.get(f"http://mirror.test/v2/a/blobs/{digest}")
    h.pump()
    t = SynchronousTestCase()
    body_d = treq.content(t.successResultOf(d))
    h.pump()
    t.failureResultOf(body_d)


def test_cached_content_is_recorded_and_used_for_the_reaper(h: Harness) -> None:
    data = b"x" * 5000
    digest = h.upstream.add_blob(data)
    manifest = h.manifest("a", "1")
    h.request("GET", f"/v2/a/blobs/{digest}")
    h.request("GET", "/v2/a/manifests/1")
    assert h.reaper.entries[Digest.parse(digest)].size == 5000
    assert h.reaper.entries[Digest.parse(manifest)].kind == "manifest"
    h.clock.advance(100)
    h.request("GET", f"/v2/a/blobs/{digest}")
    assert h.reaper.entries[Digest.parse(digest)].last_used == 100
    assert not h.cache.in_use(Digest.parse(digest))  # the reader released it


def test_disk_full_cuts_the_transfer_runs_an_eviction_and_keeps_serving(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    import regmirror.fetch.blobfetch

    cached = h.upstream.add_blob(b"c" * 1000)
    h.request("GET", f"/v2/a/blobs/{cached}")
    evictions: list[bool] = []
    monkeypatch.setattr(h.reaper, "evict", lambda: evictions.append(True))
    data = bytes(range(256)) * 1000
    digest = h.upstream.add_blob(data)
    h.upstream.hold_blobs = True

    def full(fd: int, b: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    d = h.client.get(f"http://mirror.test/v2/a/blobs/{digest}")
    h.pump()
    h.upstream.release(chunk=50_000)  # some bytes reach the client
    h.pump()
    monkeypatch.setattr(regmirror.fetch.blobfetch.os, "write", full)
    h.upstream.release()
    h.pump()
    monkeypatch.setattr(regmirror.fetch.blobfetch.os, "write", os.write)
    t = SynchronousTestCase()
    response = t.successResultOf(d)
    body = treq.content(response)
    h.pump()
    t.failureResultOf(body)  # cut, never complete
    assert evictions == [True]
    assert list(h.store.tmp.iterdir()) == []
    h.upstream.hold_blobs = False
    response, got = h.request("GET", f"/v2/a/blobs/{cached}")
    assert response.code == 200 and got == b"c" * 1000


def test_private_upstream_content_is_not_served_across_repositories(tmp_path: Path) -> None:
    h = Harness(tmp_path, password="secret")
    data = b"private layer" * 1000
    digest = h.upstream.add_blob(data)
    manifest = h.manifest("team/a", "1")
    h.upstream.private["team/b"] = set()  # team/b references nothing
    h.upstream.private["team/c"] = {digest, manifest}
    h.upstream.manifests[("team/c", manifest)] = h.upstream.manifests[("team/a", manifest)]
    assert h.request("GET", f"/v2/team/a/blobs/{digest}")[1] == data
    assert h.request("GET", "/v2/team/a/manifests/1")[0].code == 200
    heads = h.upstream.count("HEAD", "/")
    # Cached, but team/b never referenced it: the upstream is asked, and says no.
    response, body = h.request("GET", f"/v2/team/b/blobs/{digest}")
    assert (response.code, error_code(body)) == (404, "BLOB_UNKNOWN")
    response, body = h.request("GET", f"/v2/team/b/manifests/{manifest}")
    assert (response.code, error_code(body)) == (404, "MANIFEST_UNKNOWN")
    assert h.request("HEAD", f"/v2/team/b/blobs/{digest}")[0].code == 404
    # team/c does reference it: one HEAD, then it is linked and served from the cache.
    assert h.request("GET", f"/v2/team/c/blobs/{digest}")[1] == data
    assert h.request("GET", f"/v2/team/c/blobs/{digest}")[1] == data
    assert h.request("GET", f"/v2/team/c/manifests/{manifest}")[0].code == 200
    assert h.upstream.count("GET", "/blobs/") == 1  # never fetched twice
    assert h.upstream.count("HEAD", "/") == heads + 3 + 2  # b: 3 refused; c: blob, manifest


def test_public_upstream_content_is_shared_without_asking(h: Harness) -> None:
    data = b"public layer" * 100
    digest = h.upstream.add_blob(data)
    h.request("GET", f"/v2/x/blobs/{digest}")
    h.upstream.private["y"] = set()
    assert h.request("GET", f"/v2/y/blobs/{digest}")[1] == data
    assert h.upstream.count("HEAD", "/") == 0


def test_concurrent_upstream_fetches_are_limited(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_fetches=1)
    one, two = h.upstream.add_blob(b"1" * 70000), h.upstream.add_blob(b"2" * 70000)
    h.upstream.hold_blobs = True
    d1 = h.client.get(f"http://mirror.test/v2/a/blobs/{one}")
    d2 = h.client.get(f"http://mirror.test/v2/a/blobs/{two}")
    h.pump()
    assert h.upstream.count("GET", "/blobs/") == 1  # the second waits for a slot
    h.upstream.release()
    h.pump()
    assert h.upstream.count("GET", "/blobs/") == 2
    h.upstream.release()
    h.pump()
    t = SynchronousTestCase()
    for d, want in ((d1, b"1" * 70000), (d2, b"2" * 70000)):
        body = treq.content(t.successResultOf(d))
        h.pump()
        assert t.successResultOf(body) == want


def test_metrics_count_hits_fetches_failures_and_the_store(h: Harness) -> None:
    from collections import Counter

    from regmirror.api.metrics import metrics_resource
    from regmirror.mirror.mirrors import Mirrors

    responses: Counter[int] = Counter({200: 3, 404: 1})
    h.root.putChild(b"metrics", metrics_resource(Mirrors([h.cache]), h.reaper, responses))
    data = b"m" * 3000
    digest = h.upstream.add_blob(data)
    h.request("GET", f"/v2/a/blobs/{digest}")
    h.request("GET", f"/v2/a/blobs/{digest}")
    bad = h.upstream.add_blob(b"z" * 3000)
    h.upstream.served_blobs[bad] = b"y" * 3000
    h.request("GET", f"/v2/a/blobs/{bad}")
    h.manifest("a", "1")
    h.request("GET", "/v2/a/manifests/1")
    h.request("GET", "/v2/a/manifests/1")
    response, body = h.request("GET", "/metrics")
    assert response.code == 200
    text = body.decode()
    for line in [
        'regmirror_http_responses_total{code="200"} 3.0',
        'regmirror_upstream_blob_fetches_total{upstream="up"} 2.0',
        'regmirror_blob_hits_total{upstream="up"} 1.0',
        'regmirror_manifest_hits_total{upstream="up"} 1.0',
        'regmirror_upstream_manifest_fetches_total{upstream="up"} 1.0',
        'regmirror_fetch_failures_total{reason="digest"} 1.0',
        'regmirror_upstream_breaker_open{upstream="up"} 0.0',
        "regmirror_fetches_in_flight 0.0",
    ]:
        assert line in text, line
    assert f"regmirror_store_bytes {float(h.reaper.usage)}" in text
    assert h.reaper.usage >= 3000
