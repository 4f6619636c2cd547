"""The distribution API as regmirror answers it, request by request, with http.client.

Most tests share one mirror (module scope) in front of the session upstream: they only
read, and each looks at its own images or blobs.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

from tests.integration.conftest import running_mirror
from tests.support.images import ACCEPT_MANIFESTS, Blob, Image
from tests.support.mirror import Mirror
from tests.support.rawhttp import Response, assert_registry_error, request
from tests.support.upstream import UpstreamRegistry

if TYPE_CHECKING:
    from tests.integration.conftest import MakeMirror, MakeUpstream

ROLES = ("schema2", "oci", "index", "docker_list")
UNKNOWN_DIGEST = "sha256:" + hashlib.sha256(os.urandom(32)).hexdigest()
WRITE_METHODS = ("PUT", "POST", "PATCH", "DELETE")


@pytest.fixture(scope="module")
def api_mirror(
    upstream: UpstreamRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mirror]:
    with running_mirror(tmp_path_factory.mktemp("api-mirror"), upstream.url) as mirror:
        yield mirror


def get_manifest(mirror: Mirror, name: str, ref: str, method: str = "GET") -> Response:
    return request(
        mirror.url, method, f"/v2/{name}/manifests/{ref}", headers={"Accept": ACCEPT_MANIFESTS}
    )


def test_base_endpoint_answers_200_with_api_version_header(api_mirror: Mirror) -> None:
    resp = request(api_mirror.url, "GET", "/v2/")
    assert resp.status == 200
    assert resp.header("Docker-Distribution-API-Version") == "registry/2.0"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("by", ["tag", "digest"])
@pytest.mark.parametrize("role", ROLES)
def test_manifest_by_tag_and_digest_has_type_digest_length_and_etag(
    api_mirror: Mirror, images: dict[str, Image], role: str, by: str, method: str
) -> None:
    image = images[role]
    ref = image.tag if by == "tag" else image.digest
    resp = request(
        api_mirror.url,
        method,
        f"/v2/{image.name}/manifests/{ref}",
        headers={"Accept": ACCEPT_MANIFESTS},
    )
    assert resp.status == 200, resp.body[:500]
    assert resp.header("Content-Type") == image.media_type
    assert resp.header("Docker-Content-Digest") == image.digest
    assert resp.header("Content-Length") == str(image.manifest.size)
    etag = resp.header("ETag")
    assert etag is not None and etag.removeprefix("W/").strip('"') == image.digest, etag
    assert resp.body == (image.manifest.data if method == "GET" else b"")


@pytest.mark.parametrize("role", ["index", "docker_list"])
def test_child_manifests_of_an_index_are_served_by_digest(
    api_mirror: Mirror, images: dict[str, Image], role: str
) -> None:
    image = images[role]
    for child in image.manifest.children:
        resp = request(
            api_mirror.url,
            "GET",
            f"/v2/{image.name}/manifests/{child.digest}",
            headers={"Accept": ACCEPT_MANIFESTS},
        )
        assert resp.status == 200
        assert resp.header("Content-Type") == child.media_type
        assert resp.header("Docker-Content-Digest") == child.digest
        assert resp.body == child.data


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_blob_get_and_head_carry_length_and_digest(
    api_mirror: Mirror, images: dict[str, Image], method: str
) -> None:
    image = images["oci"]
    blob = image.manifest.layers[0]
    resp = request(api_mirror.url, method, f"/v2/{image.name}/blobs/{blob.digest}")
    assert resp.status == 200
    assert resp.header("Content-Length") == str(blob.size)
    assert resp.header("Docker-Content-Digest") == blob.digest
    assert resp.body == (blob.data if method == "GET" else b"")


def _blob_for_range(
    cached: bool, images: dict[str, Image], fresh_blob: Callable[[int], tuple[str, Blob]]
) -> tuple[str, Blob]:
    if cached:
        image = images["schema2"]
        return image.name, image.manifest.layers[0]
    return fresh_blob(300_000)  # nobody asked for it before


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_blob_range_request_returns_206_with_content_range(
    api_mirror: Mirror,
    images: dict[str, Image],
    fresh_blob: Callable[[int], tuple[str, Blob]],
    cached: bool,
) -> None:
    name, blob = _blob_for_range(cached, images, fresh_blob)
    target = f"/v2/{name}/blobs/{blob.digest}"
    if cached:
        assert request(api_mirror.url, "GET", target).status == 200
    resp = request(api_mirror.url, "GET", target, headers={"Range": "bytes=0-9"})
    assert resp.status == 206, resp.body[:300]
    assert resp.header("Content-Range") == f"bytes 0-9/{blob.size}"
    assert resp.header("Content-Length") == "10"
    assert resp.body == blob.data[:10]
    resp = request(api_mirror.url, "GET", target, headers={"Range": "bytes=1000-1999"})
    assert resp.status == 206
    assert resp.header("Content-Range") == f"bytes 1000-1999/{blob.size}"
    assert resp.body == blob.data[1000:2000]


def test_unsatisfiable_blob_range_returns_416(api_mirror: Mirror, images: dict[str, Image]) -> None:
    image = images["schema2"]
    blob = image.manifest.layers[1]
    target = f"/v2/{image.name}/blobs/{blob.digest}"
    resp = request(api_mirror.url, "GET", target, headers={"Range": "bytes=999999999-"})
    assert resp.status == 416, resp.body[:300]
    content_range = resp.header("Content-Range")
    assert content_range in (None, f"bytes */{blob.size}")


def _write_requests(images: dict[str, Image]) -> list[tuple[str, str]]:
    image = images["schema2"]
    blob = image.manifest.layers[0]
    upload = "/v2/library/alpine/blobs/uploads/2b5ba8a0-3d35-4a1c-9f3e-000000000000"
    return [
        ("PUT", f"/v2/{image.name}/manifests/{image.tag}"),
        ("PUT", f"/v2/{image.name}/manifests/evil"),
        ("DELETE", f"/v2/{image.name}/manifests/{image.digest}"),
        ("POST", f"/v2/{image.name}/blobs/uploads/"),
        ("POST", f"/v2/{image.name}/blobs/uploads/?mount={blob.digest}&from=team/app/server"),
        ("PATCH", upload),
        ("PUT", f"{upload}?digest={blob.digest}"),
        ("DELETE", f"/v2/{image.name}/blobs/{blob.digest}"),
    ]


def test_writes_are_rejected_with_405_unsupported_and_change_nothing(
    api_mirror: Mirror, upstream: UpstreamRegistry, images: dict[str, Image]
) -> None:
    image = images["schema2"]
    writes_before = sum(upstream.count_requests(m) for m in WRITE_METHODS)
    for method, target in _write_requests(images):
        body = images["oci"].manifest.data if method in ("PUT", "PATCH") else b""
        headers = {"Content-Type": images["oci"].media_type} if "manifests" in target else {}
        resp = request(api_mirror.url, method, target, headers=headers, body=body)
        try:
            assert_registry_error(resp, 405, "UNSUPPORTED")
        except AssertionError as e:
            raise AssertionError(f"{method} {target}: {e}") from None
    resp = get_manifest(api_mirror, image.name, image.tag)
    assert resp.status == 200 and resp.header("Docker-Content-Digest") == image.digest
    assert get_manifest(api_mirror, image.name, "evil").status == 404
    assert sum(upstream.count_requests(m) for m in WRITE_METHODS) == writes_before


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_unknown_blob_is_404_blob_unknown(
    api_mirror: Mirror, images: dict[str, Image], method: str
) -> None:
    resp = request(api_mirror.url, method, f"/v2/library/alpine/blobs/{UNKNOWN_DIGEST}")
    if method == "HEAD":
        assert resp.status == 404 and resp.body == b""
    else:
        assert_registry_error(resp, 404, "BLOB_UNKNOWN")


def test_unknown_manifest_tag_is_404_manifest_unknown(api_mirror: Mirror) -> None:
    resp = get_manifest(api_mirror, "library/alpine", "no-such-tag")
    assert_registry_error(resp, 404, "MANIFEST_UNKNOWN")
    resp = get_manifest(api_mirror, "library/alpine", "no-such-tag", "HEAD")
    assert resp.status == 404
    resp = get_manifest(api_mirror, "library/alpine", UNKNOWN_DIGEST)
    assert_registry_error(resp, 404, "MANIFEST_UNKNOWN")
    # A tag of the longest valid length is still just unknown, not invalid.
    resp = get_manifest(api_mirror, "library/alpine", "a" * 128)
    assert_registry_error(resp, 404, "MANIFEST_UNKNOWN")


def test_unknown_repository_is_404(api_mirror: Mirror) -> None:
    resp = get_manifest(api_mirror, "no/such/repository", "latest")
    assert_registry_error(resp, 404, "MANIFEST_UNKNOWN", "NAME_UNKNOWN")


INVALID_NAME_TARGETS = [
    "/v2/UPPER/manifests/x",
    "/v2/a/../b/manifests/x",
    "/v2/a/./b/manifests/x",
    "/v2/a%00b/manifests/x",
    "/v2/a%2F..%2Fb/manifests/x",
    "/v2/a//b/manifests/x",
    "/v2/-a/manifests/x",
    "/v2/a_/manifests/x",
    f"/v2/{'a' * 256}/manifests/x",
    f"/v2/UPPER/blobs/{UNKNOWN_DIGEST}",
    "/v2/a/../b/tags/list",
]


@pytest.mark.parametrize("target", INVALID_NAME_TARGETS)
def test_invalid_repository_names_are_400_name_invalid(api_mirror: Mirror, target: str) -> None:
    resp = request(api_mirror.url, "GET", target, headers={"Accept": ACCEPT_MANIFESTS})
    assert_registry_error(resp, 400, "NAME_INVALID")


INVALID_DIGEST_TARGETS = [
    "/v2/library/alpine/blobs/sha256:xyz",
    "/v2/library/alpine/blobs/md5:" + "0" * 32,
    "/v2/library/alpine/blobs/sha256:" + "A" * 64,
    "/v2/library/alpine/blobs/sha256:" + "0" * 63,
    "/v2/library/alpine/blobs/not-a-digest",
    "/v2/library/alpine/manifests/sha256:xyz",
    "/v2/library/alpine/manifests/md5:" + "0" * 32,
]


@pytest.mark.parametrize("target", INVALID_DIGEST_TARGETS)
def test_invalid_digests_are_400_digest_invalid(api_mirror: Mirror, target: str) -> None:
    resp = request(api_mirror.url, "GET", target, headers={"Accept": ACCEPT_MANIFESTS})
    assert_registry_error(resp, 400, "DIGEST_INVALID")


@pytest.mark.parametrize("tag", ["a" * 129, "a" * 200, ".hidden", "-dash"])
def test_invalid_tags_are_400_tag_invalid(api_mirror: Mirror, tag: str) -> None:
    resp = get_manifest(api_mirror, "library/alpine", tag)
    assert_registry_error(resp, 400, "TAG_INVALID")


def _next_link(link: str | None) -> str | None:
    """The request target of a ``Link: <...>; rel="next"`` header."""
    if link is None:
        return None
    match = re.search(r'<([^>]+)>\s*;\s*rel="?next"?', link)
    if match is None:
        return None
    parts = urlsplit(match.group(1))
    return parts.path + (f"?{parts.query}" if parts.query else "")


def test_tags_list_returns_tags_and_paginates_with_link_header(
    api_mirror: Mirror, images: dict[str, Image]
) -> None:
    # Order is not checked: distribution 2.8 (the upstream) lists tags in directory
    # order, not the lexical order the OCI spec 1.1 asks for.
    image = images["schema2"]
    all_tags = sorted(image.tags)
    assert len(all_tags) >= 2
    resp = request(api_mirror.url, "GET", f"/v2/{image.name}/tags/list")
    assert resp.status == 200
    assert (resp.header("Content-Type") or "").startswith("application/json")
    body = resp.json()
    assert body["name"] == image.name
    assert sorted(body["tags"]) == all_tags

    seen: list[str] = []
    target: str | None = f"/v2/{image.name}/tags/list?n=1"
    pages = 0
    while target is not None and pages < 10:
        resp = request(api_mirror.url, "GET", target)
        assert resp.status == 200, resp.body[:300]
        page = resp.json()
        assert page["name"] == image.name
        assert len(page["tags"]) <= 1, page
        if pages == 0:
            assert len(page["tags"]) == 1, page
            assert _next_link(resp.header("Link")) is not None, resp.header("Link")
        seen += page["tags"]
        pages += 1
        target = _next_link(resp.header("Link"))
        if not page["tags"]:
            break
    assert len(seen) == len(set(seen)), f"a tag appeared on two pages: {seen}"
    assert sorted(seen) == all_tags


def test_catalog_lists_repositories_fetched_so_far(
    mirror: Mirror, images: dict[str, Image]
) -> None:
    resp = request(mirror.url, "GET", "/v2/_catalog")
    assert resp.status == 200
    assert resp.json() == {"repositories": []}
    fetched = [images["schema2"], images["oci"]]
    for image in fetched:
        assert get_manifest(mirror, image.name, image.tag).status == 200
    resp = request(mirror.url, "GET", "/v2/_catalog")
    assert resp.status == 200
    assert resp.json() == {"repositories": sorted(i.name for i in fetched)}


def test_tags_list_is_served_from_cache_when_upstream_is_down(
    make_upstream: MakeUpstream, make_mirror: MakeMirror, images: dict[str, Image]
) -> None:
    upstream = make_upstream()
    mirror = make_mirror(upstream.url, tag_freshness="0s")
    image = images["schema2"]
    resp = request(mirror.url, "GET", f"/v2/{image.name}/tags/list")
    assert resp.status == 200
    first = resp.json()
    assert first["name"] == image.name and sorted(first["tags"]) == sorted(image.tags)
    upstream.stop()
    resp = request(mirror.url, "GET", f"/v2/{image.name}/tags/list")
    assert resp.status == 200, resp.body[:300]
    stale = resp.json()
    assert stale["name"] == first["name"]
    assert sorted(stale["tags"]) == sorted(first["tags"])  # order: see the test above
