"""containerd pulling through regmirror as Kubernetes nodes do: a hosts.toml per
registry, containerd adding ?ns=<registry>, regmirror routing by it."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest

from tests.integration.conftest import MakeMirror, MakeUpstream
from tests.support.containerd import Containerd
from tests.support.images import Image, oci_image, push_image
from tests.support.proxy import CountingProxy
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


def test_containerd_pulls_docker_io_through_a_mirror_whose_only_upstream_is_host_port(
    containerd: Containerd,
    upstream: UpstreamRegistry,
    images: dict[str, Image],
    upstream_proxy: CountingProxy,
    make_mirror: MakeMirror,
) -> None:
    # A registry:2 config: one proxy.remoteurl, a loopback host:port (a corporate
    # registry mirroring Docker Hub), no upstream_name. Nodes send ?ns=docker.io.
    mirror = make_mirror(upstream_proxy.url)
    containerd.mirror("docker.io", mirror.url)
    image = images["schema2"]  # library/alpine:3.19
    containerd.pull("docker.io/library/alpine:3.19")
    assert containerd.image_digest("docker.io/library/alpine:3.19") == image.digest
    assert "?ns=docker.io" in mirror.log_text()
    served = [line for line in mirror.log_text().splitlines() if "ns=docker.io served" in line]
    assert len(served) == 1, served  # logged once, however many requests carried it
    for blob in image.blobs():
        assert upstream_proxy.count_requests("GET", f"/blobs/{blob.digest}") == 1
    metrics = urllib.request.urlopen(f"{mirror.url}/metrics", timeout=10).read().decode()
    assert 'regmirror_ns_unmatched_total{outcome="served"}' in metrics
    assert 'regmirror_ns_unmatched_total{outcome="refused"} 0.0' in metrics
