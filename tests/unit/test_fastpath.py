"""The channel's fast path for cached manifests (regmirror.http.fastpath): for every
request, the bytes it sends (minus ``Date``) are those of the full path (the same site
with ``fast_path=False``), the same checks apply, the same counters move; and it answers
the cached manifests itself, without a ``Request`` or a Resource render."""

from __future__ import annotations

import base64
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher

from regmirror.api.access import AccessRules
from regmirror.api.auth import ClientAuth, Htpasswd
from regmirror.api.resource import RegistryAPI
from regmirror.config import Limits
from regmirror.domain.digest import Digest
from regmirror.http.fastpath import parse_head
from regmirror.http.site import RegistrySite, make_site
from tests.unit.test_cache_web import DOCKER, OCI, Harness

CLIENT = IPv4Address("TCP", "127.0.0.1", 40000)
SERVER = IPv4Address("TCP", "127.0.0.1", 5000)
PASSWORD = "s3cret"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Renders:
    """How many requests reached ``RegistryAPI.render`` (the full path)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        render = RegistryAPI.render

        def counting(api: RegistryAPI, request: Any) -> bytes | int:
            self.count += 1
            return render(api, request)

        monkeypatch.setattr(RegistryAPI, "render", counting)


@pytest.fixture
def renders(monkeypatch: pytest.MonkeyPatch) -> Renders:
    return Renders(monkeypatch)


class Exchange:
    """Raw bytes to a site's channel, the raw answer back (``Date`` blanked)."""

    def __init__(self, h: Harness, site: RegistrySite) -> None:
        self.h = h
        self.site = site
        self.channel = site.buildProtocol(CLIENT)
        self.transport = StringTransport(hostAddress=SERVER, peerAddress=CLIENT)
        self.channel.makeConnection(self.transport)

    def send(self, *chunks: bytes) -> bytes:
        for chunk in chunks:
            self.channel.dataReceived(chunk)
            self.h.pump()
        self.h.pump()
        out = self.transport.value()
        self.transport.clear()
        return re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", out)

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def close(self) -> None:
        self.channel.connectionLost(None)


class Twins:
    """Two mirrors with the same content, one served with the fast path, one without
    (each its own cache, so what one request changes in one does not change what the
    other answers)."""

    def __init__(self, tmp_path: Path) -> None:
        self.full_h = Harness(tmp_path / "full")
        self.fast_h = Harness(tmp_path / "fast")
        self.serve()
        self.fast_hits = 0  # of the last both()

    @property
    def harnesses(self) -> tuple[Harness, Harness]:
        return self.full_h, self.fast_h

    def each(self, setup: Callable[[Harness], Any]) -> Any:
        """``setup`` done to both mirrors; its answer (the same for both)."""
        answers = [setup(h) for h in self.harnesses]
        assert answers[0] == answers[1]
        return answers[0]

    def serve(self, site_args: Callable[[Harness], dict[str, Any]] = lambda h: {}) -> None:
        self.full = make_site(
            self.full_h.cache,
            reactor=MemoryReactorClock(),
            fast_path=False,
            **site_args(self.full_h),
        )
        self.fast = make_site(
            self.fast_h.cache, reactor=MemoryReactorClock(), **site_args(self.fast_h)
        )
        assert self.fast.fast is not None and self.full.fast is None

    def both(self, *chunks: bytes) -> tuple[bytes, bytes]:
        """Send ``chunks`` on a new connection to each site; check that both answered
        the same bytes, the same counters moved, and kept or closed the connection
        alike; return (the answer, how the connection ended)."""
        answers = []
        for h, site in ((self.full_h, self.full), (self.fast_h, self.fast)):
            before = Counter(h.cache.stats), Counter(site.responses)
            x = Exchange(h, site)
            out = x.send(*chunks)
            closed = x.closed
            x.close()
            moved = Counter(h.cache.stats) - before[0], Counter(site.responses) - before[1]
            self.fast_hits = moved[0].pop("manifest_fast_hits", 0)  # the fast site's only
            answers.append((out, closed, moved))
        assert answers[1] == answers[0]
        return answers[0][0], b"closed" if answers[0][1] else b"open"


def get(path: str, *headers: str, method: str = "GET", version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {path} {version}", "Host: mirror.test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture
def twins(tmp_path: Path) -> Twins:
    return Twins(tmp_path)


def _cache(h: Harness) -> str:
    digest = h.manifest("team/app", "1.0")
    response, _ = h.request("GET", "/v2/team/app/manifests/1.0", headers={"Accept": OCI})
    assert response.code == 200
    h.manifest("team/app", "2.0", extra="2")
    return digest


@pytest.fixture
def cached(twins: Twins) -> str:
    """A manifest by tag (1.0) and digest, both cached; 2.0 upstream only."""
    digest: str = twins.each(_cache)
    return digest


# -- the answers are the full path's -----------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("by", ["tag", "digest"])
@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0 keep-alive", "HTTP/1.0 Keep-Alive, x"])
def test_cached_manifests_are_answered_by_the_channel_with_the_full_paths_bytes(
    twins: Twins, cached: str, renders: Renders, method: str, by: str, version: str
) -> None:
    proto, _, keep = version.partition(" ")
    headers = [f"Accept: {OCI}"] + ([f"Connection: {keep}"] if keep else [])
    ref = "1.0" if by == "tag" else cached
    request = get(f"/v2/team/app/manifests/{ref}", *headers, method=method, version=proto)
    renders.count = 0
    answer, connection = twins.both(request, request)
    assert renders.count == 2  # the full site's; the fast site rendered nothing
    assert twins.fast_hits == 2  # and counted them
    assert connection == b"open"
    assert answer.count(f"{proto} 200 OK\r\n".encode()) == 2
    assert answer.count(b"X-Cache: HIT\r\n") == 2
    assert answer.count(b"Connection: Keep-Alive\r\n") == (2 if proto == "HTTP/1.0" else 0)
    manifest = twins.fast_h.cache.cached_manifest(Digest.parse(cached))
    assert manifest is not None
    assert answer.count(manifest.data) == (2 if method == "GET" else 0)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([f"Accept: {DOCKER}"], id="accept-not-the-cached-type"),
        pytest.param([f"Accept: {OCI}", f"Accept: {DOCKER}"], id="accept-twice"),
        pytest.param([f"Accept: {DOCKER}, {OCI};q=0.5"], id="accept-list"),
        pytest.param([], id="no-accept"),
        pytest.param(["Accept: */*"], id="accept-any"),
        pytest.param([f"Accept: {OCI}", 'If-None-Match: "{digest}"'], id="if-none-match"),
        pytest.param([f"Accept: {OCI}", "Connection: close"], id="connection-close"),
        pytest.param([f"Accept: {OCI}", "Content-Length: 0"], id="content-length"),
        pytest.param([f"Accept: {OCI}", "Expect: 100-continue"], id="expect"),
        pytest.param([f"Accept: {OCI}", " folded"], id="folded-header"),
        pytest.param([f"Accept: {OCI}", "bad header"], id="malformed-header"),
    ],
)
def test_requests_with_headers_the_fast_path_leaves_alone_get_the_same_answer(
    twins: Twins, cached: str, headers: list[str]
) -> None:
    lines = [line.replace("{digest}", cached) for line in headers]
    for ref in ("1.0", cached):
        twins.both(get(f"/v2/team/app/manifests/{ref}", *lines))


@pytest.mark.parametrize(
    "target",
    [
        "/v2/team/app/manifests/1.0?ns=up",
        "/v2/team/app/manifests/1.0?ns=elsewhere",
        "/v2/team/app/manifests/1.0?n=1&ns=up",
        "/v2/team/app/manifests/2.0",
        "/v2/team/app/manifests/sha256:" + "0" * 64,
        "/v2/team/other/manifests/1.0",
        "/v2/team/app/manifests/bad%20tag",
        "/v2/Team/app/manifests/1.0",
        "/v2/team/app/blobs/sha256:" + "0" * 64,
        "/v2/team/app/tags/list",
        "/v2/",
        "/v2/team/app/manifests/" + "a" * 9000,
    ],
)
def test_other_targets_get_the_same_answer(twins: Twins, cached: str, target: str) -> None:
    twins.both(get(target, f"Accept: {OCI}"))


def test_accept_in_several_headers_as_go_clients_send_it_is_answered_fast(
    twins: Twins, cached: str, renders: Renders
) -> None:
    renders.count = 0
    for first, second in ((DOCKER, OCI), (OCI, DOCKER)):
        answer, _ = twins.both(
            get(f"/v2/team/app/manifests/{cached}", f"Accept: {first}", f"Accept:  {second} ")
        )
        assert b" 200 OK" in answer
    assert renders.count == 2 and twins.fast_hits == 1


def test_connection_close_as_skopeo_sends_it_is_answered_fast_then_closed(
    twins: Twins, cached: str, renders: Renders
) -> None:
    request = get(f"/v2/team/app/manifests/{cached}", f"Accept: {OCI}", "Connection: close")
    renders.count = 0
    answer, connection = twins.both(request + request)  # the second one is dropped
    assert renders.count == 1 and twins.fast_hits == 1
    assert connection == b"closed" and answer.count(b" 200 OK") == 1
    assert answer.startswith(b"HTTP/1.1 200 OK\r\nConnection: close\r\nServer: ")


def test_query_ns_of_the_upstream_is_answered_fast(
    twins: Twins, cached: str, renders: Renders
) -> None:
    renders.count = 0
    answer, _ = twins.both(get("/v2/team/app/manifests/1.0?ns=up", f"Accept: {OCI}"))
    assert renders.count == 1 and b" 200 OK" in answer


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"GET /v2/team/app/manifests/1.0 HTTP/1.0\r\nAccept: */*\r\n\r\n", id="1.0"),
        pytest.param(b"GET /v2/team/app/manifests/1.0 HTTP/2.0\r\n\r\n", id="bad-version"),
        pytest.param(b"DELETE /v2/team/app/manifests/1.0 HTTP/1.1\r\n\r\n", id="delete"),
        pytest.param(b"GET  /v2/team/app/manifests/1.0 HTTP/1.1\r\n\r\n", id="two-spaces"),
        pytest.param(b"\r\nGET /v2/team/app/manifests/1.0 HTTP/1.1\r\n\r\n", id="blank-first"),
        pytest.param(b"GET /v2/team/app/manifests/1.0 HTTP/1.1\r\nX: \x00\r\n\r\n", id="nul"),
    ],
)
def test_odd_request_heads_get_the_same_answer(
    twins: Twins, cached: str, request_bytes: bytes
) -> None:
    twins.both(request_bytes)


def test_pipelined_requests_keep_their_order(twins: Twins, cached: str, renders: Renders) -> None:
    hit = get("/v2/team/app/manifests/1.0", f"Accept: {OCI}")
    miss = get("/v2/team/app/manifests/2.0", f"Accept: {OCI}")
    head = get(f"/v2/team/app/manifests/{cached}", method="HEAD")
    renders.count = 0
    answer, connection = twins.both(hit + hit + miss + hit + head)
    assert connection == b"open"
    assert renders.count == 5 + 3  # the full site all five; the fast one from the miss on
    assert answer.count(b"200 OK") == 5
    assert answer.index(b"X-Cache: MISS") < answer.rindex(b"X-Cache: HIT")
    # once 2.0 is cached, the same sequence is all fast
    renders.count = 0
    twins.both(hit + miss + head)
    assert renders.count == 3 and twins.fast_hits == 3


def test_a_head_split_over_reads_is_answered_the_same(twins: Twins, cached: str) -> None:
    request = get("/v2/team/app/manifests/1.0", f"Accept: {OCI}")
    twins.both(request[:20], request[20:])
    twins.both(request + request[:30], request[30:])


# -- the same checks ---------------------------------------------------------------


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    path.write_text(f"alice:{hashed}\n")
    return path


def auth_pair(twins: Twins, users: Path, *, anonymous: bool = False, **rules: Any) -> Twins:
    def site_args(h: Harness) -> dict[str, Any]:
        htpasswd = Htpasswd(str(users), h.clock)
        htpasswd.load()
        auth = ClientAuth(htpasswd, "regmirror", anonymous_read=anonymous)
        return {"auth": auth, "access": AccessRules(**rules)}

    twins.serve(site_args)
    return twins


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param([], id="none"),
        pytest.param([f"Authorization: {basic('alice', 'wrong')}"], id="wrong"),
        pytest.param([f"Authorization: {basic('bob', PASSWORD)}"], id="unknown-user"),
        pytest.param(["Authorization: Bearer abc"], id="bearer"),
        pytest.param(["Authorization: "], id="empty"),
    ],
)
def test_without_good_credentials_it_is_401_either_way(
    twins: Twins, cached: str, users: Path, credentials: list[str]
) -> None:
    auth_pair(twins, users)
    request = get("/v2/team/app/manifests/1.0", f"Accept: {OCI}", *credentials)
    answer, _ = twins.both(request, request)
    assert answer.count(b"401 Unauthorized") == 2


def test_good_credentials_are_answered_fast_once_verified(
    twins: Twins, cached: str, users: Path, renders: Renders
) -> None:
    auth_pair(twins, users)
    request = get(
        "/v2/team/app/manifests/1.0", f"Accept: {OCI}", f"Authorization: {basic('alice', PASSWORD)}"
    )
    renders.count = 0
    answer, _ = twins.both(request)  # the first one verifies the password (bcrypt)
    assert b" 200 OK" in answer and renders.count == 2
    renders.count = 0
    answer, _ = twins.both(request, request)
    assert answer.count(b" 200 OK") == 2 and renders.count == 2  # the full site's only


def test_a_user_removed_from_the_file_is_refused_by_the_fast_path_too(
    twins: Twins, cached: str, users: Path, renders: Renders
) -> None:
    auth_pair(twins, users)
    request = get(
        "/v2/team/app/manifests/1.0", f"Accept: {OCI}", f"Authorization: {basic('alice', PASSWORD)}"
    )
    twins.both(request)
    hashed = bcrypt.hashpw(b"other", bcrypt.gensalt(4)).decode()
    users.write_text(f"carol:{hashed}\n")
    twins.each(lambda h: h.clock.advance(2))  # past the file's check interval
    answer, _ = twins.both(request)
    assert b"401 Unauthorized" in answer


def test_anonymous_reads_are_answered_fast_where_allowed(
    twins: Twins, cached: str, users: Path, renders: Renders
) -> None:
    auth_pair(twins, users, anonymous=True)
    renders.count = 0
    answer, _ = twins.both(get("/v2/team/app/manifests/1.0", f"Accept: {OCI}"))
    assert b" 200 OK" in answer and renders.count == 1


@pytest.mark.parametrize("rules", [{"deny": ("team/*",)}, {"allow": ("other/*",)}])
def test_access_rules_deny_either_way(
    twins: Twins, cached: str, users: Path, rules: dict[str, Any]
) -> None:
    auth_pair(twins, users, anonymous=True, **rules)
    answer, _ = twins.both(get("/v2/team/app/manifests/1.0", f"Accept: {OCI}"))
    assert b"403 Forbidden" in answer


def test_allowed_names_are_answered_fast(
    twins: Twins, cached: str, users: Path, renders: Renders
) -> None:
    auth_pair(twins, users, anonymous=True, allow=("team/*",))
    renders.count = 0
    answer, _ = twins.both(get("/v2/team/app/manifests/1.0", f"Accept: {OCI}"))
    assert b" 200 OK" in answer and renders.count == 1


@pytest.mark.parametrize(
    ("limits", "extra"),
    [
        pytest.param(Limits(max_headers=3), ["A: 1", "B: 2", "C: 3"], id="too-many-headers"),
        pytest.param(Limits(max_header_size=200), ["A: " + "x" * 150], id="head-too-large"),
        pytest.param(Limits(max_url_length=20), [], id="url-too-long"),
    ],
)
def test_limits_apply_either_way(
    twins: Twins, cached: str, limits: Limits, extra: list[str]
) -> None:
    twins.serve(lambda h: {"limits": limits})
    answer, _ = twins.both(get("/v2/team/app/manifests/1.0", f"Accept: {OCI}", *extra))
    assert b" 200 OK" not in answer


def test_a_tag_past_its_freshness_goes_to_the_full_path(
    twins: Twins, cached: str, renders: Renders
) -> None:
    twins.each(lambda h: h.clock.advance(31))
    renders.count = 0
    answer, _ = twins.both(get("/v2/team/app/manifests/1.0", f"Accept: {OCI}"))
    assert b" 200 OK" in answer and renders.count == 2  # the fast site revalidated in full
    assert twins.fast_hits == 0


# -- the same records --------------------------------------------------------------


@pytest.fixture
def access_log() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "regmirror.http.site" and "code" in event:
            events.append(
                {k: event[k] for k in ("client", "user", "method", "uri", "code", "length")}
            )

    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def test_the_access_log_counters_and_uses_are_the_full_paths(
    twins: Twins,
    cached: str,
    users: Path,
    access_log: list[dict[str, Any]],
    renders: Renders,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth_pair(twins, users)
    auth = f"Authorization: {basic('alice', PASSWORD)}"
    twins.both(get("/v2/team/app/manifests/1.0", auth))
    access_log.clear()
    uses: list[Digest] = []
    for h in twins.harnesses:
        used = h.ledger.used
        monkeypatch.setattr(h.ledger, "used", lambda d, used=used: (uses.append(d), used(d))[1])
    renders.count = 0
    target = "/v2/team/app/manifests/1.0"
    twins.both(get(target, auth), get(target, auth, method="HEAD"))  # counters: in both()
    assert renders.count == 2
    assert uses == [Digest.parse(cached)] * 4  # two by the full site, two by the fast one
    full, fast = access_log[:2], access_log[2:]
    assert fast == full
    assert full[0]["user"] == "alice" and full[0]["code"] == 200 and full[0]["length"] > 0
    assert full[1]["method"] == "HEAD" and full[1]["length"] == 0


def test_parse_head_reads_one_head_and_says_how_long_it_is() -> None:
    data = get("/v2/a/manifests/1?ns=x", "Accept: */*") + b"GET /next"
    head = parse_head(data, 16 * 1024, 100)
    assert head is not None
    assert (head.method, head.path, head.args, head.version) == (
        b"GET",
        b"/v2/a/manifests/1",
        {b"ns": [b"x"]},
        b"HTTP/1.1",
    )
    assert head.headers == {b"host": b"mirror.test"} and head.accept == (b"*/*",)
    assert data[head.length :] == b"GET /next"
    assert parse_head(data[:30], 16 * 1024, 100) is None  # not complete yet
