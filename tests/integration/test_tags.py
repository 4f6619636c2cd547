"""Tags are revalidated against upstream; digests are trusted; stale beats nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.support.images import ACCEPT_MANIFESTS, Image, docker_image, oci_image, push_image
from tests.support.mirror import Mirror
from tests.support.rawhttp import Response, assert_registry_error, request

if TYPE_CHECKING:
    from tests.integration.conftest import MakeMirror, MakeUpstream


def get_manifest(
    mirror: Mirror, image: Image, ref: str | None = None, method: str = "GET"
) -> Response:
    return request(
        mirror.url,
        method,
        f"/v2/{image.name}/manifests/{ref or image.tag}",
        headers={"Accept": ACCEPT_MANIFESTS},
    )


def _two_versions() -> tuple[Image, Image]:
    old = docker_image("rev/app", "latest", seed="rev/app v1", layer_sizes=(100_000,))
    new = oci_image("rev/app", "latest", seed="rev/app v2", layer_sizes=(120_000,))
    assert old.digest != new.digest
    return old, new


def test_tag_revalidation_sees_a_new_manifest_pushed_upstream(
    make_upstream: MakeUpstream, make_mirror: MakeMirror
) -> None:
    upstream = make_upstream(push_standard_images=False)
    mirror = make_mirror(upstream.url, tag_freshness="0s")
    old, new = _two_versions()

    push_image(upstream.url, old)
    resp = get_manifest(mirror, old)
    assert resp.status == 200
    assert resp.header("Docker-Content-Digest") == old.digest
    assert resp.body == old.manifest.data

    push_image(upstream.url, new)  # same tag, new manifest
    resp = get_manifest(mirror, new)
    assert resp.status == 200
    assert resp.header("Docker-Content-Digest") == new.digest
    assert resp.header("Content-Type") == new.media_type
    assert resp.body == new.manifest.data
    head = get_manifest(mirror, new, method="HEAD")
    assert head.status == 200 and head.header("Docker-Content-Digest") == new.digest
    # The old manifest is still there by digest: digests are immutable.
    resp = get_manifest(mirror, old, old.digest)
    assert resp.status == 200 and resp.body == old.manifest.data
    for blob in new.blobs():
        resp = request(mirror.url, "GET", f"/v2/{new.name}/blobs/{blob.digest}")
        assert resp.status == 200 and resp.body == blob.data


def test_cached_tag_is_served_stale_when_upstream_is_down(
    make_upstream: MakeUpstream, make_mirror: MakeMirror
) -> None:
    upstream = make_upstream(push_standard_images=False)
    mirror = make_mirror(upstream.url, tag_freshness="0s")
    old, _ = _two_versions()
    push_image(upstream.url, old)
    assert get_manifest(mirror, old).header("Docker-Content-Digest") == old.digest

    upstream.stop()

    for method in ("GET", "HEAD"):
        resp = get_manifest(mirror, old, method=method)
        assert resp.status == 200, f"{method}: {resp.status} {resp.body[:300]!r}"
        assert resp.header("Docker-Content-Digest") == old.digest
        assert resp.header("Content-Type") == old.media_type
        assert resp.body == (old.manifest.data if method == "GET" else b"")
    resp = get_manifest(mirror, old, old.digest)
    assert resp.status == 200 and resp.body == old.manifest.data


def test_uncached_tag_with_upstream_down_is_503(
    make_upstream: MakeUpstream, make_mirror: MakeMirror
) -> None:
    upstream = make_upstream(push_standard_images=False)
    mirror = make_mirror(upstream.url, tag_freshness="0s")
    old, _ = _two_versions()
    push_image(upstream.url, old)  # exists upstream, but the mirror never saw it
    upstream.stop()

    resp = get_manifest(mirror, old)
    assert_registry_error(resp, 503)
    assert get_manifest(mirror, old, method="HEAD").status == 503
