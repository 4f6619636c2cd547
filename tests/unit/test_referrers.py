"""OCI 1.1 referrers through the mirror, without sockets: the production site in
memory, its upstream an in-memory registry with or without the referrers API
(regmirror.testing.FakeRegistry), time a Clock."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from regmirror.domain.digest import Digest
from regmirror.domain.kinds import Kind
from regmirror.domain.referrers import fallback_tag, index_descriptors
from regmirror.mirror.freshness import LocalTagFreshness
from regmirror.mirror.referrers import Referrers
from regmirror.storage.store import Store
from regmirror.testing import digest_of
from tests.unit.test_cache_web import Harness, error_code, header

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"
SIG = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"
T = SynchronousTestCase()


def artifact(h: Harness, name: str, subject: str, artifact_type: str, n: int) -> dict[str, Any]:
    """Push an artifact manifest with ``subject`` upstream; its descriptor."""
    data = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "artifactType": artifact_type,
            "config": {"mediaType": EMPTY, "digest": digest_of(b"{}"), "size": 2},
            "layers": [],
            "subject": {"mediaType": MANIFEST, "digest": subject, "size": 10},
            "annotations": {"n": str(n)},
        }
    ).encode()
    digest = h.upstream.add_manifest(name, None, data, MANIFEST)
    return {
        "mediaType": MANIFEST,
        "digest": digest,
        "size": len(data),
        "artifactType": artifact_type,
        "annotations": {"n": str(n)},
    }


def listed(body: bytes) -> list[dict[str, Any]]:
    index = json.loads(body)
    assert index["schemaVersion"] == 2 and index["mediaType"] == INDEX
    manifests: list[dict[str, Any]] = index["manifests"]
    return manifests


def referrers_requests(h: Harness) -> int:
    return h.upstream.count("GET", "/referrers/")


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


@pytest.fixture
def subject(h: Harness) -> str:
    return h.manifest("app", "1.0")


def test_referrers_come_from_the_upstream_api_as_an_oci_index(h: Harness, subject: str) -> None:
    h.upstream.referrers_api = True
    sig, sbom = artifact(h, "app", subject, SIG, 1), artifact(h, "app", subject, SBOM, 2)
    h.upstream.referrers[("app", subject)] = [sig, sbom]

    response, body = h.request("GET", f"/v2/app/referrers/{subject}")

    assert response.code == 200
    assert header(response, "content-type") == INDEX
    assert header(response, "oci-filters-applied") is None
    assert listed(body) == [sig, sbom]
    assert h.upstream.count("GET", f"/manifests/{fallback_tag(Digest.parse(subject))}") == 0


def test_without_the_api_the_fallback_tag_index_is_listed(h: Harness, subject: str) -> None:
    sig = artifact(h, "app", subject, SIG, 1)
    fallback = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [sig]}).encode()
    h.upstream.add_manifest("app", fallback_tag(Digest.parse(subject)), fallback, INDEX)

    response, body = h.request("GET", f"/v2/app/referrers/{subject}")

    assert response.code == 200 and header(response, "content-type") == INDEX
    assert listed(body) == [sig]
    assert referrers_requests(h) == 1  # the API was asked first (a plain-text 404)


@pytest.mark.parametrize("api", [True, False])
def test_an_unknown_subject_gets_an_empty_index_200(h: Harness, api: bool) -> None:
    h.upstream.referrers_api = api
    unknown = digest_of(b"never pushed")

    response, body = h.request("GET", f"/v2/app/referrers/{unknown}")

    assert response.code == 200 and header(response, "content-type") == INDEX
    assert listed(body) == []


@pytest.mark.parametrize(
    "reference", ["sha256:abc", "md5:" + "0" * 32, "latest", "sha256:" + "A" * 64]
)
def test_a_bad_digest_is_digest_invalid_before_any_upstream_request(
    h: Harness, reference: str
) -> None:
    response, body = h.request("GET", f"/v2/app/referrers/{reference}")

    assert response.code == 400 and error_code(body) == "DIGEST_INVALID"
    assert sum(h.upstream.requests.values()) == 0
    assert not (h.store.repositories / "up").exists()


def test_pushing_to_the_referrers_endpoint_is_405(h: Harness, subject: str) -> None:
    for method in ("PUT", "DELETE"):
        response, body = h.request(method, f"/v2/app/referrers/{subject}")
        assert response.code == 405 and error_code(body) == "UNSUPPORTED"
        assert header(response, "allow") == "GET, HEAD"


@pytest.mark.parametrize("api", [True, False])
def test_the_mirror_filters_by_artifact_type_on_the_full_cached_list(
    h: Harness, subject: str, api: bool
) -> None:
    h.upstream.referrers_api = api
    sig, sbom = artifact(h, "app", subject, SIG, 1), artifact(h, "app", subject, SBOM, 2)
    h.upstream.referrers[("app", subject)] = [sig, sbom]
    fallback = json.dumps({"schemaVersion": 2, "manifests": [sig, sbom]}).encode()
    h.upstream.add_manifest("app", fallback_tag(Digest.parse(subject)), fallback, INDEX)

    filtered, body = h.request("GET", f"/v2/app/referrers/{subject}?artifactType={SBOM}")
    assert filtered.code == 200
    assert header(filtered, "oci-filters-applied") == "artifactType"
    assert listed(body) == [sbom]  # an unencoded "+" still matches

    both, body = h.request(
        "GET", f"/v2/app/referrers/{subject}?artifactType={SIG}&artifactType=application%2Fx"
    )
    assert header(both, "oci-filters-applied") == "artifactType" and listed(body) == [sig]
    _, body = h.request("GET", f"/v2/app/referrers/{subject}")
    assert listed(body) == [sig, sbom]
    # One upstream answer (unfiltered) served all three within the window.
    assert referrers_requests(h) == 1
    assert not any(b"artifactType" in p.encode() for _, p in h.upstream.requests)


def test_one_upstream_request_per_freshness_window(h: Harness, subject: str) -> None:
    h.upstream.referrers_api = True
    sig = artifact(h, "app", subject, SIG, 1)
    h.upstream.referrers[("app", subject)] = [sig]
    for _ in range(5):
        assert listed(h.request("GET", f"/v2/app/referrers/{subject}")[1]) == [sig]
    assert referrers_requests(h) == 1

    sbom = artifact(h, "app", subject, SBOM, 2)  # a new referrer appears upstream
    h.upstream.referrers[("app", subject)] = [sig, sbom]
    h.clock.advance(29)
    assert listed(h.request("GET", f"/v2/app/referrers/{subject}")[1]) == [sig]
    h.clock.advance(2)
    assert listed(h.request("GET", f"/v2/app/referrers/{subject}")[1]) == [sig, sbom]
    assert referrers_requests(h) == 2
    # Counted in /metrics: 5 answers from the cache, 2 lists asked of the upstream.
    from regmirror.api.metrics import metrics_resource
    from regmirror.mirror.mirrors import Mirrors

    h.root.putChild(b"metrics", metrics_resource(Mirrors([h.cache]), h.reaper, Counter()))
    text = h.request("GET", "/metrics")[1].decode()
    assert 'regmirror_referrers_hits_total{upstream="up"} 5.0' in text, text
    assert 'regmirror_upstream_referrers_checks_total{upstream="up"} 2.0' in text
    assert 'regmirror_referrers_stale_served_total{upstream="up"} 0.0' in text


class HeldRemote:
    """The upstream side of ``Referrers``, each referrers answer held until released."""

    name = "up"

    def __init__(self) -> None:
        self.asked: list[Deferred[tuple[dict[str, Any], ...]]] = []

    async def referrers(self, repository: str, subject: Digest) -> tuple[dict[str, Any], ...]:
        d: Deferred[tuple[dict[str, Any], ...]] = Deferred()
        self.asked.append(d)
        return await d


def test_concurrent_requests_share_one_upstream_request(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare()
    clock = Clock()
    remote = HeldRemote()
    room = Referrers(clock, store, remote, LocalTagFreshness(clock), 30.0, Counter())  # type: ignore[arg-type]
    subject = Digest.of(b"subject")
    waiting = [Deferred.fromCoroutine(room.referrers("app", subject)) for _ in range(4)]
    waiting[1].cancel()  # a client that went away cancels nothing shared
    assert len(remote.asked) == 1
    sig = {"mediaType": MANIFEST, "digest": digest_of(b"sig"), "size": 3}
    remote.asked[0].callback((sig,))
    for d in (waiting[0], *waiting[2:]):
        assert T.successResultOf(d).descriptors == (sig,)
    T.failureResultOf(waiting[1])
    assert T.successResultOf(Deferred.fromCoroutine(room.referrers("app", subject))).source == "api"
    assert len(remote.asked) == 1


def test_head_has_the_headers_of_get_and_no_body(h: Harness, subject: str) -> None:
    _, body = h.request("GET", f"/v2/app/referrers/{subject}")
    head, nothing = h.request("HEAD", f"/v2/app/referrers/{subject}")
    assert head.code == 200 and nothing == b""
    assert header(head, "content-type") == INDEX
    assert header(head, "content-length") == str(len(body))


@pytest.mark.parametrize("api", [True, False])
def test_served_stale_when_the_upstream_is_down(h: Harness, subject: str, api: bool) -> None:
    h.upstream.referrers_api = api
    sig = artifact(h, "app", subject, SIG, 1)
    h.upstream.referrers[("app", subject)] = [sig]
    fallback = json.dumps({"schemaVersion": 2, "manifests": [sig]}).encode()
    h.upstream.add_manifest("app", fallback_tag(Digest.parse(subject)), fallback, INDEX)
    assert listed(h.request("GET", f"/v2/app/referrers/{subject}")[1]) == [sig]

    h.upstream.down = True
    h.clock.advance(31)
    asked = sum(h.upstream.requests.values())
    for _ in range(3):
        response, body = h.request("GET", f"/v2/app/referrers/{subject}")
        assert response.code == 200 and listed(body) == [sig]
    # Stale counts as checked: one upstream attempt for the window, not one per client.
    assert sum(h.upstream.requests.values()) == asked + 1
    assert h.cache.stats["referrers_stale"] == 1


def test_a_restarted_mirror_serves_the_stored_list_with_the_upstream_down(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path)
    subject = h.manifest("app", "1.0")
    h.upstream.referrers_api = True
    sig = artifact(h, "app", subject, SIG, 1)
    h.upstream.referrers[("app", subject)] = [sig]
    assert listed(h.request("GET", f"/v2/app/referrers/{subject}")[1]) == [sig]

    again = Harness(tmp_path)  # a new process on the same store
    again.upstream.down = True
    response, body = again.request("GET", f"/v2/app/referrers/{subject}")
    assert response.code == 200 and listed(body) == [sig]


def test_never_listed_with_the_upstream_down_is_503(h: Harness, subject: str) -> None:
    h.upstream.down = True
    response, body = h.request("GET", f"/v2/app/referrers/{subject}")
    assert response.code == 503 and error_code(body) == "UNAVAILABLE"


def test_an_empty_list_is_kept_in_memory_only(h: Harness, subject: str) -> None:
    h.upstream.referrers_api = True
    h.request("GET", f"/v2/app/referrers/{subject}")
    assert h.store.read_referrers("up", "app", Digest.parse(subject)) is None
    h.upstream.referrers[("app", subject)] = [artifact(h, "app", subject, SIG, 1)]
    h.clock.advance(31)
    h.request("GET", f"/v2/app/referrers/{subject}")
    assert h.store.read_referrers("up", "app", Digest.parse(subject)) is not None


def test_a_private_upstreams_list_is_kept_per_repository(tmp_path: Path) -> None:
    h = Harness(tmp_path, password="secret")
    subject = h.manifest("team/a", "1.0")
    h.upstream.manifests[("team/b", subject)] = h.upstream.manifests[("team/a", subject)]
    h.upstream.referrers_api = True
    sig = artifact(h, "team/a", subject, SIG, 1)
    h.upstream.referrers[("team/a", subject)] = [sig]

    assert listed(h.request("GET", f"/v2/team/a/referrers/{subject}")[1]) == [sig]
    # Another repository is asked upstream for itself, and gets its own answer.
    assert listed(h.request("GET", f"/v2/team/b/referrers/{subject}")[1]) == []
    assert h.upstream.count("GET", f"/v2/team/b/referrers/{subject}") == 1


def test_the_stored_list_goes_with_its_subject_manifest(h: Harness, subject: str) -> None:
    h.upstream.referrers_api = True
    sig = artifact(h, "app", subject, SIG, 1)
    h.upstream.referrers[("app", subject)] = [sig]
    h.request("GET", f"/v2/app/manifests/{subject}")
    h.request("GET", f"/v2/app/referrers/{subject}")
    digest = Digest.parse(subject)
    assert h.store.read_referrers("up", "app", digest) is not None

    h.store.remove([digest])  # what the reaper does, then it tells the cache
    h.cache.forget(Kind.MANIFEST, digest)
    assert h.store.read_referrers("up", "app", digest) is None
    h.upstream.referrers[("app", subject)] = []
    assert listed(h.request("GET", f"/v2/app/referrers/{subject}")[1]) == []  # asked again


def test_an_upstream_list_with_bad_entries_lists_only_the_good_ones() -> None:
    good = {"mediaType": MANIFEST, "digest": digest_of(b"x"), "size": 1}
    data = json.dumps(
        {"manifests": [good, {"mediaType": MANIFEST, "digest": "sha256:zz"}, "x", {"a": 1}]}
    ).encode()
    assert index_descriptors(data) == (good,)
    assert index_descriptors(b"not json") is None
    assert index_descriptors(b'{"manifests": {}}') is None
