"""The upstream client without sockets: challenges, tokens, redirects, the breaker,
credential sources, and routing between upstreams."""

from __future__ import annotations

import base64
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from regmirror.config import UpstreamConfig, parse_config
from regmirror.domain.errors import NameUnknown, Unauthorized, Unavailable
from regmirror.fetch.inflight import LocalInFlight
from regmirror.mirror.cache import Cache
from regmirror.mirror.manifests import ManifestLRU
from regmirror.mirror.mirrors import Mirrors
from regmirror.storage.store import Store
from regmirror.upstream.bodies import read_limited
from regmirror.upstream.client import Upstream, parse_challenge
from regmirror.upstream.credentials import Credential, CredentialError, Credentials
from regmirror.upstream.remote import RemoteRegistry

T = SynchronousTestCase()


class AuthRegistry(Resource):
    """A registry behind Bearer (or Basic) auth, its token service, and a blob store on
    another host that it redirects to; every request is recorded."""

    isLeaf = True

    def __init__(self, scheme: str = "bearer", realm: str = "http://auth.example.test/token"):
        super().__init__()
        self.scheme = scheme
        self.realm = realm
        self.seen: list[tuple[str, str, str | None]] = []  # host, path, authorization
        self.tokens_issued = 0
        self.expires_in: int | None = 300
        self.fail = False

    def render(self, request: Request) -> bytes:
        host = (request.getHeader(b"host") or b"").decode()
        auth = request.getHeader(b"authorization")
        path = request.uri.decode()
        self.seen.append((host, path, auth.decode() if auth else None))
        if self.fail:
            request.setResponseCode(503)
            return b"down"
        if path.startswith("/token"):
            self.tokens_issued += 1
            body: dict[str, Any] = {"token": f"tok{self.tokens_issued}"}
            if self.expires_in is not None:
                body["expires_in"] = self.expires_in
            return json.dumps(body).encode()
        if host.startswith("blobs.other.test"):
            return b"blob bytes"
        expected = (
            f"Bearer tok{self.tokens_issued}"
            if self.scheme == "bearer"
            else "Basic " + base64.b64encode(b"user:secret").decode()
        )
        if auth is None or auth.decode() != expected:
            request.setResponseCode(401)
            challenge = (
                f'Bearer realm="{self.realm}",service="registry.example.test",'
                'scope="repository:a/b:pull,push",error="invalid_token"'
                if self.scheme == "bearer"
                else 'Basic realm="registry"'
            )
            request.setHeader(b"www-authenticate", challenge.encode())
            return b'{"errors":[{"code":"UNAUTHORIZED"}]}'
        if "/blobs/" in path:
            request.setResponseCode(307)
            request.setHeader(b"location", b"http://blobs.other.test/data/xyz")
            return b""
        return b"{}"


def upstream(
    registry: AuthRegistry, clock: Clock, username: str = "", password: str = "", **kw: Any
) -> Upstream:
    config = UpstreamConfig(
        name="registry.example.test",
        url="http://registry.example.test",
        username=username,
        password=password,
        docker_hub=False,
    )
    credentials = Credentials(config, clock=clock.seconds, run_in_thread=maybeDeferred)
    return Upstream(clock, config, client=StubTreq(registry), credentials=credentials, **kw)  # type: ignore[arg-type]


def get(up: Upstream, path: str = "/v2/a/b/manifests/1") -> Any:
    return T.successResultOf(Deferred.fromCoroutine(up.request("GET", path, "a/b")))


def test_challenge_parsing_with_commas_and_errors() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:samalba/my-app:pull,push",error="insufficient_scope"'
    )
    assert scheme == "bearer"
    assert params["scope"] == "repository:samalba/my-app:pull,push"
    assert params["error"] == "insufficient_scope"
    assert parse_challenge('Basic realm="a \\"quoted\\" realm"')[1]["realm"] == 'a "quoted" realm'


def test_bearer_token_is_fetched_for_pull_only_and_reused_per_scope() -> None:
    registry, clock = AuthRegistry(), Clock()
    up = upstream(registry, clock)
    assert get(up).code == 200
    assert get(up).code == 200
    assert registry.tokens_issued == 1
    token_requests = [p for _, p, _ in registry.seen if p.startswith("/token")]
    assert token_requests == [
        "/token?service=registry.example.test&scope=repository%3Aa%2Fb%3Apull"
    ]
    # One 401 to discover the challenge, then the token is sent up front.
    assert sum(1 for _, p, a in registry.seen if p.startswith("/v2") and a is None) == 1


def test_bearer_token_is_renewed_after_it_expires() -> None:
    registry, clock = AuthRegistry(), Clock()
    registry.expires_in = None  # the default lifetime: 60 s
    up = upstream(registry, clock)
    get(up)
    clock.advance(30)
    get(up)
    assert registry.tokens_issued == 1
    clock.advance(31)
    assert get(up).code == 200
    assert registry.tokens_issued == 2


def test_credentials_go_to_a_same_site_realm_only() -> None:
    registry, clock = AuthRegistry(), Clock()
    up = upstream(registry, clock, "user", "secret")
    get(up)
    token_auth = [a for _, p, a in registry.seen if p.startswith("/token")]
    assert token_auth == ["Basic " + base64.b64encode(b"user:secret").decode()]
    elsewhere = AuthRegistry(realm="http://tokens.elsewhere.test/token")
    up = upstream(elsewhere, clock, "user", "secret")
    get(up)
    assert [a for _, p, a in elsewhere.seen if p.startswith("/token")] == [None]


def test_basic_challenge_gets_the_configured_credentials() -> None:
    registry, clock = AuthRegistry("basic"), Clock()
    assert get(upstream(registry, clock, "user", "secret")).code == 200
    with pytest.raises(Unauthorized):
        _raise(upstream(AuthRegistry("basic"), clock))
    with pytest.raises(Unauthorized) as info:
        _raise(upstream(AuthRegistry("basic"), clock, "user", "wrong"))
    assert "refused the mirror's credentials" in info.value.message
    assert "wrong" not in info.value.message


def _raise(up: Upstream) -> None:
    failure = T.failureResultOf(Deferred.fromCoroutine(up.request("GET", "/v2/x/manifests/1", "x")))
    failure.raiseException()


def test_redirects_are_followed_without_credentials_to_another_host() -> None:
    registry, clock = AuthRegistry("basic"), Clock()
    up = upstream(registry, clock, "user", "secret")
    response = get(up, "/v2/a/b/blobs/sha256:" + "a" * 64)
    assert response.code == 200
    hosts = {h: a for h, _, a in registry.seen}
    assert hosts["blobs.other.test"] is None
    assert hosts["registry.example.test"] is not None


def test_circuit_breaker_opens_after_failures_and_closes_after_cooldown() -> None:
    registry, clock = AuthRegistry(), Clock()
    registry.fail = True
    up = upstream(registry, clock, breaker_failures=3, breaker_cooldown=30)
    for _ in range(3):
        assert get(up).code == 503
    asked = len(registry.seen)
    failure = T.failureResultOf(
        Deferred.fromCoroutine(up.request("GET", "/v2/a/b/manifests/1", "a/b"))
    )
    assert failure.check(Unavailable)
    assert len(registry.seen) == asked  # answered at once, upstream not asked
    registry.fail = False
    clock.advance(31)
    assert get(up).code == 200


def test_credentials_from_env_file_docker_config_and_helper(tmp_path: Path) -> None:
    def creds(**kw: Any) -> Credential | None:
        config = UpstreamConfig(
            name="r", url="https://registry.example.test", username=kw.pop("username", "u"),
            password="", docker_hub=False, **kw,
        )  # fmt: skip
        c = Credentials(
            config, clock=Clock().seconds, run_in_thread=maybeDeferred, environ={"PW": "from-env"}
        )
        results: list[Any] = []
        Deferred.fromCoroutine(c.get()).addBoth(results.append)
        if hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]  # type: ignore[no-any-return]

    assert creds(password_env="PW") == Credential("u", "from-env")
    with pytest.raises(CredentialError):
        creds(password_env="MISSING")
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    assert creds(password_file=str(secret)) == Credential("u", "from-file")
    config_json = tmp_path / "config.json"
    auth = base64.b64encode(b"dockeruser:dockerpass").decode()
    config_json.write_text(json.dumps({"auths": {"registry.example.test": {"auth": auth}}}))
    assert creds(docker_config=str(config_json)) == Credential("dockeruser", "dockerpass")
    helper = tmp_path / "docker-credential-test"
    helper.write_text(
        f"#!{sys.executable}\nimport sys, json\nserver = sys.stdin.read()\n"
        "print(json.dumps({'Username': 'helper:' + server, 'Secret': 's3'}))\n"
    )
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    found = creds(helper_command=str(helper), helper_lifetime=60)
    assert found == Credential("helper:registry.example.test", "s3")
    assert "s3" not in repr(found) and "from-env" not in repr(creds(password_env="PW"))
    os.unlink(secret)
    with pytest.raises(CredentialError) as info:
        creds(password_file=str(secret))
    assert "from-file" not in str(info.value)


def test_requests_are_routed_by_ns_then_prefix_then_default(tmp_path: Path) -> None:
    store = Store(tmp_path)
    clock = Clock()
    inflight = LocalInFlight()

    def cache(name: str, aliases: tuple[str, ...] = ()) -> Cache:
        config = UpstreamConfig(name=name, url=f"https://{name}", username="", password="",
                                docker_hub=False, aliases=aliases)  # fmt: skip
        upstream = Upstream(clock, config, client=StubTreq(Resource()))  # type: ignore[arg-type]
        return Cache(clock, store, RemoteRegistry(upstream, clock), inflight=inflight,  # type: ignore[arg-type]
                     lru=ManifestLRU())  # fmt: skip

    hub, ghcr = cache("docker.io"), cache("ghcr.io", ("ghcr",))
    mirrors = Mirrors([hub, ghcr])
    assert mirrors.pick("owner/img", "ghcr.io") == (ghcr, "owner/img")
    assert mirrors.pick("ghcr.io/owner/img") == (ghcr, "owner/img")
    assert mirrors.pick("ghcr/owner/img") == (ghcr, "owner/img")
    assert mirrors.pick("library/alpine") == (hub, "library/alpine")
    assert mirrors.pick("ghcr.io") == (hub, "ghcr.io")  # a name, not a prefix
    with pytest.raises(NameUnknown) as info:
        mirrors.pick("x/y", "quay.io")
    assert "quay.io" in info.value.message


def _mirrors(tmp_path: Path, *specs: tuple[str, str], single: bool = False) -> Mirrors:
    """Mirrors over upstreams given as (name, url)."""
    store = Store(tmp_path)
    clock = Clock()
    inflight, lru = LocalInFlight(), ManifestLRU()
    caches = []
    for name, url in specs:
        hub = "docker.io" in url
        config = UpstreamConfig(name=name, url=url, username="", password="", docker_hub=hub)
        upstream = Upstream(clock, config, client=StubTreq(Resource()))  # type: ignore[arg-type]
        remote = RemoteRegistry(upstream, clock)
        caches.append(Cache(clock, store, remote, inflight=inflight, lru=lru))  # type: ignore[arg-type]
    return Mirrors(caches, single=single)


def test_one_private_upstream_serves_every_ns_as_registry2_does(tmp_path: Path) -> None:
    mirrors = _mirrors(tmp_path, ("127.0.0.1:5001", "http://127.0.0.1:5001"), single=True)
    only = mirrors.default
    for ns in ("docker.io", "ghcr.io", "docker.io", "registry.example.com:5000"):
        assert mirrors.pick("library/alpine", ns) == (only, "library/alpine")
    assert mirrors.pick("x/y", "127.0.0.1:5001") == (only, "x/y")  # its own name
    assert mirrors.stats["ns_served"] == 4
    assert mirrors.stats["ns_refused"] == 0


def test_one_public_upstream_refuses_another_registrys_ns(tmp_path: Path) -> None:
    mirrors = _mirrors(tmp_path, ("docker.io", "https://registry-1.docker.io"), single=True)
    hub = mirrors.default
    for ns in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        assert mirrors.pick("library/alpine", ns) == (hub, "library/alpine")
    for ns in ("ghcr.io", "quay.io"):
        with pytest.raises(NameUnknown) as info:
            mirrors.pick("owner/image", ns)
        assert ns in info.value.message
    assert mirrors.stats["ns_refused"] == 2
    ghcr = _mirrors(tmp_path, ("ghcr.io", "https://ghcr.io"), single=True)
    assert ghcr.pick("owner/image", "ghcr.io")[0] is ghcr.default
    with pytest.raises(NameUnknown):
        ghcr.pick("owner/image", "docker.io")


def test_several_upstreams_refuse_an_unknown_ns_even_if_one_is_private(tmp_path: Path) -> None:
    mirrors = _mirrors(
        tmp_path,
        ("registry.corp:5000", "http://registry.corp:5000"),
        ("ghcr.io", "https://ghcr.io"),
    )
    assert mirrors.pick("a/b", "registry.corp:5000")[0] is mirrors.default
    with pytest.raises(NameUnknown):
        mirrors.pick("a/b", "docker.io")
    # Configured through regmirror.upstreams (not "single"): no registry:2 leniency either.
    one = _mirrors(tmp_path, ("registry.corp:5000", "http://registry.corp:5000"), single=False)
    with pytest.raises(NameUnknown):
        one.pick("a/b", "docker.io")
    assert mirrors.stats["ns_refused"] == 1 and one.stats["ns_refused"] == 1


def test_single_upstream_is_only_proxy_remoteurl() -> None:
    only = parse_config({"proxy": {"remoteurl": "http://127.0.0.1:5001"}})[0]
    assert only.single_upstream
    listed = parse_config(
        {
            "proxy": {"remoteurl": "http://127.0.0.1:5001"},
            "regmirror": {"upstreams": [{"name": "127.0.0.1:5001", "aliases": ["corp"]}]},
        }
    )[0]
    assert len(listed.upstreams) == 1 and not listed.single_upstream


def test_upstream_header_timeout_is_separate_and_bounded_by_the_read_timeout() -> None:
    assert parse_config({})[0].upstream_header_timeout == 15.0
    config = UpstreamConfig(name="u", url="http://u", username="", password="", docker_hub=False)
    clock = Clock()
    client = StubTreq(Resource())
    assert Upstream(clock, config, client=client)._header_timeout == 15.0  # type: ignore[arg-type]
    short = Upstream(clock, config, client=client, read_timeout=1.0)  # type: ignore[arg-type]
    assert short._header_timeout == 1.0


def test_a_manifest_body_that_stops_arriving_is_cut_after_the_read_timeout() -> None:
    clock = Clock()

    class Transport:
        stopped = False

        def stopProducing(self) -> None:
            self.stopped = True

    class Response:
        protocol: Any = None

        def deliverBody(self, protocol: Any) -> None:
            self.protocol = protocol

    response = Response()
    d = Deferred.fromCoroutine(read_limited(response, 1024, clock, 60.0))  # type: ignore[arg-type]
    transport = Transport()
    response.protocol.makeConnection(transport)
    response.protocol.dataReceived(b"{")
    clock.advance(59)
    response.protocol.dataReceived(b'"a"')  # data resets the idle timer
    clock.advance(59)
    assert not transport.stopped
    clock.advance(1)
    assert transport.stopped
    response.protocol.connectionLost(Failure(ConnectionLost()))
    failure = T.failureResultOf(d, Unavailable)
    assert "stopped sending" in failure.value.message
    assert not clock.getDelayedCalls()
