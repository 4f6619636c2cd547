"""The fixtures of the upstream-auth and several-upstreams tests, checked without regmirror.

Each fixture is exercised against the real distribution registry (and skopeo where a
real client says more than a raw request): htpasswd and token auth, the token server,
the redirecting registry and its blob host, the rate-limiting proxy, the black hole,
credential helpers, ``registries.conf`` mirrors. If one of these fails, the failures
of ``test_upstreams.py`` and ``test_upstream_auth.py`` say nothing about regmirror.
Run them with ``pytest tests/integration/test_harness_auth.py``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.blackhole import BlackHole
from tests.support.blobhost import BlobHost, redirect_config
from tests.support.credentials import CredentialHelper, write_docker_config
from tests.support.httpproxy import ReverseProxy
from tests.support.images import ACCEPT_MANIFESTS, Image, oci_image, push_image
from tests.support.mirror import Mirror
from tests.support.ports import free_port
from tests.support.rawhttp import request
from tests.support.regauth import (
    basic_auth,
    fetch_token,
    htpasswd_config,
    parse_challenge,
    write_htpasswd,
)
from tests.support.registriesconf import RegistryEntry, write_registries_conf
from tests.support.skopeo import SkopeoError, skopeo_copy, verify_dir
from tests.support.tokenserver import SigningKey, TokenServer, decode_jwt_claims
from tests.support.upstream import UpstreamRegistry
from tests.support.wait import poll_until

USER, PASSWORD = "puller", "pa55-harness-only"


@pytest.fixture
def basic_registry(tmp_path: Path, integration_tools: dict[str, str]) -> Iterator[UpstreamRegistry]:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {USER: PASSWORD})
    registry = UpstreamRegistry(tmp_path / "registry", extra_config=htpasswd_config(htpasswd))
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()


def test_htpasswd_registry_requires_the_credentials_upstream_directly(
    basic_registry: UpstreamRegistry, tmp_path: Path
) -> None:
    resp = request(basic_registry.url, "GET", "/v2/")
    assert resp.status == 401
    scheme, params = parse_challenge(resp.header("WWW-Authenticate") or "")
    assert (scheme, params.get("realm")) == ("basic", "regmirror-tests")
    wrong = {"Authorization": basic_auth(USER, "wrong")}
    assert request(basic_registry.url, "GET", "/v2/", headers=wrong).status == 401
    right = {"Authorization": basic_auth(USER, PASSWORD)}
    assert request(basic_registry.url, "GET", "/v2/", headers=right).status == 200

    image = oci_image("private/app", "1.0", layer_sizes=(50_000,))
    push_image(basic_registry.url, image, username=USER, password=PASSWORD)
    skopeo_copy(image.ref(basic_registry.host), tmp_path / "d", creds=f"{USER}:{PASSWORD}")
    verify_dir(tmp_path / "d", image)
    with pytest.raises(SkopeoError, match=r"(?i)unauthorized|401"):
        skopeo_copy(image.ref(basic_registry.host), tmp_path / "anonymous")


def test_token_registry_trusts_the_token_server_upstream_directly(
    tmp_path: Path, integration_tools: dict[str, str]
) -> None:
    with TokenServer(tmp_path / "tokens", users={USER: PASSWORD}) as tokens:
        registry = UpstreamRegistry(tmp_path / "registry", extra_config=tokens.registry_config())
        with registry:
            resp = request(registry.url, "GET", "/v2/")
            assert resp.status == 401
            scheme, params = parse_challenge(resp.header("WWW-Authenticate") or "")
            assert scheme == "bearer"
            assert params["realm"] == tokens.realm
            assert params["service"] == tokens.service

            # The pusher follows the challenges: pull scope, then pull,push for uploads.
            image = oci_image("owner/img", "1.0", layer_sizes=(50_000, 20_000))
            push_image(registry.url, image, username=USER, password=PASSWORD)
            assert tokens.count_requests("repository:owner/img:pull,push") >= 1, tokens.requests
            assert all(r.user == USER for r in tokens.requests if r.status == 200)

            # An anonymous client (skopeo) gets pull-only tokens, and they work.
            tokens.reset()
            skopeo_copy(image.ref(registry.host), tmp_path / "d")
            verify_dir(tmp_path / "d", image)
            assert tokens.count_requests("repository:owner/img:pull") >= 1
            assert {r.user for r in tokens.requests} == {None}
            claims = decode_jwt_claims(tokens.tokens()[-1])
            assert claims["aud"] == tokens.service and claims["iss"] == tokens.issuer
            assert claims["access"] == [
                {"type": "repository", "name": "owner/img", "actions": ["pull"]}
            ]

            path = f"/v2/owner/img/manifests/{image.tag}"
            accept = {"Accept": ACCEPT_MANIFESTS}

            def get(token: str) -> int:
                headers = {**accept, "Authorization": f"Bearer {token}"}
                return request(registry.url, "GET", path, headers=headers).status

            pull = [{"type": "repository", "name": "owner/img", "actions": ["pull"]}]
            assert get(tokens.mint(pull)) == 200
            # The registry really verifies: scope, signer, audience, issuer.
            other = [{"type": "repository", "name": "other/img", "actions": ["pull"]}]
            assert get(tokens.mint(other)) == 401
            assert get(tokens.mint(pull, signing_key=SigningKey.generate("rogue"))) == 401
            assert get(tokens.mint(pull, audience="another-service")) == 401
            assert get(tokens.mint(pull, issuer="another-issuer")) == 401
            # Anonymous tokens carry no push: an upload is refused for its scope.
            resp = request(
                registry.url,
                "POST",
                "/v2/owner/img/blobs/uploads/",
                headers={"Authorization": f"Bearer {tokens.mint(pull)}"},
            )
            assert resp.status == 401
            _, params = parse_challenge(resp.header("WWW-Authenticate") or "")
            # (distribution orders the actions at random: pull,push or push,pull)
            kind, name, actions = params.get("scope", "").split(":")
            assert (kind, name, set(actions.split(","))) == (
                "repository",
                "owner/img",
                {"pull", "push"},
            )
            assert params.get("error") == "insufficient_scope"


def test_token_server_protocol_upstream_directly(tmp_path: Path) -> None:
    with TokenServer(tmp_path, users={USER: PASSWORD}, anonymous=False, expires_in=2) as tokens:
        params = {"realm": tokens.realm, "service": tokens.service}
        doc = fetch_token(
            params, username=USER, password=PASSWORD, scope="repository:a/b:pull,push"
        )
        assert doc["token"] == doc["access_token"]
        assert doc["expires_in"] == 2 and "issued_at" in doc
        claims = decode_jwt_claims(doc["token"])
        assert claims["sub"] == USER
        assert claims["exp"] - claims["iat"] == 2
        assert claims["access"] == [
            {"type": "repository", "name": "a/b", "actions": ["pull", "push"]}
        ]
        with pytest.raises(AssertionError, match="401"):
            fetch_token(params, scope="repository:a/b:pull")  # anonymous refused
        with pytest.raises(AssertionError, match="401"):
            fetch_token(params, username=USER, password="wrong", scope="repository:a/b:pull")
        with pytest.raises(AssertionError, match="400"):
            fetch_token({**params, "service": "elsewhere"}, username=USER, password=PASSWORD)
        # Several scopes, names with a port, and no expires_in when told so.
        tokens.expires_in = None
        doc = fetch_token(
            params,
            username=USER,
            password=PASSWORD,
            scope="repository:x:pull repository:host:5000/y:pull",
        )
        assert "expires_in" not in doc
        assert [a["name"] for a in decode_jwt_claims(doc["token"])["access"]] == [
            "x",
            "host:5000/y",
        ]
        assert tokens.count_requests() == 2
        assert tokens.count_requests(granted_only=False) == 5
        assert tokens.count_requests("repository:a/b:pull,push") == 1
        assert [r.had_authorization for r in tokens.requests] == [True, False, True, True, True]


def test_redirecting_registry_sends_blob_reads_to_the_blob_host_upstream_directly(
    tmp_path: Path, integration_tools: dict[str, str]
) -> None:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {USER: PASSWORD})
    registry = UpstreamRegistry(tmp_path / "registry")
    with BlobHost(registry.root) as blob_host:
        assert blob_host.url.startswith("http://127.0.0.2:")
        registry.extra_config = {
            **htpasswd_config(htpasswd),
            **redirect_config(blob_host.url),
        }
        with registry:
            image = oci_image("redirected/app", "1.0", layer_sizes=(80_000,))
            push_image(registry.url, image, username=USER, password=PASSWORD)
            blob = image.manifest.layers[0]
            auth = {"Authorization": basic_auth(USER, PASSWORD)}
            path = f"/v2/{image.name}/blobs/{blob.digest}"
            assert request(registry.url, "GET", path).status == 401
            resp = request(registry.url, "GET", path, headers=auth)
            assert resp.status == 307
            location = resp.header("Location") or ""
            assert location.startswith(blob_host.url + "/docker/registry/v2/blobs/sha256/")
            got = request(blob_host.url, "GET", location.removeprefix(blob_host.url))
            assert (got.status, got.body) == (200, blob.data)
            # HEAD is redirected too.
            assert request(registry.url, "HEAD", path, headers=auth).status == 307

            # A real client follows the redirects, and does not take the credentials along.
            before = blob_host.count_requests("GET")
            skopeo_copy(image.ref(registry.host), tmp_path / "d", creds=f"{USER}:{PASSWORD}")
            verify_dir(tmp_path / "d", image)
            assert blob_host.count_requests("GET") >= before + len(image.blobs())
            assert blob_host.requests_with_authorization() == []
            # ...and the blob host would notice if it did.
            request(blob_host.url, "GET", location.removeprefix(blob_host.url), headers=auth)
            assert len(blob_host.requests_with_authorization()) == 1
            assert request(blob_host.url, "GET", "/../../etc/passwd").status == 404


def test_reverse_proxy_passes_through_and_rate_limits_upstream_directly(
    upstream: UpstreamRegistry, images: dict[str, Image], tmp_path: Path
) -> None:
    image = images["oci"]
    headers = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "97;w=21600"}
    with ReverseProxy(upstream.url, response_headers=headers) as proxy:
        skopeo_copy(image.ref(proxy.host), tmp_path / "d")
        verify_dir(tmp_path / "d", image)
        path = f"/v2/{image.name}/manifests/{image.tag}"
        resp = request(proxy.url, "GET", path, headers={"Accept": ACCEPT_MANIFESTS})
        assert resp.status == 200 and resp.body == image.manifest.data
        assert resp.header("ratelimit-remaining") == "97;w=21600"
        resp = request(proxy.url, "HEAD", path, headers={"Accept": ACCEPT_MANIFESTS})
        assert resp.status == 200
        assert resp.header("Content-Length") == str(image.manifest.size)
        assert resp.header("Docker-Content-Digest") == image.digest

        upstream.wait_for_requests("HEAD", path)
        seen = upstream.count_requests(None, path)
        proxy.rate_limit(retry_after=7)
        for method in ("GET", "HEAD"):
            resp = request(proxy.url, method, path, headers={"Accept": ACCEPT_MANIFESTS})
            assert resp.status == 429
            assert resp.header("Retry-After") == "7"
            assert resp.header("ratelimit-remaining") == "97;w=21600"
        resp = request(proxy.url, "GET", path)
        assert resp.error_codes() == ["TOOMANYREQUESTS"]
        assert proxy.count_requests(rate_limited=True) == 3
        proxy.rate_limit(retry_after=7, methods=["GET"])
        assert request(proxy.url, "HEAD", path, headers={"Accept": ACCEPT_MANIFESTS}).status == 200
        proxy.pass_through()
        assert request(proxy.url, "GET", path, headers={"Accept": ACCEPT_MANIFESTS}).status == 200
        upstream.wait_for_requests(None, path, at_least=seen + 2)
        assert upstream.count_requests(None, path) == seen + 2  # the 429s never got there


def test_black_hole_accepts_and_never_answers() -> None:
    with BlackHole() as hole:
        with socket.create_connection(("127.0.0.1", hole.port), timeout=2) as sock:
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(1)
            poll_until(lambda: hole.bytes_received > 0, 5, what="the request to arrive")
            assert hole.connections == 1
            hole.stop()
            sock.settimeout(5)
            try:
                assert sock.recv(1) == b""  # closed by stop()
            except ConnectionResetError:
                pass
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", hole.port), timeout=2).close()


def test_credential_helper_and_docker_config(tmp_path: Path) -> None:
    helper = CredentialHelper(tmp_path / "bin", "robot", "s3cret", servers=["127.0.0.1:5000"])
    proc = subprocess.run(
        [str(helper.path), "get"], input="127.0.0.1:5000\n", capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "ServerURL": "127.0.0.1:5000",
        "Username": "robot",
        "Secret": "s3cret",
    }
    proc = subprocess.run(
        [str(helper.path), "get"], input="ghcr.io", capture_output=True, text=True
    )
    assert proc.returncode == 1 and "not found" in proc.stdout
    assert helper.get_calls() == ["127.0.0.1:5000", "ghcr.io"]

    config = json.loads(write_docker_config(tmp_path / "a.json", {"h:1": ("u", "p:w")}).read_text())
    assert config == {"auths": {"h:1": {"auth": "dTpwOnc="}}}  # base64("u:p:w")
    config = json.loads(
        write_docker_config(tmp_path / "b.json", {"h:1": ("u", "p")}, form="fields").read_text()
    )
    assert config == {"auths": {"h:1": {"username": "u", "password": "p"}}}


def test_skopeo_pulls_through_a_registries_conf_mirror_with_a_path_upstream_directly(
    tmp_path: Path, integration_tools: dict[str, str]
) -> None:
    """What operators write for podman/CRI-O: the mirror location carries a path that
    selects the upstream. Here the "mirror" is a plain registry holding ``ghcr/...``."""
    with UpstreamRegistry(tmp_path / "registry") as registry:
        image = oci_image("owner/img", "1.0", layer_sizes=(40_000,))
        push_image(registry.url, image.with_name("ghcr/owner/img"))
        conf = write_registries_conf(
            tmp_path / "registries.conf",
            [
                RegistryEntry(
                    prefix="ghcr.io",
                    location=f"127.0.0.1:{free_port()}",  # nothing there: mirror or fail
                    mirrors=(f"{registry.host}/ghcr",),
                )
            ],
        )
        skopeo_copy("ghcr.io/owner/img:1.0", tmp_path / "d", registries_conf=conf)
        verify_dir(tmp_path / "d", image)
        registry.wait_for_requests("GET", "/v2/ghcr/owner/img/manifests/1.0")
        # Without the mirror entry the same reference goes to the (dead) location.
        bare = write_registries_conf(
            tmp_path / "bare.conf",
            [RegistryEntry(prefix="ghcr.io", location=f"127.0.0.1:{free_port()}")],
        )
        with pytest.raises(SkopeoError, match="connection refused"):
            skopeo_copy("ghcr.io/owner/img:1.0", tmp_path / "e", registries_conf=bare)


def test_mirror_passes_env_to_the_process(
    upstream: UpstreamRegistry, tmp_path: Path, integration_tools: dict[str, str]
) -> None:
    with Mirror(tmp_path, upstream.url, env={"REGMIRROR_TEST_SECRET": "from-env"}) as mirror:
        assert mirror.pid is not None
        environ = Path(f"/proc/{mirror.pid}/environ").read_bytes().split(b"\0")
        assert b"REGMIRROR_TEST_SECRET=from-env" in environ
        assert any(e.startswith(b"PATH=") for e in environ)  # added to, not replacing


def test_fixture_servers_stop_cleanly() -> None:
    proxy = ReverseProxy("http://127.0.0.1:9")
    proxy.start()
    port = proxy.port
    conn = socket.create_connection(("127.0.0.1", port), timeout=2)
    conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.settimeout(5)
    assert conn.recv(12).startswith(b"HTTP/1.1 502")  # keep-alive: the connection stays
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 5
    conn.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
