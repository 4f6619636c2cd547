"""OCI 1.1 referrers (signatures, SBOMs) through the mirror.

Against the real Debian registry (distribution 2.8, no referrers API: its answer is a
plain-text 404), artifacts are pushed with a ``subject`` by oras-py, the ORAS Python
SDK (``oras`` on PyPI), with the referrers tag schema's fallback index beside them, as
clients do for such registries; the mirror lists them from that index. For the
upstream-API path, which no registry installable here implements, the upstream is
``tests.support.referrers_standin``, a stand-in. oras-py has no referrers listing of
its own: the listing through the mirror is plain HTTP, and oras-py's authenticated
``do_request`` on the referrers URL; oras-py also pulls a referrer through the mirror.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import oras.defaults
import oras.oci
import oras.provider
import pytest

from tests.support.images import ACCEPT_MANIFESTS, OCI_INDEX, OCI_MANIFEST, Image, oci_image
from tests.support.images import push_image as push_test_image
from tests.support.mirror import Mirror
from tests.support.proxy import CountingProxy
from tests.support.rawhttp import Response, assert_registry_error, request
from tests.support.referrers_standin import ReferrersStandin

if TYPE_CHECKING:
    from tests.integration.conftest import MakeMirror, MakeUpstream

EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
SIG_CONFIG = "application/vnd.dev.cosign.artifact.sig.v1+json"
SIG_LAYER = "application/vnd.dev.cosign.simplesigning.v1+json"
SBOM = "application/spdx+json"
NAME = "signed/app"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def list_referrers(mirror: Mirror, name: str, subject: str, query: str = "") -> Response:
    resp = request(mirror.url, "GET", f"/v2/{name}/referrers/{subject}{query}")
    assert resp.status == 200, f"{resp.status} {resp.body[:300]!r}"
    assert resp.header("Content-Type") == OCI_INDEX
    index = resp.json()
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    return resp


def listed(resp: Response) -> list[dict[str, Any]]:
    manifests: list[dict[str, Any]] = resp.json()["manifests"]
    return manifests


def oras_client(host: str) -> oras.provider.Registry:
    return oras.provider.Registry(hostname=host, insecure=True)


class Signed:
    """An image pushed with push_image, then with oras-py a signature (artifact type
    from its config's media type, as cosign's) and an SBOM (``artifactType`` and the
    empty config), both with the image as ``subject``, and the fallback index."""

    def __init__(self, registry_host: str, workdir: Path) -> None:
        self.image: Image = oci_image(NAME, "1.0", seed="signed/app 1.0", layer_sizes=(50_000,))
        push_test_image(f"http://{registry_host}", self.image)
        self.client = oras_client(registry_host)
        subject = oras.oci.Subject(OCI_MANIFEST, self.image.digest, self.image.manifest.size)
        self.signature_payload = b'{"critical":{"image":{"docker-manifest-digest":"x"}}}'
        signature = workdir / "signature.json"
        signature.write_bytes(self.signature_payload)
        pushed = self.client.push(
            target=f"{registry_host}/{NAME}:sig",
            files=[f"{signature}:{SIG_LAYER}"],
            manifest_config=f"{workdir / 'none'}:{SIG_CONFIG}",  # absent: the {} config
            manifest_annotations={"dev.cosignproject.cosign/signature": "MEUCIQ"},
            subject=subject,
            disable_path_validation=True,
            quiet=True,
        )
        self.signature = self._descriptor(pushed, SIG_CONFIG)
        self.sbom_payload = json.dumps({"spdxVersion": "SPDX-2.3", "name": NAME}).encode()
        self.sbom = self._push_sbom(registry_host, workdir, subject)
        fallback = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [self.signature, self.sbom],
        }
        tag = "sha256-" + self.image.digest.partition(":")[2]
        put = self.client.do_request(
            f"http://{registry_host}/v2/{NAME}/manifests/{tag}",
            "PUT",
            data=json.dumps(fallback).encode(),
            headers={"Content-Type": OCI_INDEX},
        )
        assert put.status_code == 201, put.text

    def _push_sbom(
        self, registry_host: str, workdir: Path, subject: oras.oci.Subject
    ) -> dict[str, Any]:
        container = self.client.get_container(f"{registry_host}/{NAME}:sbom")
        sbom, empty = workdir / "sbom.spdx.json", workdir / "empty.json"
        sbom.write_bytes(self.sbom_payload)
        empty.write_bytes(b"{}")
        layer = oras.oci.NewLayer(str(sbom), media_type=SBOM)
        layer["annotations"] = {oras.defaults.annotation_title: sbom.name}
        config = {"mediaType": EMPTY_CONFIG, "digest": sha256(b"{}"), "size": 2}
        for path, descriptor in ((sbom, layer), (empty, config)):
            uploaded = self.client.upload_blob(str(path), container, descriptor)
            assert uploaded.status_code in (200, 201), uploaded.text
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": SBOM,
            "config": config,
            "layers": [layer],
            "subject": asdict(subject),
            "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
        }
        pushed = self.client.upload_manifest(manifest, container)
        assert pushed.status_code == 201, pushed.text
        return self._descriptor(pushed, SBOM)

    def _descriptor(self, pushed: Any, artifact_type: str) -> dict[str, Any]:
        """What a client writes into the fallback index for a pushed artifact."""
        digest = pushed.headers["Docker-Content-Digest"]
        data = self.client.do_request(
            f"{self.client.prefix}://{self.client.hostname}/v2/{NAME}/manifests/{digest}",
            headers={"Accept": OCI_MANIFEST},
        ).content
        assert sha256(data) == digest
        descriptor = {
            "mediaType": OCI_MANIFEST,
            "digest": digest,
            "size": len(data),
            "artifactType": artifact_type,
        }
        annotations = json.loads(data).get("annotations")
        if annotations:
            descriptor["annotations"] = annotations
        return descriptor


@pytest.fixture
def proxied(make_upstream: MakeUpstream) -> Iterator[tuple[CountingProxy, Any]]:
    upstream = make_upstream(push_standard_images=False)
    proxy = CountingProxy.to_url(upstream.url)
    proxy.start()
    try:
        yield proxy, upstream
    finally:
        proxy.stop()


def test_signatures_and_sboms_of_a_real_registry_are_listed_through_the_mirror(
    proxied: tuple[CountingProxy, Any], make_mirror: MakeMirror, tmp_path: Path
) -> None:
    proxy, upstream = proxied
    signed = Signed(upstream.host, tmp_path)
    subject = signed.image.digest
    # The upstream really has no referrers API: the fallback path is what runs here.
    assert request(upstream.url, "GET", f"/v2/{NAME}/referrers/{subject}").status == 404
    mirror = make_mirror(proxy.url, tag_freshness="1h")

    every = list_referrers(mirror, NAME, subject)
    assert listed(every) == [signed.signature, signed.sbom]
    assert every.header("OCI-Filters-Applied") is None
    sboms = list_referrers(mirror, NAME, subject, f"?artifactType={SBOM.replace('+', '%2B')}")
    assert listed(sboms) == [signed.sbom]
    assert sboms.header("OCI-Filters-Applied") == "artifactType"
    head = request(mirror.url, "HEAD", f"/v2/{NAME}/referrers/{subject}")
    assert head.status == 200 and head.body == b""
    assert head.header("Content-Length") == str(len(every.body))

    # A real client, oras-py, on the same URL (its do_request answers auth challenges).
    client = oras_client(mirror.host)
    answer = client.do_request(
        f"http://{mirror.host}/v2/{NAME}/referrers/{subject}?artifactType={SIG_CONFIG}"
    )
    assert answer.status_code == 200 and answer.headers["Content-Type"] == OCI_INDEX
    assert answer.json()["manifests"] == [signed.signature]

    # One upstream request per freshness window, however many clients ask: the API
    # (404) once, the fallback tag once.
    assert proxy.count_requests("GET", f"/v2/{NAME}/referrers/") == 1
    assert proxy.count_requests("GET", f"/manifests/sha256-{subject.partition(':')[2]}") == 1

    # The referrers are ordinary manifests and blobs: pulled through the mirror byte for
    # byte (so a signature over them verifies), by oras-py too.
    for descriptor in listed(every):
        got = request(
            mirror.url,
            "GET",
            f"/v2/{NAME}/manifests/{descriptor['digest']}",
            headers={"Accept": ACCEPT_MANIFESTS},
        )
        assert got.status == 200 and sha256(got.body) == descriptor["digest"]
        assert got.header("Content-Type") == OCI_MANIFEST
        assert json.loads(got.body)["subject"]["digest"] == subject
    pulled = client.pull(
        target=f"{mirror.host}/{NAME}@{signed.sbom['digest']}", outdir=str(tmp_path / "out")
    )
    assert [Path(p).read_bytes() for p in pulled] == [signed.sbom_payload]
    empty = request(mirror.url, "GET", f"/v2/{NAME}/blobs/{sha256(b'{}')}")
    assert empty.status == 200 and empty.body == b"{}"

    unknown = sha256(b"a subject nobody signed")
    assert listed(list_referrers(mirror, NAME, unknown)) == []


def test_referrers_are_served_stale_when_the_upstream_is_cut(
    make_upstream: MakeUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    upstream = make_upstream(push_standard_images=False)
    signed = Signed(upstream.host, tmp_path)
    subject = signed.image.digest
    mirror = make_mirror(upstream.url, tag_freshness="0s")
    assert listed(list_referrers(mirror, NAME, subject)) == [signed.signature, signed.sbom]
    assert listed(list_referrers(mirror, NAME, subject, f"?artifactType={SIG_CONFIG}")) == [
        signed.signature
    ]
    assert listed(list_referrers(mirror, NAME, sha256(b"unsigned"))) == []

    upstream.stop()

    assert listed(list_referrers(mirror, NAME, subject)) == [signed.signature, signed.sbom]
    filtered = list_referrers(mirror, NAME, subject, f"?artifactType={SBOM.replace('+', '%2B')}")
    assert listed(filtered) == [signed.sbom]
    assert filtered.header("OCI-Filters-Applied") == "artifactType"
    assert "serving the referrers of signed/app@" in mirror.log_text()
    # Never listed, and nobody to ask: not an empty list the mirror cannot vouch for.
    never = request(mirror.url, "GET", f"/v2/{NAME}/referrers/{sha256(b'never asked')}")
    assert_registry_error(never, 503, "UNAVAILABLE")
    bad = request(mirror.url, "GET", f"/v2/{NAME}/referrers/sha256:1234")
    assert_registry_error(bad, 400, "DIGEST_INVALID")


@pytest.fixture
def standin() -> Iterator[ReferrersStandin]:
    server = ReferrersStandin(page_size=1)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _subject(standin: ReferrersStandin) -> dict[str, Any]:
    """An image manifest in the stand-in, tagged ``1.0``: its descriptor."""
    image = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
    digest = standin.add_manifest(NAME, image, OCI_MANIFEST, tag="1.0")
    return {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(image)}


def _artifact(
    standin: ReferrersStandin, name: str, subject: dict[str, Any], artifact_type: str | None
) -> str:
    payload = standin.add_blob(f"payload of {artifact_type} in {name}".encode())
    config_type = SIG_CONFIG if artifact_type is None else EMPTY_CONFIG
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_type, "digest": standin.add_blob(b"{}"), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": payload, "size": 20}],
        "subject": subject,
    }
    if artifact_type is not None:
        manifest["artifactType"] = artifact_type
    return standin.add_manifest(name, json.dumps(manifest).encode(), OCI_MANIFEST)


def test_an_upstream_referrers_api_is_listed_through_the_mirror(
    standin: ReferrersStandin, make_mirror: MakeMirror
) -> None:
    subject = _subject(standin)
    subject_digest = subject["digest"]
    signature = _artifact(standin, NAME, subject, None)
    sbom = _artifact(standin, NAME, subject, SBOM)
    _artifact(standin, "other/repo", subject, SBOM)  # another repository's: not listed
    mirror = make_mirror(standin.url, tag_freshness="1h")

    every = list_referrers(mirror, NAME, subject_digest)
    assert [d["digest"] for d in listed(every)] == [signature, sbom]
    assert [d["artifactType"] for d in listed(every)] == [SIG_CONFIG, SBOM]
    assert listed(every) == standin.referrers(NAME, subject_digest)  # as the upstream said
    sboms = list_referrers(mirror, NAME, subject_digest, f"?artifactType={SBOM}")
    assert [d["digest"] for d in listed(sboms)] == [sbom]
    assert sboms.header("OCI-Filters-Applied") == "artifactType"
    answer = oras_client(mirror.host).do_request(
        f"http://{mirror.host}/v2/{NAME}/referrers/{subject_digest}?artifactType={SIG_CONFIG}"
    )
    assert [d["digest"] for d in answer.json()["manifests"]] == [signature]

    # The API was asked, unfiltered, its two pages followed; the fallback tag never.
    asked = [t for m, t in standin.requests if "/referrers/" in t]
    assert len(asked) == 2 and "last=" in asked[1], asked
    assert not any("artifactType" in t for t in asked)
    assert standin.count("GET", "/manifests/sha256-") == 0
    got = request(
        mirror.url, "GET", f"/v2/{NAME}/manifests/{sbom}", headers={"Accept": OCI_MANIFEST}
    )
    assert got.status == 200 and sha256(got.body) == sbom


def test_an_upstream_referrers_api_is_served_stale_when_it_is_down(
    standin: ReferrersStandin, make_mirror: MakeMirror
) -> None:
    subject = _subject(standin)
    subject_digest = subject["digest"]
    sbom = _artifact(standin, NAME, subject, SBOM)
    mirror = make_mirror(standin.url, tag_freshness="0s")
    assert [d["digest"] for d in listed(list_referrers(mirror, NAME, subject_digest))] == [sbom]

    standin.stop()

    stale = list_referrers(mirror, NAME, subject_digest, f"?artifactType={SBOM}")
    assert [d["digest"] for d in listed(stale)] == [sbom]
    assert stale.header("OCI-Filters-Applied") == "artifactType"
