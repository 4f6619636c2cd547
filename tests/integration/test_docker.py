"""A real Docker daemon (Debian's docker.io, dockerd 20.10) pulling through regmirror,
configured as the design card says: ``--registry-mirror``, plain HTTP or TLS on port
5000 (its CA in ``/etc/docker/certs.d/127.0.0.1:5000/ca.crt``).

Docker mirrors Docker Hub only, so the mirror's default upstream (``proxy.remoteurl``,
named ``docker.io``) is a loopback docker-registry holding the standard images under
Docker Hub names (``library/alpine``, ``team/app/server``, ...). When the mirror fails,
dockerd falls back to registry-1.docker.io, which cannot be reached here: a pull that
works came through the mirror, and each test also checks that dockerd never tried the
fallback and what the upstream registry was asked.
"""

from __future__ import annotations

import contextlib
import platform
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import MakeMirror, MakeUpstream
from tests.support.certs import CA, Issued, tls_config
from tests.support.dockerd import Dockerd
from tests.support.images import Blob, Image, Manifest, Platform
from tests.support.mirror import Mirror
from tests.support.ports import LOOPBACK
from tests.support.upstream import UpstreamRegistry

# The order dockerd is asked to pull them in: a Docker schema 2 image, an OCI image
# under a nested name, an OCI index and a Docker manifest list.
ROLES = ("schema2", "oci", "index", "docker_list")

CERTS_D = Path("/etc/docker/certs.d")
DOCKER_TLS_PORT = 5000  # the design card's; another free port only if it is taken

_GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def docker_ref(image: Image) -> str:
    """The reference ``docker pull`` is given: ``library/alpine:3.19``."""
    return f"{image.name}:{image.tag}"


def familiar_name(image: Image) -> str:
    """How Docker names the repository in ``RepoDigests``: ``alpine`` for ``library/``."""
    name = image.name
    return name.removeprefix("library/") if name.count("/") == 1 else name


def pulled_manifest(image: Image) -> Manifest:
    """The image manifest dockerd pulls: for an index, the child for this machine."""
    if not image.manifest.is_index:
        return image.manifest
    return image.manifest.child(Platform("linux", _GOARCH.get(platform.machine(), "")))


def unpulled_blobs(image: Image) -> list[Blob]:
    """Blobs of an index's other platforms, which dockerd must not ask for."""
    wanted = {b.digest for b in pulled_manifest(image).own_blobs()}
    return [b for b in image.blobs() if b.digest not in wanted]


def assert_pulled(daemon: Dockerd, images: dict[str, Image]) -> None:
    """Each image is in the daemon under the upstream's digests: ``RepoDigests`` is the
    digest of the top-level manifest (an index's too), the image ID its config's."""
    for role in ROLES:
        image = images[role]
        config = pulled_manifest(image).config
        assert config is not None
        assert daemon.repo_digests(docker_ref(image)) == [
            f"{familiar_name(image)}@{image.digest}"
        ], role
        assert daemon.image_id(docker_ref(image)) == config.digest, role
    assert not daemon.fell_back_to_docker_hub(), daemon.log_tail()


# --- fixtures ----------------------------------------------------------------------


@pytest.fixture
def make_dockerd() -> Iterator[Callable[[str], Dockerd]]:
    """Start a private dockerd with ``--registry-mirror=URL``; stopped at teardown."""
    started: list[Dockerd] = []

    def make(mirror_url: str) -> Dockerd:
        daemon = Dockerd(mirror_url)
        started.append(daemon)
        daemon.start()
        return daemon

    try:
        yield make
    finally:
        errors = []
        for daemon in reversed(started):
            try:
                daemon.stop()
            except AssertionError as e:
                errors.append(e)
        if errors:
            raise errors[0]


def tls_port(ip: str) -> int:
    """5000 if nothing listens there on ``ip``, else a free port (on ``ip``)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    for port in (DOCKER_TLS_PORT, 0):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((ip, port))
            except OSError as e:
                if port == 0:  # no such address on this machine (IPv6 disabled...)
                    raise AssertionError(f"cannot listen on {ip}: {e}") from e
                continue
            found: int = sock.getsockname()[1]
            return found
    raise AssertionError("unreachable")


@dataclass
class DockerTLS:
    """A mirror's TLS files for ``ip``, port 5000 (or a free port if it is taken)."""

    ip: str
    port: int
    ca: CA
    server: Issued

    @property
    def host(self) -> str:
        """``HOST:PORT`` as in the mirror's URL: the directory name under certs.d."""
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    def extra(self) -> dict[str, Any]:
        return tls_config(self.server)

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        context.load_verify_locations(cadata=self.ca.cert_pem.decode())
        return context


def make_tls(directory: Path, ip: str = LOOPBACK) -> DockerTLS:
    ca = CA("docker mirror CA")
    server = ca.issue("regmirror", ips=(ip,)).write(directory, "server")
    return DockerTLS(ip, tls_port(ip), ca, server)


@pytest.fixture
def certs_d() -> Iterator[Callable[[str, CA], Path]]:
    """``install(host, ca)`` writes ``/etc/docker/certs.d/<host>/ca.crt``, where dockerd
    looks for a registry's CA (it reads it at each pull). At teardown each file is
    removed (or what was there before is put back), and so is each directory the
    fixture created."""
    previous: dict[Path, bytes | None] = {}
    created: list[Path] = []

    def install(host: str, ca: CA) -> Path:
        ca_file = CERTS_D / host / "ca.crt"
        for directory in (CERTS_D.parent, CERTS_D, ca_file.parent):
            if not directory.exists():
                directory.mkdir()
                created.append(directory)
        if ca_file not in previous:
            previous[ca_file] = ca_file.read_bytes() if ca_file.exists() else None
        return ca.write(ca_file)

    try:
        yield install
    finally:
        for ca_file, data in previous.items():
            if data is None:
                ca_file.unlink(missing_ok=True)
            else:
                ca_file.write_bytes(data)
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()


def start_mirror(
    make_mirror: MakeMirror, upstream_url: str, tls: DockerTLS | None = None
) -> Mirror:
    """regmirror with ``upstream_url`` as Docker Hub; over TLS on ``tls.port``."""
    extra: dict[str, Any] = {"regmirror": {"upstream_name": "docker.io"}}
    if tls is not None:
        extra.update(tls.extra())
    mirror = make_mirror(upstream_url, extra=extra, start=False)
    if tls is not None:
        mirror.listen_ip, mirror.port = tls.ip, tls.port
        mirror.ssl_context = tls.client_context()
    mirror.start()
    return mirror


# --- tests -------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["http", "tls"])
def test_docker_pulls_each_kind_of_image_through_the_mirror_then_from_its_cache(
    transport: str,
    tmp_path: Path,
    certs_d: Callable[[str, CA], Path],
    make_upstream: MakeUpstream,
    make_mirror: MakeMirror,
    make_dockerd: Callable[[str], Dockerd],
    images: dict[str, Image],
) -> None:
    upstream = make_upstream()  # the standard images, in a registry this test may stop
    tls = make_tls(tmp_path / "tls") if transport == "tls" else None
    if tls is not None:
        # What an operator does; dockerd does not read it for 127.0.0.0/8, which it
        # always treats as an insecure registry (TLS, but no verification): see below.
        certs_d(tls.host, tls.ca)
    mirror = start_mirror(make_mirror, upstream.url, tls)
    if tls is not None:
        assert mirror.url == f"https://{LOOPBACK}:{tls.port}"

    first = make_dockerd(mirror.url)
    for role in ROLES:
        first.pull(docker_ref(images[role]))
    assert_pulled(first, images)
    log = mirror.log_text()
    assert "/v2/library/alpine/manifests/3.19" in log
    assert "/v2/team/app/server/manifests/1.0" in log
    # Each blob dockerd needed came from the upstream once, through the mirror; the
    # other platform's blobs of an index were never fetched.
    for role in ROLES:
        for blob in pulled_manifest(images[role]).own_blobs():
            upstream.wait_for_requests("GET", f"/blobs/{blob.digest}")
            assert upstream.count_requests("GET", f"/blobs/{blob.digest}") == 1, (role, blob)
        for blob in unpulled_blobs(images[role]):
            assert upstream.count_requests("GET", f"/blobs/{blob.digest}") == 0, (role, blob)
    first.stop()

    # With the upstream down, a new daemon (an empty data root) gets the same images
    # from the mirror's cache.
    upstream.stop()
    second = make_dockerd(mirror.url)
    for role in ROLES:
        second.pull(docker_ref(images[role]))
    assert_pulled(second, images)
    assert not upstream.running


def test_a_pull_the_mirror_cannot_serve_falls_back_to_docker_hub_and_fails(
    mirror: Mirror, make_dockerd: Callable[[str], Dockerd]
) -> None:
    """What makes a successful pull proof that it came through the mirror: with the
    mirror answering 404, dockerd tries registry-1.docker.io, which is out of reach."""
    daemon = make_dockerd(mirror.url)
    failed = daemon.pull("library/never-pushed:1.0", check=False)
    assert failed.returncode != 0
    assert daemon.fell_back_to_docker_hub()
    assert "registry-1.docker.io" in failed.stderr
    assert "/v2/library/never-pushed/manifests/1.0" in mirror.log_text()


def test_docker_verifies_the_mirrors_certificate_with_the_ca_in_certs_d(
    tmp_path: Path,
    upstream: UpstreamRegistry,
    images: dict[str, Image],
    make_mirror: MakeMirror,
    make_dockerd: Callable[[str], Dockerd],
    certs_d: Callable[[str, CA], Path],
) -> None:
    """On 127.0.0.1 dockerd skips verification (127.0.0.0/8 is always "insecure"), so
    the certificate is checked as a mirror elsewhere on the network would be, on
    ``[::1]:5000``: refused without its CA or with another CA's, accepted with its CA
    in ``/etc/docker/certs.d/[::1]:5000/ca.crt``."""
    tls = make_tls(tmp_path / "tls", "::1")
    mirror = start_mirror(make_mirror, upstream.url, tls)
    assert mirror.url == f"https://{tls.host}"
    daemon = make_dockerd(mirror.url)
    image = images["schema2"]

    refused = daemon.pull(docker_ref(image), check=False)
    assert refused.returncode != 0
    certs_d(tls.host, CA("another CA"))
    refused_again = daemon.pull(docker_ref(image), check=False)
    assert refused_again.returncode != 0
    log = daemon.log_text()
    assert log.count("x509: certificate signed by unknown authority") >= 2, daemon.log_tail()
    assert "/v2/library/alpine/manifests" not in mirror.log_text()

    certs_d(tls.host, tls.ca)
    daemon.pull(docker_ref(image))
    assert daemon.repo_digests(docker_ref(image)) == [f"alpine@{image.digest}"]
