"""Client authentication, access rules, listener limits and TLS files, without sockets."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bcrypt
import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from regmirror.api.access import Access, AccessRules
from regmirror.api.auth import ClientAuth, Htpasswd, check_password, parse_basic
from regmirror.api.stall import StallTimer
from regmirror.app.listeners import check_files
from regmirror.config import ConfigError, Limits, TLSConfig, UpstreamConfig, parse_config
from regmirror.domain.names import normalize_docker_hub
from regmirror.http.site import RegistrySite
from regmirror.http.tls import ServerTLS, TLSError
from regmirror.mirror.mirrors import Mirrors
from tests.support.certs import CA
from tests.unit.test_cache_web import Harness, error_code, header

PASSWORD = "correct horse battery staple"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def hash_password(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()


def write_htpasswd(path: Path, users: dict[str, str]) -> None:
    lines = [
        f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}" for u, p in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")


class CountingVerify:
    """``verify`` that runs bcrypt inline and counts the runs (or holds them)."""

    def __init__(self) -> None:
        self.calls = 0
        self.held: list[tuple[Deferred[bool], bytes, bytes]] = []
        self.hold = False

    def __call__(self, password: bytes, hashed: bytes) -> Deferred[bool]:
        self.calls += 1
        if self.hold:
            d: Deferred[bool] = Deferred()
            self.held.append((d, password, hashed))
            return d
        return succeed(check_password(password, hashed))

    def release(self) -> None:
        held, self.held = self.held, []
        for d, password, hashed in held:
            d.callback(check_password(password, hashed))


def result(value: Any) -> Any:
    if isinstance(value, Deferred):
        return SynchronousTestCase().successResultOf(value)
    return value


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    write_htpasswd(path, {"alice": PASSWORD, "bob": "hunter2"})
    return path


# -- htpasswd ---------------------------------------------------------------------------


def test_htpasswd_accepts_bcrypt_users_and_refuses_everyone_else(users: Path) -> None:
    h = Htpasswd(str(users), Clock())
    h.load()
    assert result(h.authenticate(basic("alice", PASSWORD).encode())) == "alice"
    assert result(h.authenticate(basic("alice", "wrong").encode())) is None
    assert result(h.authenticate(basic("mallory", PASSWORD).encode())) is None
    assert result(h.authenticate(None)) is None
    assert result(h.authenticate(b"Bearer abc")) is None
    assert result(h.authenticate(b"Basic !!!notbase64")) is None


def test_a_verified_header_costs_one_bcrypt_run_until_the_file_changes(users: Path) -> None:
    clock = Clock()
    verify = CountingVerify()
    h = Htpasswd(str(users), clock, verify)
    h.load()
    header_ = basic("alice", PASSWORD).encode()
    for _ in range(50):
        assert result(h.authenticate(header_)) == "alice"
    assert verify.calls == 1
    # The file changes: alice's password is not the same any more.
    write_htpasswd(users, {"alice": "new password"})
    os.utime(users, ns=(1, 1))  # a different mtime even within the same second
    assert result(h.authenticate(header_)) == "alice"  # not looked at within a second
    clock.advance(1.5)
    assert result(h.authenticate(header_)) is None
    assert result(h.authenticate(basic("alice", "new password").encode())) == "alice"


def test_concurrent_checks_of_one_header_share_one_bcrypt_run(users: Path) -> None:
    verify = CountingVerify()
    verify.hold = True
    h = Htpasswd(str(users), Clock(), verify)
    h.load()
    header_ = basic("bob", "hunter2").encode()
    waiting = [h.authenticate(header_) for _ in range(10)]
    assert all(isinstance(d, Deferred) for d in waiting)
    assert verify.calls == 1
    verify.release()
    assert [result(d) for d in waiting] == ["bob"] * 10


def test_a_failed_header_is_refused_without_bcrypt_for_a_while(users: Path) -> None:
    clock = Clock()
    verify = CountingVerify()
    h = Htpasswd(str(users), clock, verify)
    h.load()
    bad = basic("alice", "guess").encode()
    for _ in range(20):
        assert result(h.authenticate(bad)) is None
    assert verify.calls == 1
    clock.advance(10)
    assert result(h.authenticate(bad)) is None
    assert verify.calls == 2


def test_an_unreadable_file_at_reload_keeps_the_users(users: Path) -> None:
    clock = Clock()
    h = Htpasswd(str(users), clock)
    h.load()
    users.write_text("no colon here\n")
    clock.advance(2)
    assert result(h.authenticate(basic("alice", PASSWORD).encode())) == "alice"
    assert h.users == {"alice", "bob"}


def test_non_bcrypt_entries_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(
        "old:$apr1$abc$def\n# comment\n\nnew:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    )
    h = Htpasswd(str(path), Clock())
    h.load()
    assert h.users == {"new"}
    assert result(h.authenticate(basic("old", "whatever").encode())) is None


def test_parse_basic() -> None:
    assert parse_basic(basic("u", "p:with:colons").encode()) == ("u", b"p:with:colons")
    assert parse_basic(b"basic " + base64.b64encode(b"nocolon")) is None
    assert parse_basic(b"Basic") is None


# -- the API with authentication and access rules --------------------------------------


class AuthHarness(Harness):
    def __init__(self, tmp_path: Path, users: Path, *, anonymous: bool = False, **rules: Any):
        super().__init__(tmp_path / "store")
        self.htpasswd = Htpasswd(str(users), self.clock)
        self.htpasswd.load()
        auth = ClientAuth(self.htpasswd, 'Registry "Realm"', anonymous_read=anonymous)
        self.serve(auth=auth, access=AccessRules(**rules))


def test_without_credentials_everything_under_v2_is_401_with_a_basic_challenge(
    tmp_path: Path, users: Path
) -> None:
    h = AuthHarness(tmp_path, users)
    for path in ("/v2/", "/v2/a/manifests/latest", "/v2/_catalog", "/v2/BAD/tags/list"):
        response, body = h.request("GET", path)
        assert response.code == 401, path
        assert header(response, "www-authenticate") == 'Basic realm="Registry \\"Realm\\""'
        assert error_code(body) == "UNAUTHORIZED"
    response, body = h.request("GET", "/v2/", headers={"Authorization": basic("alice", "nope")})
    assert response.code == 401 and error_code(body) == "UNAUTHORIZED"
    assert h.upstream.requests == {}


def test_with_credentials_the_mirror_answers(tmp_path: Path, users: Path) -> None:
    h = AuthHarness(tmp_path, users)
    h.manifest("team/app", "1.0")
    auth = {"Authorization": basic("alice", PASSWORD)}
    response, _ = h.request("GET", "/v2/", headers=auth)
    assert response.code == 200
    response, _ = h.request("GET", "/v2/team/app/manifests/1.0", headers=auth)
    assert response.code == 200


def test_anonymous_read_lets_clients_without_credentials_pull(tmp_path: Path, users: Path) -> None:
    h = AuthHarness(tmp_path, users, anonymous=True)
    h.manifest("team/app", "1.0")
    response, _ = h.request("GET", "/v2/team/app/manifests/1.0")
    assert response.code == 200
    # Wrong credentials are still wrong.
    response, body = h.request(
        "GET", "/v2/team/app/manifests/1.0", headers={"Authorization": basic("alice", "x")}
    )
    assert response.code == 401 and error_code(body) == "UNAUTHORIZED"


def test_denied_repositories_get_403_and_cause_no_upstream_traffic(
    tmp_path: Path, users: Path
) -> None:
    h = AuthHarness(
        tmp_path, users, anonymous=True, allow=("library/*", "myorg/*"), deny=("myorg/secret*",)
    )
    h.manifest("myorg/app", "1")
    h.manifest("myorg/secret-app", "1")
    h.manifest("other/app", "1")
    response, _ = h.request("GET", "/v2/myorg/app/manifests/1")
    assert response.code == 200
    for path in (
        "/v2/myorg/secret-app/manifests/1",
        "/v2/other/app/manifests/1",
        "/v2/other/app/tags/list",
        "/v2/other/app/blobs/sha256:" + "a" * 64,
    ):
        before = sum(h.upstream.requests.values())
        response, body = h.request("GET", path)
        assert response.code == 403, path
        assert error_code(body) == "DENIED"
        assert sum(h.upstream.requests.values()) == before, path


def test_access_patterns_match_the_upstream_name_and_prefixed_forms(tmp_path: Path) -> None:
    rules = AccessRules(allow=("up/team/*",))
    assert rules.allows(("team/app", "team/app", "up/team/app"))
    assert not rules.allows(("x/app", "x/app", "up/x/app"))
    hub = AccessRules(allow=("library/*",), deny=("library/evil",))
    assert hub.allows(("alpine", "library/alpine"))
    assert not hub.allows(("evil", "library/evil"))


def test_the_catalog_lists_only_allowed_repositories(tmp_path: Path) -> None:
    h = Harness(tmp_path, hub=True)
    access = Access(AccessRules(allow=("library/*", "up/ok/*")), Mirrors([h.cache]))
    body = json.dumps({"repositories": ["alpine", "ok/a", "no/b"]}).encode()
    assert json.loads(access.filter_catalog(body))["repositories"] == ["alpine", "ok/a"]


class NamedUpstream:
    """What routing and the access rules read of an upstream: its names."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.name = config.name
        self.config = config

    def repository(self, name: str) -> str:
        return normalize_docker_hub(name) if self.config.docker_hub else name


def upstream_named(name: str, url: str, *, hub: bool = False, aliases: tuple[str, ...] = ()) -> Any:
    config = UpstreamConfig(name, url, "", "", hub, aliases)
    return SimpleNamespace(upstream=NamedUpstream(config), inflight=None)


def test_the_catalog_checks_each_entry_with_the_naming_of_its_upstream() -> None:
    mirrors = Mirrors(
        [
            upstream_named("docker.io", "https://registry-1.docker.io", hub=True),
            upstream_named("ghcr.io", "https://ghcr.io", aliases=("ghcr",)),
        ]
    )
    body = json.dumps(
        {"repositories": ["alpine", "ghcr.io/owner/app", "ghcr.io/other/app", "team/app"]}
    ).encode()

    def listed(**rules: tuple[str, ...]) -> list[str]:
        filtered = Access(AccessRules(**rules), mirrors).filter_catalog(body)
        return list(json.loads(filtered)["repositories"])

    # "owner/*" is ghcr.io's own name for ghcr.io/owner/app, as a pull of it is checked.
    assert listed(allow=("library/*", "owner/*")) == ["alpine", "ghcr.io/owner/app"]
    # Docker Hub's prefixed names are not ghcr.io's.
    assert listed(deny=("docker.io/*",)) == ["ghcr.io/owner/app", "ghcr.io/other/app"]
    assert listed(deny=("ghcr.io/other/*",)) == ["alpine", "ghcr.io/owner/app", "team/app"]


# -- listener limits --------------------------------------------------------------------


def channel(limits: Limits, *, tls: bool = False, clock: Clock | None = None) -> tuple[Any, Any]:
    site = RegistrySite(Resource(), limits=limits, tls=tls, reactor=clock or Clock())
    proto = site.buildProtocol(None)
    if clock is not None:
        proto.callLater = clock.callLater
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def response_of(transport: StringTransport) -> tuple[int, dict[str, str], Any]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return status, {k.lower(): v for k, v in headers.items()}, json.loads(body) if body else None


def test_a_long_url_gets_414_with_a_json_error(tmp_path: Path) -> None:
    proto, transport = channel(Limits(max_url_length=100))
    proto.dataReceived(b"GET /v2/" + b"a" * 200 + b"/manifests/x HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = response_of(transport)
    assert status == 414
    assert headers["content-type"] == "application/json"
    assert body["errors"][0]["code"] == "UNSUPPORTED"
    assert transport.disconnecting


def test_a_url_beyond_the_line_limit_gets_414_too(tmp_path: Path) -> None:
    proto, transport = channel(Limits(max_url_length=100, max_header_size=1024))
    proto.dataReceived(b"GET /v2/" + b"a" * 5000)
    assert response_of(transport)[0] == 414


def test_too_large_headers_get_431(tmp_path: Path) -> None:
    proto, transport = channel(Limits(max_header_size=1024))
    proto.dataReceived(b"GET /v2/ HTTP/1.1\r\nX-Big: " + b"b" * 2000 + b"\r\n\r\n")
    assert response_of(transport)[0] == 431


def test_too_many_headers_get_400(tmp_path: Path) -> None:
    proto, transport = channel(Limits(max_headers=5))
    lines = b"".join(b"X-%d: y\r\n" % i for i in range(10))
    proto.dataReceived(b"GET /v2/ HTTP/1.1\r\n" + lines + b"\r\n")
    status, _, body = response_of(transport)
    assert status == 400 and body["errors"][0]["code"] == "UNSUPPORTED"


def test_a_request_head_trickled_slowly_is_cut_after_the_header_timeout() -> None:
    clock = Clock()
    proto, transport = channel(Limits(header_timeout=10, idle_timeout=60), clock=clock)
    proto.dataReceived(b"GET /v2/ HTTP/1.1\r\n")
    for _ in range(5):
        clock.advance(3)
        proto.dataReceived(b"X-A: b\r\n")  # each byte resets the idle timeout, not this one
        if transport.value():
            break
    assert response_of(transport)[0] == 408
    assert transport.disconnecting


def test_a_tls_handshake_on_the_plain_port_is_answered_but_not_on_a_tls_listener() -> None:
    proto, transport = channel(Limits())
    proto.dataReceived(b"\x16\x03\x01\x02\x00\x01")
    assert transport.value().startswith(b"HTTP/1.0 400 Bad Request")
    proto, transport = channel(Limits(), tls=True)
    proto.dataReceived(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 404")


def test_a_stalled_client_is_cut_after_the_idle_timeout_only_while_paused() -> None:
    clock = Clock()
    stalls: list[bool] = []
    timer = StallTimer(clock, 60, lambda: stalls.append(True))
    for _ in range(100):  # a busy transfer: paused and resumed all the time
        timer.paused()
        clock.advance(1)
        timer.resumed()
    assert stalls == [] and len(clock.getDelayedCalls()) <= 1
    timer.paused()
    clock.advance(59)
    assert stalls == []
    clock.advance(61)
    assert stalls == [True]
    timer.stop()
    assert clock.getDelayedCalls() == []


# -- configuration and files -----------------------------------------------------------


def test_tls_and_auth_config_keys() -> None:
    config, warnings = parse_config(
        {
            "http": {"tls": {"certificate": "c.pem", "key": "k.pem", "clientcas": ["ca.pem"]}},
            "auth": {"htpasswd": {"path": "/etc/htpasswd", "realm": "r"}, "anonymous": "read"},
            "regmirror": {"access": {"allow": ["library/*"], "deny": "library/bad"}},
        }
    )
    assert config.tls == TLSConfig("c.pem", "k.pem", ("ca.pem",))
    assert config.auth is not None and config.auth.anonymous_read
    assert config.access.deny == ("library/bad",)
    assert warnings == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"http": {"tls": {"certificate": "c"}}}, "c.yml: http.tls.key: TLS needs both"),
        ({"http": {"tls": {"clientcas": ["x"]}}}, "c.yml: http.tls.clientcas: needs"),
        ({"auth": {"anonymous": "read"}}, "c.yml: auth.anonymous: needs auth.htpasswd.path"),
        ({"auth": {"anonymous": "write"}}, "c.yml: auth.anonymous: expected one of"),
        ({"regmirror": {"access": {"allow": [1]}}}, "c.yml: regmirror.access.allow: expected"),
        ({"http": {"tls": {"minimumtls": "ssl3"}}}, "c.yml: http.tls.minimumtls: expected"),
    ],
)
def test_bad_security_configs_stop_with_one_line(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "c.yml")
    assert str(info.value).startswith(message)


def test_a_token_auth_config_warns_that_clients_are_not_authenticated() -> None:
    _, warnings = parse_config({"auth": {"token": {"realm": "https://auth"}}})
    assert any("NOT authenticated" in w for w in warnings)


def test_tls_files_are_checked_at_start_up(tmp_path: Path) -> None:
    ca = CA()
    server = ca.issue("mirror").write(tmp_path, "server")
    other = ca.issue("other").write(tmp_path, "other")
    assert server.cert_path and server.key_path and other.key_path
    config, _ = parse_config(
        {"http": {"tls": {"certificate": str(server.cert_path), "key": str(server.key_path)}}},
        "c.yml",
    )
    assert isinstance(check_files(config), ServerTLS)
    for cert, key, problem in [
        (tmp_path / "missing.crt", server.key_path, "cannot read the certificate"),
        (server.key_path, server.key_path, "no PEM certificate"),
        (server.cert_path, other.key_path, "does not match"),
        (server.cert_path, server.cert_path, "not a PEM private key"),
    ]:
        config, _ = parse_config(
            {"http": {"tls": {"certificate": str(cert), "key": str(key)}}}, "c.yml"
        )
        with pytest.raises(ConfigError, match=problem) as info:
            check_files(config)
        assert str(info.value).startswith("c.yml: http.tls: ")


def test_the_upstream_ca_bundle_is_checked_at_start_up(tmp_path: Path) -> None:
    from regmirror.http.tls import upstream_trust_root

    bundle = tmp_path / "cas.pem"
    bundle.write_bytes(CA("one").cert_pem + CA("two").cert_pem)
    assert upstream_trust_root(str(bundle)) is not None
    assert upstream_trust_root("") is None
    for path, problem in [
        (tmp_path / "missing.pem", "cannot read the upstream CA bundle"),
        (tmp_path / "empty.pem", "no PEM certificate"),
    ]:
        (tmp_path / "empty.pem").write_text("nothing here\n")
        config, _ = parse_config({"regmirror": {"upstream_ca": str(path)}}, "c.yml")
        with pytest.raises(ConfigError, match=problem) as info:
            check_files(config)
        assert str(info.value).startswith("c.yml: regmirror.upstream_ca: ")


def test_a_failed_tls_reload_keeps_the_old_certificate(tmp_path: Path) -> None:
    ca = CA()
    first = ca.issue("first").write(tmp_path, "server")
    assert first.cert_path and first.key_path
    tls = ServerTLS(TLSConfig(str(first.cert_path), str(first.key_path)))
    old = tls.description
    first.cert_path.write_text("garbage")
    assert not tls.reload()
    assert tls.description == old
    ca.issue("second").write(tmp_path, "server")
    assert tls.reload()
    assert "CN=second" in tls.description
    # A chain (leaf + CA) in the certificate file is accepted.
    leaf = ca.issue("chained").write(tmp_path, "server", chain=ca.cert_pem)
    assert leaf.cert_path
    assert tls.reload() and "CN=chained" in tls.description


def test_tls_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(TLSError, match=str(tmp_path / "nope.crt")):
        ServerTLS(TLSConfig(str(tmp_path / "nope.crt"), str(tmp_path / "nope.key")))


def test_large_writes_over_tls_arrive_intact_and_in_order(tmp_path: Path) -> None:
    """The bulk TLS transport (one SSL_write per chunk, one BIO read) against a real
    TLS client in memory: chunks of many sizes, as a blob sender writes them."""
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.ssl import Certificate, optionsForClientTLS
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from twisted.test.iosim import connectedServerAndClient

    from regmirror.http.tls import TLSFactory

    ca = CA()
    server_files = ca.issue("mirror", dns=("mirror.test",)).write(tmp_path, "server")
    assert server_files.cert_path and server_files.key_path
    tls = ServerTLS(TLSConfig(str(server_files.cert_path), str(server_files.key_path)))
    chunks = [os.urandom(n) for n in (1, 100, 16384, 16385, 65536, 262144, 262145, 1 << 20)]

    class Sender(Protocol):
        def connectionMade(self) -> None:
            for chunk in chunks:
                self.transport.write(chunk)  # type: ignore[union-attr]

    received: list[bytes] = []

    class Receiver(Protocol):
        def dataReceived(self, data: bytes) -> None:
            received.append(data)

    client_options = optionsForClientTLS("mirror.test", trustRoot=Certificate.loadPEM(ca.cert_pem))
    server_factory = TLSFactory(tls, Factory.forProtocol(Sender), Clock())
    client_factory = TLSMemoryBIOFactory(
        client_options, True, Factory.forProtocol(Receiver), Clock()
    )
    _, _, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
    )
    for _ in range(200):
        pump.pump()
        if sum(map(len, received)) >= sum(map(len, chunks)):
            break
    assert b"".join(received) == b"".join(chunks)
