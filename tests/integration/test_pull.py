"""Real clients pulling real images through regmirror."""

from __future__ import annotations

import re
from pathlib import Path

from tests.integration.conftest import MakeMirror, MakeUpstream
from tests.support.images import standard_images
from tests.support.rawhttp import connect
from tests.support.skopeo import skopeo_copy, verify_dir
from tests.support.wait import poll_until

ROLES = ("schema2", "oci", "index", "docker_list")


def test_skopeo_pulls_each_image_through_mirror_and_blobs_verify(
    make_upstream: MakeUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    upstream = make_upstream()  # private: this test stops it
    images = standard_images()
    mirror = make_mirror(upstream.url)

    for role in ROLES:
        image = images[role]
        dest = tmp_path / "through-mirror" / role
        skopeo_copy(image.ref(mirror.host), dest, all_platforms=True)
        check = verify_dir(dest, image)
        assert check.manifest == image.manifest, role
        assert check.blob_digests == {b.digest for b in image.blobs()}, role
    # Everything pulled is now in the store, verified.
    all_blobs = {b.digest: b for role in ROLES for b in images[role].blobs()}
    poll_until(
        lambda: all(mirror.has_blob(d) for d in all_blobs),
        10,
        what="every pulled blob in the mirror's store",
        describe=lambda: f"missing: {[d for d in all_blobs if not mirror.has_blob(d)]}",
    )
    for digest in all_blobs:
        assert mirror.blob_sha256(digest) == digest

    upstream.stop()

    for role in ROLES:
        image = images[role]
        dest = tmp_path / "from-cache" / role
        skopeo_copy(image.ref(mirror.host), dest, all_platforms=True)
        check = verify_dir(dest, image)
        assert check.manifest == image.manifest, role
        assert check.blob_digests == {b.digest for b in image.blobs()}, role
    # And the single-platform pull of an index (skopeo picks linux/amd64), from cache.
    dest = tmp_path / "from-cache" / "index-system"
    skopeo_copy(images["index"].ref(mirror.host), dest)
    assert verify_dir(dest, images["index"]).manifest.platform is not None
    assert not upstream.running
    # The metrics endpoint tells the same story: every blob fetched once, then hits.
    conn = connect(mirror.url)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    text = response.read().decode()
    assert response.status == 200
    name = upstream.url.split("://", 1)[1]
    fetched = re.search(rf'regmirror_upstream_blob_fetches_total{{upstream="{name}"}} (\S+)', text)
    hits = re.search(rf'regmirror_blob_hits_total{{upstream="{name}"}} (\S+)', text)
    assert fetched and float(fetched.group(1)) == len(all_blobs), text
    assert hits and float(hits.group(1)) >= len(all_blobs), text
    assert 'regmirror_fetch_failures_total{reason="digest"}' not in text
