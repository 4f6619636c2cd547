"""Prefetch policies for real: regmirror started by twistd with a 1 s policy interval,
Debian's docker-registry upstream behind a CountingProxy (every upstream request
counted as it is sent), then skopeo pulling from the cache with the upstream stopped."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support.images import (
    ACCEPT_MANIFESTS,
    OCI_MANIFEST,
    Blob,
    Image,
    Manifest,
    make_layer,
    multi_platform_image,
    oci_image,
    push_image,
    sha256_digest,
)
from tests.support.mirror import Mirror
from tests.support.proxy import CountingProxy
from tests.support.rawhttp import request
from tests.support.skopeo import skopeo_copy, verify_dir
from tests.support.wait import poll_until

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.integration.conftest import MakeMirror, MakeUpstream

SIZES = (200_000, 50_000)
POLICY = {
    "name": "apps",
    "repositories": ["pf/app", "pf/multi", "pulled/*"],
    "tags": ["1.*", "latest"],
    "exclude": ["*-rc*"],
    "interval": "1s",
    "platforms": ["linux/amd64"],
}


def with_new_layer(image: Image, seed: str) -> Image:
    """``image`` with one more layer: a new digest under the same tag, sharing the
    config and the other layers."""
    old = image.manifest
    assert old.config is not None
    layer, _ = make_layer(seed, 30_000)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": old.config.descriptor(),
        "layers": [b.descriptor() for b in (*old.layers, layer)],
    }
    data = json.dumps(doc, indent=3).encode()
    manifest = Manifest(
        OCI_MANIFEST, data, sha256_digest(data), config=old.config, layers=(*old.layers, layer)
    )
    return Image(image.name, image.tag, manifest)


def metric(mirror: Mirror, name: str, labels: str) -> float:
    text = request(mirror.url, "GET", "/metrics").body.decode()
    found = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def runs(mirror: Mirror) -> float:
    return sum(
        metric(mirror, "regmirror_prefetch_runs_total", f'outcome="{o}",policy="apps"')
        for o in ("ok", "failed", "paused", "error")
    )


def wait_runs(mirror: Mirror, more: int) -> None:
    """Until ``more`` runs have ended after now."""
    start = runs(mirror)
    poll_until(lambda: runs(mirror) >= start + more, 30, what=f"{more} more prefetch runs",
               describe=lambda: mirror.log_tail(30))  # fmt: skip


def blob_gets(proxy: CountingProxy, blobs: Iterator[Blob] | list[Blob]) -> dict[str, int]:
    return {b.digest: proxy.count_requests("GET", f"/blobs/{b.digest}") for b in blobs}


def test_a_policy_keeps_matching_tags_warm_and_fetches_only_what_changed(
    make_upstream: MakeUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    upstream = make_upstream(push_standard_images=False)  # private: this test stops it
    app10 = oci_image("pf/app", "1.0", layer_sizes=SIZES)
    app11 = oci_image("pf/app", "1.1", layer_sizes=SIZES)
    rc = oci_image("pf/app", "1.2-rc1", layer_sizes=SIZES)
    other = oci_image("pf/app", "2.0", layer_sizes=SIZES)
    multi = multi_platform_image("pf/multi", "latest", layer_sizes=SIZES)
    pulled = oci_image("pulled/thing", "latest", layer_sizes=SIZES)
    never = oci_image("pulled/never", "latest", layer_sizes=SIZES)
    for image in (app10, app11, rc, other, multi, pulled, never):
        push_image(upstream.url, image)
    proxy = CountingProxy.to_url(upstream.url)
    proxy.start()
    try:
        mirror = make_mirror(
            proxy.url, tag_freshness="1s", extra={"regmirror": {"prefetch": [POLICY]}}
        )
        amd64 = multi.manifest.child("linux/amd64")
        arm64 = multi.manifest.child("linux/arm64")
        wanted = [*app10.blobs(), *app11.blobs(), *amd64.blobs()]
        poll_until(
            lambda: all(mirror.has_blob(b.digest) for b in wanted),
            30,
            what="the matching tags' blobs in the mirror's store",
            describe=lambda: mirror.log_tail(40),
        )
        wait_runs(mirror, 2)
        # Each blob fetched once however many runs; the excluded tags, the tags no
        # pattern matches and the other platform never asked for.
        assert set(blob_gets(proxy, wanted).values()) == {1}
        unwanted = [*rc.blobs(), *other.blobs(), *arm64.blobs(), *pulled.blobs()]
        assert set(blob_gets(proxy, unwanted).values()) == {0}
        for ref in ("1.2-rc1", "2.0", arm64.digest):
            assert proxy.count_requests(None, f"/manifests/{ref}") == 0, ref
        for digest in (b.digest for b in wanted):
            assert mirror.blob_sha256(digest) == digest
        # The status page's document reports the policy and its runs.
        status = request(mirror.url, "GET", "/status.json").json()
        [policy] = status["prefetch"]["policies"]
        assert policy["name"] == "apps" and policy["last_run"]["outcome"] == "ok", policy
        assert policy["totals"]["blobs_fetched"] == len({b.digest for b in wanted}), policy
        # A tag is revalidated with a HEAD, not fetched again.
        assert proxy.count_requests("GET", "/v2/pf/app/manifests/1.1") == 1
        assert proxy.count_requests("HEAD", "/v2/pf/app/manifests/1.1") >= 1

        # pulled/* matches only what a client pulled: pulled/thing once its manifest
        # was asked for, never pulled/never.
        response = request(
            mirror.url,
            "GET",
            "/v2/pulled/thing/manifests/latest",
            headers={"Accept": ACCEPT_MANIFESTS},
        )
        assert response.status == 200
        poll_until(
            lambda: all(mirror.has_blob(b.digest) for b in pulled.blobs()),
            30,
            what="pulled/thing's blobs, prefetched",
            describe=lambda: mirror.log_tail(40),
        )
        assert proxy.count_requests(None, "/v2/pulled/never/") == 0

        # A new digest under 1.0: the next runs fetch its one new layer and nothing else.
        app10b = with_new_layer(app10, "pf/app 1.0 v2")
        push_image(upstream.url, app10b)
        new_layer = app10b.manifest.layers[-1]
        poll_until(
            lambda: mirror.has_blob(new_layer.digest),
            30,
            what="the new layer of pf/app:1.0, prefetched",
            describe=lambda: mirror.log_tail(40),
        )
        wait_runs(mirror, 2)
        assert proxy.count_requests("GET", f"/blobs/{new_layer.digest}") == 1
        assert set(blob_gets(proxy, wanted).values()) == {1}
        assert proxy.count_requests("GET", "/v2/pf/app/manifests/1.0") == 2
        assert proxy.count_requests("GET", "/v2/pf/app/manifests/1.1") == 1
        assert metric(mirror, "regmirror_prefetch_tags_changed_total", 'policy="apps"') >= 4
        fetched = metric(mirror, "regmirror_prefetch_blobs_fetched_total", 'policy="apps"')
        assert fetched == len({b.digest for b in (*wanted, *pulled.blobs(), new_layer)})
    finally:
        upstream.stop()
        proxy.stop()

    # From the cache alone: what the policy fetched, as a client pulls it.
    for image, name in ((app10b, "app10"), (app11, "app11"), (multi, "multi")):
        dest = tmp_path / name
        skopeo_copy(
            image.ref(mirror.host),
            dest,
            extra_args=["--override-os=linux", "--override-arch=amd64"],
        )
        check = verify_dir(dest, image)
        expected = amd64 if image is multi else image.manifest
        assert check.manifest == expected, name
        assert check.blob_digests == {b.digest for b in expected.blobs()}, name
