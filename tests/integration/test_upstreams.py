"""Several upstreams in one mirror, and upstreams that fail: routing by ``?ns=``, by path
prefix (name or alias) and by default; repositories kept apart per upstream; a real
client configured with a ``registries.conf`` mirror; the cache served with every
upstream gone; a black-holed upstream, the circuit breaker; 429 from upstream.

Two distribution registries play ``A`` (the default, ``proxy.remoteurl``) and ``B``
(configured as ``ghcr.io``, alias ``ghcr``). Both hold ``owner/img:1.0`` with different
content, so every answer tells which upstream it came from.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.blackhole import BlackHole
from tests.support.httpproxy import ReverseProxy
from tests.support.images import ACCEPT_MANIFESTS, Image, oci_image, push_images
from tests.support.mirror import Mirror
from tests.support.ports import free_port
from tests.support.rawhttp import Response, assert_registry_error, request
from tests.support.registriesconf import RegistryEntry, write_registries_conf
from tests.support.skopeo import skopeo_copy, verify_dir
from tests.support.upstream import UpstreamRegistry

if TYPE_CHECKING:
    from tests.integration.conftest import MakeMirror, MakeUpstream

GHCR = "ghcr.io"
GHCR_ALIAS = "ghcr"


@dataclass(frozen=True)
class Pair:
    """Upstream ``a`` (default) and ``b`` (``ghcr.io``) and what was pushed to each."""

    a: UpstreamRegistry
    b: UpstreamRegistry
    a_img: Image  # owner/img:1.0 on A
    b_img: Image  # owner/img:1.0 on B, different content
    a_only: Image  # owner/img:a-only on A
    b_only: Image  # owner/img:b-only on B


def _images() -> tuple[Image, Image, Image, Image]:
    a_img = oci_image("owner/img", "1.0", seed="upstream A owner/img", layer_sizes=(60_000,))
    b_img = oci_image("owner/img", "1.0", seed="upstream B owner/img", layer_sizes=(70_000,))
    a_only = oci_image("owner/img", "a-only", seed="A only", layer_sizes=(20_000,))
    b_only = oci_image("owner/img", "b-only", seed="B only", layer_sizes=(30_000,))
    assert a_img.digest != b_img.digest
    return a_img, b_img, a_only, b_only


def _pair(a: UpstreamRegistry, b: UpstreamRegistry) -> Pair:
    a_img, b_img, a_only, b_only = _images()
    push_images(a.url, [a_img, a_only])
    push_images(b.url, [b_img, b_only])
    return Pair(a, b, a_img, b_img, a_only, b_only)


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, integration_tools: dict[str, str]
) -> Iterator[Pair]:
    """Two upstreams shared by this module's tests (which must not stop them)."""
    a = UpstreamRegistry(tmp_path_factory.mktemp("upstream-a"))
    b = UpstreamRegistry(tmp_path_factory.mktemp("upstream-b"))
    try:
        a.start()
        b.start()
        yield _pair(a, b)
    finally:
        b.stop()
        a.stop()


def two_upstreams_config(b_url: str, **ghcr: Any) -> dict[str, Any]:
    return {
        "regmirror": {
            "upstreams": [{"name": GHCR, "url": b_url, "aliases": [GHCR_ALIAS], **ghcr}],
        }
    }


def get(mirror: Mirror, target: str, method: str = "GET") -> Response:
    return request(mirror.url, method, target, headers={"Accept": ACCEPT_MANIFESTS})


def log_lines_with(mirror: Mirror, *words: str) -> list[str]:
    """Lines of the mirror's log that contain every one of ``words`` (any case)."""
    return [
        line
        for line in mirror.log_text().splitlines()
        if all(w.lower() in line.lower() for w in words)
    ]


def manifest_digest(mirror: Mirror, target: str) -> str | None:
    resp = get(mirror, target)
    assert resp.status == 200, f"GET {target}: {resp.status} {resp.body[:300]!r}"
    return resp.header("Docker-Content-Digest")


# --- routing -------------------------------------------------------------------------


def test_requests_are_routed_by_ns_by_path_prefix_and_by_default(
    pair: Pair, make_mirror: MakeMirror
) -> None:
    mirror = make_mirror(pair.a.url, extra=two_upstreams_config(pair.b.url))
    path = "/v2/owner/img/manifests/1.0"
    expected = {
        path: pair.a_img.digest,  # the default: proxy.remoteurl
        f"{path}?ns={pair.a.host}": pair.a_img.digest,  # ns naming the default
        f"{path}?ns={GHCR}": pair.b_img.digest,  # containerd's hosts.toml mirror
        f"/v2/{GHCR}/owner/img/manifests/1.0": pair.b_img.digest,  # name as prefix
        f"/v2/{GHCR_ALIAS}/owner/img/manifests/1.0": pair.b_img.digest,  # alias (podman)
    }
    for round_ in ("miss", "cached"):
        got = {target: manifest_digest(mirror, target) for target in expected}
        assert got == expected, round_

    # Blobs come from the upstream the route names.
    for layer in pair.b_img.manifest.layers:
        for target in (
            f"/v2/{GHCR}/owner/img/blobs/{layer.digest}",
            f"/v2/owner/img/blobs/{layer.digest}?ns={GHCR}",
        ):
            resp = request(mirror.url, "GET", target)
            assert (resp.status, resp.body) == (200, layer.data), target
    layer = pair.a_img.manifest.layers[0]
    resp = request(mirror.url, "GET", f"/v2/owner/img/blobs/{layer.digest}")
    assert (resp.status, resp.body) == (200, layer.data)

    # The same repository name on two upstreams is two repositories.
    resp = get(mirror, f"/v2/{GHCR_ALIAS}/owner/img/manifests/b-only")
    assert resp.status == 200 and resp.header("Docker-Content-Digest") == pair.b_only.digest
    assert get(mirror, f"/v2/{GHCR_ALIAS}/owner/img/manifests/a-only").status == 404
    assert get(mirror, "/v2/owner/img/manifests/b-only").status == 404
    a_tags = get(mirror, "/v2/owner/img/tags/list").json()["tags"]
    b_tags = get(mirror, f"/v2/{GHCR}/owner/img/tags/list").json()["tags"]
    assert sorted(a_tags) == ["1.0", "a-only"]
    assert sorted(b_tags) == ["1.0", "b-only"]
    assert (mirror.root / "repositories" / GHCR / "owner" / "img").is_dir()
    assert (mirror.root / "repositories" / pair.a.host / "owner" / "img").is_dir()

    # Each upstream was asked for the repository under its own name, never a prefix.
    pair.b.wait_for_requests("GET", "/v2/owner/img/manifests/1.0")
    assert pair.a.count_requests(None, "/v2/ghcr") == 0
    assert pair.b.count_requests(None, "/v2/ghcr") == 0


def test_an_ns_naming_no_upstream_is_404_name_unknown(pair: Pair, make_mirror: MakeMirror) -> None:
    mirror = make_mirror(pair.a.url, extra=two_upstreams_config(pair.b.url))
    for target in (
        "/v2/owner/img/manifests/1.0?ns=quay.io",
        f"/v2/owner/img/blobs/{pair.a_img.manifest.layers[0].digest}?ns=quay.io",
        "/v2/owner/img/tags/list?ns=quay.io",
    ):
        error = assert_registry_error(get(mirror, target), 404, "NAME_UNKNOWN")
        assert "quay.io" in error["message"], error  # not the default's answer
    # A known ns next to it is served.
    assert get(mirror, f"/v2/owner/img/manifests/1.0?ns={GHCR}").status == 200
    # One warning for the name, with the fix; every refusal counted.
    warnings = log_lines_with(mirror, "ns=quay.io", "names no upstream")
    assert len(warnings) == 1 and "aliases" in warnings[0], warnings
    metrics = request(mirror.url, "GET", "/metrics").body.decode()
    assert 'regmirror_ns_unmatched_total{outcome="refused"} 3.0' in metrics, metrics


def test_skopeo_pulls_through_registries_conf_mirrors_of_two_registries(
    pair: Pair, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """podman/CRI-O/skopeo configured as the README says: one ``[[registry]]`` per
    upstream registry, whose mirror location is regmirror with the upstream's alias (or
    nothing, for the default). The registries' own locations lead nowhere, so a
    successful pull can only have come through regmirror."""
    mirror = make_mirror(pair.a.url, extra=two_upstreams_config(pair.b.url))
    dead = f"127.0.0.1:{free_port()}"
    conf = write_registries_conf(
        tmp_path / "registries.conf",
        [
            RegistryEntry(prefix=GHCR, location=dead, mirrors=(f"{mirror.host}/{GHCR_ALIAS}",)),
            RegistryEntry(prefix="registry-a.test", location=dead, mirrors=(mirror.host,)),
        ],
    )
    skopeo_copy(f"{GHCR}/owner/img:1.0", tmp_path / "b", registries_conf=conf)
    verify_dir(tmp_path / "b", pair.b_img)
    skopeo_copy("registry-a.test/owner/img:1.0", tmp_path / "a", registries_conf=conf)
    verify_dir(tmp_path / "a", pair.a_img)
    log = mirror.log_text()
    assert re.search(rf'"GET /v2/{GHCR_ALIAS}/owner/img/manifests/1\.0" 200', log), log[-3000:]
    assert re.search(r'"GET /v2/owner/img/manifests/1\.0" 200', log), log[-3000:]


# --- failing upstreams ---------------------------------------------------------------


def test_the_cache_is_served_with_every_upstream_unreachable(
    make_upstream: MakeUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    p = _pair(make_upstream(push_standard_images=False), make_upstream(push_standard_images=False))
    mirror = make_mirror(p.a.url, tag_freshness="0s", extra=two_upstreams_config(p.b.url))
    skopeo_copy(p.a_img.ref(mirror.host), tmp_path / "a1")
    skopeo_copy(f"{mirror.host}/{GHCR}/owner/img:1.0", tmp_path / "b1")
    p.a.stop()
    p.b.stop()
    mirror.restart()  # starts with no upstream at all: nothing is asked at start-up

    skopeo_copy(p.a_img.ref(mirror.host), tmp_path / "a2")
    verify_dir(tmp_path / "a2", p.a_img)
    skopeo_copy(f"{mirror.host}/{GHCR_ALIAS}/owner/img:1.0", tmp_path / "b2")
    verify_dir(tmp_path / "b2", p.b_img)
    resp = get(mirror, f"/v2/owner/img/manifests/1.0?ns={GHCR}")
    assert resp.header("Docker-Content-Digest") == p.b_img.digest
    # What was never cached is unavailable, and says so at once.
    for target in ("/v2/owner/img/manifests/a-only", f"/v2/{GHCR}/owner/img/manifests/b-only"):
        started = time.monotonic()
        assert_registry_error(get(mirror, target), 503, "UNAVAILABLE")
        assert time.monotonic() - started < 3


def test_a_black_holed_upstream_fails_in_time_then_the_breaker_answers_at_once(
    upstream: UpstreamRegistry, images: dict[str, Image], make_mirror: MakeMirror, tmp_path: Path
) -> None:
    failures = 2
    with BlackHole() as hole:
        mirror = make_mirror(
            upstream.url,
            extra={
                "regmirror": {
                    "upstreams": [{"name": "hole.test", "url": hole.url}],
                    "upstream_connect_timeout": "1s",
                    "upstream_read_timeout": "1s",
                    "upstream_failures": failures,
                    "upstream_cooldown": "60s",
                }
            },
        )
        target = "/v2/hole.test/owner/img/manifests/1.0"
        slow: list[float] = []
        fast: float | None = None
        for _ in range(failures + 2):
            started = time.monotonic()
            resp = get(mirror, target)
            elapsed = time.monotonic() - started
            assert_registry_error(resp, 503, "UNAVAILABLE")
            assert elapsed < 3, f"a miss took {elapsed:.2f}s with a 1s read timeout"
            if elapsed < 0.2:
                fast = elapsed
                break
            slow.append(elapsed)
        assert fast is not None, f"the breaker never opened: every miss took {slow}"
        assert 1 <= len(slow) <= failures, slow
        assert min(slow) >= 0.9, f"gave up before the read timeout: {slow}"
        assert hole.connections >= 1
        connections = hole.connections
        for i in range(3):  # open: no new attempt, answered at once
            started = time.monotonic()
            resp = get(mirror, f"/v2/hole.test/owner/other/manifests/{i}")
            assert_registry_error(resp, 503, "UNAVAILABLE")
            assert time.monotonic() - started < 0.2
        assert hole.connections == connections
        assert log_lines_with(mirror, "breaker", "hole.test", "open"), mirror.log_tail()
        # The breaker is per upstream: the default one still serves.
        image = images["schema2"]
        skopeo_copy(image.ref(mirror.host), tmp_path / "d")
        verify_dir(tmp_path / "d", image)


def test_a_black_holed_upstream_fails_a_miss_with_503_in_time_on_the_default_config(
    make_mirror: MakeMirror,
) -> None:
    # No timeouts configured: the 15 s response-header timeout applies, well before
    # containerd gives up on a registry (~30 s) and the 60 s read timeout.
    with BlackHole() as hole:
        mirror = make_mirror(hole.url)
        started = time.monotonic()
        resp = get(mirror, "/v2/owner/img/manifests/1.0")
        elapsed = time.monotonic() - started
        assert_registry_error(resp, 503, "UNAVAILABLE")
        assert hole.connections >= 1
        assert 10 < elapsed < 20, f"a miss against a silent upstream took {elapsed:.1f} s"


def test_a_rate_limited_upstream_429_is_passed_on_unless_cached(
    upstream: UpstreamRegistry, images: dict[str, Image], make_mirror: MakeMirror, tmp_path: Path
) -> None:
    ratelimit = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "97;w=21600"}
    with ReverseProxy(upstream.url, response_headers=ratelimit) as proxy:
        mirror = make_mirror(proxy.url, tag_freshness="0s")
        cached, uncached = images["schema2"], images["oci"]
        skopeo_copy(cached.ref(mirror.host), tmp_path / "d1")
        proxy.rate_limit(retry_after=17)

        # Cached: the tag's revalidation is refused, the cached manifest is served.
        resp = get(mirror, f"/v2/{cached.name}/manifests/{cached.tag}")
        assert resp.status == 200
        assert resp.header("Docker-Content-Digest") == cached.digest
        skopeo_copy(cached.ref(mirror.host), tmp_path / "d2")
        verify_dir(tmp_path / "d2", cached)
        assert proxy.count_requests(rate_limited=True) >= 1  # it did ask

        # Not cached: the client gets the 429 and when to come back.
        for target in (
            f"/v2/{uncached.name}/manifests/{uncached.tag}",
            f"/v2/{uncached.name}/blobs/{uncached.manifest.layers[0].digest}",
        ):
            resp = get(mirror, target)
            assert_registry_error(resp, 429, "TOOMANYREQUESTS")
            assert resp.header("Retry-After") == "17", target

        proxy.pass_through()
        assert get(mirror, f"/v2/{uncached.name}/manifests/{uncached.tag}").status == 200
    # Docker Hub's remaining pull count is recorded.
    assert log_lines_with(mirror, "rate", "limit", "97"), mirror.log_tail()
