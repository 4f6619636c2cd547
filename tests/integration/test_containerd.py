"""containerd pulling through regmirror as Kubernetes nodes do: a hosts.toml per
registry, containerd adding ?ns=<registry>, regmirror routing by it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.conftest import MakeMirror, MakeUpstream
from tests.support.containerd import Containerd
from tests.support.images import Image, oci_image, push_image
from tests.support.upstream import UpstreamRegistry


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    daemon = Containerd()
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def test_containerd_pulls_from_two_registries_through_one_mirror_by_ns(
    containerd: Containerd,
    upstream: UpstreamRegistry,
    images: dict[str, Image],
    make_upstream: MakeUpstream,
    make_mirror: MakeMirror,
) -> None:
    ghcr = make_upstream(push_standard_images=False)
    # The same repository name on both registries, with different content.
    hub_image = images["schema2"]  # library/alpine:3.19
    ghcr_image = push_image(ghcr.url, oci_image("library/alpine", "3.19", seed="ghcr-alpine"))
    assert ghcr_image.digest != hub_image.digest
    mirror = make_mirror(
        upstream.url,
        extra={
            "regmirror": {
                "upstream_name": "docker.io",
                "upstreams": [{"name": "ghcr.io", "url": ghcr.url}],
            }
        },
    )
    containerd.mirror("docker.io", mirror.url)
    containerd.mirror("ghcr.io", mirror.url)

    containerd.pull("docker.io/library/alpine:3.19")
    containerd.pull("ghcr.io/library/alpine:3.19")

    assert containerd.image_digest("docker.io/library/alpine:3.19") == hub_image.digest
    assert containerd.image_digest("ghcr.io/library/alpine:3.19") == ghcr_image.digest
    log = mirror.log_text()
    assert "?ns=docker.io" in log and "?ns=ghcr.io" in log
    for blob in ghcr_image.blobs():
        assert ghcr.count_requests("GET", f"/blobs/{blob.digest}") == 1
        assert upstream.count_requests("GET", f"/blobs/{blob.digest}") == 0
    # Kept apart in the store, per upstream.
    assert (mirror.root / "repositories" / "docker.io" / "library" / "alpine").is_dir()
    assert (mirror.root / "repositories" / "ghcr.io" / "library" / "alpine").is_dir()
