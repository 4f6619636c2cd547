"""TLS, client authentication, access rules and limits, with real twistd, skopeo and
docker-registry: certificates made at test time (tests/support/certs.py)."""

from __future__ import annotations

import base64
import http.client
import os
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from cryptography import x509

from tests.integration.conftest import MakeMirror
from tests.support.certs import CA, Issued, tls_config
from tests.support.images import Image, push_images
from tests.support.mirror import Mirror
from tests.support.ports import LOOPBACK
from tests.support.proxy import CountingProxy
from tests.support.rawhttp import assert_registry_error, request
from tests.support.skopeo import skopeo_copy, verify_dir
from tests.support.upstream import UpstreamRegistry
from tests.support.wait import poll_until

CLIENT_PASSWORD = "client-pw-7c1f9e2a"
UPSTREAM_PASSWORD = "upstream-pw-4b8d0e6f"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def client_context(ca: CA | None, client: Issued | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca is not None:
        context.load_verify_locations(cadata=ca.cert_pem.decode())
    if client is not None:
        assert client.cert_path and client.key_path
        context.load_cert_chain(client.cert_path, client.key_path)
    return context


def served_certificate(mirror: Mirror, ca: CA) -> x509.Certificate:
    context = client_context(ca)
    with socket.create_connection((LOOPBACK, mirror.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=LOOPBACK) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


class TLSMirror:
    """Files for a TLS mirror: a CA, the server's certificate, and the config."""

    def __init__(self, base: Path) -> None:
        self.dir = base
        self.ca = CA("mirror CA")
        self.ca_path = self.ca.write(base / "ca" / "ca.crt")
        self.server = self.ca.issue("mirror-1").write(base, "server")

    def extra(self, **tls: Any) -> dict[str, Any]:
        return tls_config(self.server, **tls)


def start(make_mirror: MakeMirror, upstream_url: str, extra: dict[str, Any], **kw: Any) -> Mirror:
    mirror = make_mirror(upstream_url, extra=extra, start=False)
    mirror.ssl_context = kw.get("ssl_context")
    mirror.ready_headers = kw.get("ready_headers", {})
    mirror.start()
    return mirror


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSMirror:
    return TLSMirror(tmp_path / "tls")


# -- TLS ----------------------------------------------------------------------------------


def test_skopeo_pulls_over_verified_tls_and_refuses_a_certificate_from_another_ca(
    upstream: UpstreamRegistry,
    images: dict[str, Image],
    make_mirror: MakeMirror,
    tls_files: TLSMirror,
    tmp_path: Path,
) -> None:
    mirror = start(
        make_mirror, upstream.url, tls_files.extra(), ssl_context=client_context(tls_files.ca)
    )
    image = images["oci"]
    ref = f"{mirror.host}/{image.name}:{image.tag}"
    skopeo_copy(
        ref,
        tmp_path / "ok",
        tls_verify=True,
        extra_args=["--src-cert-dir", str(tls_files.ca_path.parent)],
    )
    verify_dir(tmp_path / "ok", image)
    wrong = CA("another CA").write(tmp_path / "wrong" / "ca.crt")
    proc = skopeo_copy(
        ref,
        tmp_path / "refused",
        tls_verify=True,
        extra_args=["--src-cert-dir", str(wrong.parent)],
        check=False,
    )
    assert proc.returncode != 0
    assert "certificate" in proc.stderr and "unknown authority" in proc.stderr, proc.stderr


def test_tls_speaks_http11_by_alpn_and_refuses_tls_1_1(
    upstream: UpstreamRegistry, make_mirror: MakeMirror, tls_files: TLSMirror
) -> None:
    mirror = start(
        make_mirror, upstream.url, tls_files.extra(), ssl_context=client_context(tls_files.ca)
    )
    context = client_context(tls_files.ca)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection((LOOPBACK, mirror.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=LOOPBACK) as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    old = client_context(tls_files.ca)
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with socket.create_connection((LOOPBACK, mirror.port), timeout=5) as raw:
            with old.wrap_socket(raw, server_hostname=LOOPBACK):
                pass


def test_sighup_reloads_the_certificate_without_dropping_open_connections(
    upstream: UpstreamRegistry, make_mirror: MakeMirror, tls_files: TLSMirror
) -> None:
    context = client_context(tls_files.ca)
    mirror = start(make_mirror, upstream.url, tls_files.extra(), ssl_context=context)
    first = served_certificate(mirror, tls_files.ca)
    assert first.serial_number == tls_files.server.serial
    conn = http.client.HTTPSConnection(LOOPBACK, mirror.port, context=context, timeout=10)
    conn.request("GET", "/v2/")
    assert conn.getresponse().read() == b"{}"
    sock = conn.sock

    renewed = tls_files.ca.issue("mirror-2").write(tls_files.dir, "server")
    assert mirror.pid is not None
    os.kill(mirror.pid, signal.SIGHUP)
    poll_until(
        lambda: served_certificate(mirror, tls_files.ca).serial_number == renewed.serial,
        10,
        what="the renewed certificate to be served",
        describe=mirror.log_tail,
    )
    # The connection opened before the reload is still there, and still answers.
    conn.request("GET", "/v2/")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b"{}"
    assert conn.sock is sock
    conn.close()

    # A broken certificate at the next reload: logged, and the renewed one stays.
    assert renewed.cert_path is not None
    renewed.cert_path.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    os.kill(mirror.pid, signal.SIGHUP)
    poll_until(
        lambda: "TLS reload failed" in mirror.log_text(),
        10,
        what="the failed reload to be logged",
        describe=mirror.log_tail,
    )
    assert mirror.running
    assert served_certificate(mirror, tls_files.ca).serial_number == renewed.serial


def test_mutual_tls_refuses_clients_without_a_certificate_from_clientcas(
    upstream: UpstreamRegistry,
    images: dict[str, Image],
    make_mirror: MakeMirror,
    tls_files: TLSMirror,
    tmp_path: Path,
) -> None:
    clients = CA("client CA")
    clients_path = clients.write(tmp_path / "clientcas.pem")
    good = clients.issue("node-1", client=True).write(tmp_path / "certs.d", "client")
    stranger = CA("stranger CA").issue("node-x", client=True).write(tmp_path / "x", "client")
    mirror = start(
        make_mirror,
        upstream.url,
        tls_files.extra(clientcas=[str(clients_path)]),
        ssl_context=client_context(tls_files.ca, good),
    )

    def get(context: ssl.SSLContext) -> int:
        return request(mirror.url, "GET", "/v2/", ssl_context=context, timeout=5).status

    assert get(client_context(tls_files.ca, good)) == 200
    for refused in (client_context(tls_files.ca), client_context(tls_files.ca, stranger)):
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            get(refused)

    # skopeo with the client certificate (containers/image: *.cert and *.key) pulls.
    certs_d = tmp_path / "certs.d"
    (certs_d / "client.crt").rename(certs_d / "client.cert")
    (certs_d / "ca.crt").write_bytes(tls_files.ca.cert_pem)
    image = images["schema2"]
    skopeo_copy(
        f"{mirror.host}/{image.name}:{image.tag}",
        tmp_path / "pulled",
        tls_verify=True,
        extra_args=["--src-cert-dir", str(certs_d)],
    )
    verify_dir(tmp_path / "pulled", image)


# -- client authentication and access rules ----------------------------------------------


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    path.write_text(
        "".join(
            f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(5)).decode()}\n"
            for u, p in users.items()
        )
    )
    return path


def test_skopeo_pulls_with_credentials_and_is_refused_without(
    upstream: UpstreamRegistry,
    images: dict[str, Image],
    make_mirror: MakeMirror,
    tmp_path: Path,
) -> None:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"ci": CLIENT_PASSWORD})
    mirror = start(
        make_mirror,
        upstream.url,
        {"auth": {"htpasswd": {"path": str(htpasswd), "realm": "mirror"}}},
        ready_headers={"Authorization": basic("ci", CLIENT_PASSWORD)},
    )
    response = request(mirror.url, "GET", "/v2/")
    assert_registry_error(response, 401, "UNAUTHORIZED")
    assert response.header("WWW-Authenticate") == 'Basic realm="mirror"'
    image = images["index"]
    ref = f"{mirror.host}/{image.name}:{image.tag}"
    refused = skopeo_copy(ref, tmp_path / "anon", check=False)
    assert refused.returncode != 0 and "unauthorized" in refused.stderr.lower()
    wrong = skopeo_copy(ref, tmp_path / "wrong", creds="ci:nope", check=False)
    assert wrong.returncode != 0
    skopeo_copy(ref, tmp_path / "ok", creds=f"ci:{CLIENT_PASSWORD}", all_platforms=True)
    verify_dir(tmp_path / "ok", image)
    # A user added to the file can pull within a second or so, without a restart.
    write_htpasswd(htpasswd, {"ci": CLIENT_PASSWORD, "new": "new-user-pw"})
    poll_until(
        lambda: (
            request(
                mirror.url, "GET", "/v2/", headers={"Authorization": basic("new", "new-user-pw")}
            ).status
            == 200
        ),
        10,
        what="the new user to be accepted",
    )
    assert CLIENT_PASSWORD not in mirror.log_text()


def test_a_denied_repository_gets_403_and_no_upstream_request(
    upstream_proxy: CountingProxy,
    images: dict[str, Image],
    make_mirror: MakeMirror,
    tmp_path: Path,
) -> None:
    mirror = make_mirror(
        upstream_proxy.url,
        extra={
            "regmirror": {"access": {"allow": ["library/*", "multi/*"], "deny": ["multi/arch"]}}
        },
    )
    for path in (
        "/v2/team/app/server/manifests/1.0",
        "/v2/multi/arch/manifests/latest",
        "/v2/team/app/server/blobs/sha256:" + "0" * 64,
        "/v2/team/app/server/tags/list",
    ):
        assert_registry_error(request(mirror.url, "GET", path), 403, "DENIED")
    assert upstream_proxy.count_requests() == 0
    image = images["schema2"]
    skopeo_copy(f"{mirror.host}/{image.name}:{image.tag}", tmp_path / "allowed")
    verify_dir(tmp_path / "allowed", image)


# -- credentials never leak ----------------------------------------------------------------


def test_no_credential_appears_in_logs_or_error_bodies(
    images: dict[str, Image], make_mirror: MakeMirror, tmp_path: Path, integration_tools: Any
) -> None:
    # An upstream with the standard images, then the same storage behind htpasswd auth.
    base = tmp_path / "private"
    plain = UpstreamRegistry(base)
    plain.start()
    try:
        push_images(plain.url, images.values())
    finally:
        plain.stop()
    upstream_htpasswd = write_htpasswd(
        tmp_path / "upstream.htpasswd", {"mirror": UPSTREAM_PASSWORD}
    )
    private = UpstreamRegistry(  # with auth, its /v2/ answers 401 when ready
        base,
        port=plain.port,
        extra_config={"auth": {"htpasswd": {"realm": "private", "path": str(upstream_htpasswd)}}},
    )
    private.start()
    try:
        client_htpasswd = write_htpasswd(tmp_path / "client.htpasswd", {"dev": CLIENT_PASSWORD})
        client_auth = {"Authorization": basic("dev", CLIENT_PASSWORD)}
        auth = {"auth": {"htpasswd": {"path": str(client_htpasswd), "realm": "m"}}}
        good = start(
            make_mirror,
            private.url,
            {**auth, "proxy": {"username": "mirror", "password": UPSTREAM_PASSWORD}},
            ready_headers=client_auth,
        )
        bad = start(
            make_mirror,
            private.url,
            {**auth, "proxy": {"username": "mirror", "password": UPSTREAM_PASSWORD + "-wrong"}},
            ready_headers=client_auth,
        )
        image = images["oci"]
        skopeo_copy(
            f"{good.host}/{image.name}:{image.tag}",
            tmp_path / "pulled",
            creds=f"dev:{CLIENT_PASSWORD}",
        )
        verify_dir(tmp_path / "pulled", image)
        bodies = []
        for mirror in (good, bad):
            for headers in (
                client_auth,
                {"Authorization": basic("dev", CLIENT_PASSWORD + "x")},
                {"Authorization": "Bearer " + CLIENT_PASSWORD},
                {},
            ):
                for path in (
                    f"/v2/{image.name}/manifests/{image.tag}",
                    f"/v2/{image.name}/blobs/{image.largest_blob().digest}",
                    "/v2/nothing/here/manifests/latest",
                ):
                    resp = request(mirror.url, "GET", path, headers=headers)
                    bodies.append(resp.body.decode("utf-8", "replace"))
                    bodies.append(str(dict(resp.headers)))
        time.sleep(0.2)  # let the last access-log lines reach the files
        secrets = [
            CLIENT_PASSWORD,
            UPSTREAM_PASSWORD,
            base64.b64encode(f"dev:{CLIENT_PASSWORD}".encode()).decode(),
            base64.b64encode(f"mirror:{UPSTREAM_PASSWORD}".encode()).decode(),
        ]
        text = "\n".join([good.log_text(), bad.log_text(), *bodies])
        assert "refused the mirror's credentials" in text  # the bad mirror did try
        for secret in secrets:
            assert secret not in text, f"a credential leaked: {secret[:4]}..."
    finally:
        private.stop()


# -- limits ---------------------------------------------------------------------------------


def test_a_slowloris_client_is_cut_after_the_header_timeout(
    upstream: UpstreamRegistry, make_mirror: MakeMirror
) -> None:
    mirror = make_mirror(upstream.url, extra={"regmirror": {"header_timeout": "1s"}})
    with socket.create_connection((LOOPBACK, mirror.port), timeout=10) as s:
        s.sendall(b"GET /v2/ HTTP/1.1\r\n")
        started = time.monotonic()
        data = b""
        for _ in range(40):
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
            s.settimeout(0.25)
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                continue
            data += chunk
            if not chunk or b"\r\n\r\n" in data:
                break
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert time.monotonic() - started < 5
    # Everyone else is still served.
    assert request(mirror.url, "GET", "/v2/").status == 200


def test_a_long_url_gets_414(upstream: UpstreamRegistry, make_mirror: MakeMirror) -> None:
    mirror = make_mirror(upstream.url, extra={"regmirror": {"max_url_length": 1024}})
    resp = request(mirror.url, "GET", "/v2/" + "a/" * 1000 + "manifests/latest")
    assert_registry_error(resp, 414, "UNSUPPORTED")
    resp = request(mirror.url, "GET", "/v2/" + "a/" * 20000 + "manifests/latest")
    assert_registry_error(resp, 414, "UNSUPPORTED")
    assert request(mirror.url, "GET", "/v2/").status == 200
