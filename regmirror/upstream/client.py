"""The upstream registry, reached with treq: auth challenges, tokens, redirects.

``Upstream.request`` answers ``401`` challenges (``Bearer`` tokens cached per scope until
they expire, ``Basic`` with the configured credentials), follows redirects to blob
storage on other hosts without forwarding credentials, turns an unreachable upstream
into ``Unavailable``, and sits behind a circuit breaker (``regmirror.upstream.breaker``).
What the requests mean (URLs, headers, error mapping) is ``regmirror.upstream.remote``.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

from treq.client import HTTPClient
from treq.response import _Response
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.error import ConnectError, ConnectionLost, DNSLookupError
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers

from regmirror.config import UpstreamConfig
from regmirror.domain.errors import Unauthorized, Unavailable
from regmirror.domain.events import RecentErrors
from regmirror.logs import get_logger
from regmirror.upstream.bodies import DRAIN_LIMIT, discard
from regmirror.upstream.breaker import BreakerState, CircuitBreaker
from regmirror.upstream.credentials import Credential, CredentialError, Credentials

log = get_logger()

MAX_REDIRECTS = 5
DEFAULT_TOKEN_LIFETIME = 60.0
_CHALLENGE_PARAM = re.compile(r'\s*([a-zA-Z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Parse ``WWW-Authenticate: Bearer realm="...",service="...",scope="..."``."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        match = _CHALLENGE_PARAM.match(rest, pos)
        if match is None or match.end() == pos:
            break
        key, quoted, bare = match.groups()
        value = quoted if quoted is not None else bare
        params[key.lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = match.end()
    return scheme.lower(), params


def _same_site(a: str, b: str) -> bool:
    """Whether two host names share a registrable domain (last two labels)."""

    def site(host: str) -> str:
        labels = host.lower().rstrip(".").split(".")
        return ".".join(labels[-2:]) if not host.replace(".", "").isdigit() else host

    return site(a) == site(b)


class Upstream:
    """The HTTP client of one upstream registry: requests under its URL, authenticated
    as it challenges, behind its circuit breaker (``RemoteRegistry`` says what the
    requests mean)."""

    def __init__(
        self,
        reactor: Any,  # IReactorTime (and treq's reactor for timeouts)
        config: UpstreamConfig,
        *,
        client: HTTPClient | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        header_timeout: float = 15.0,
        trust_root: Any = None,
        credentials: Credentials | None = None,
        breaker_failures: int = 5,
        breaker_cooldown: float = 30.0,
        errors: RecentErrors | None = None,
    ) -> None:
        self._reactor = reactor
        self.config = config
        self._errors = errors if errors is not None else RecentErrors(reactor.seconds)
        self._credentials = credentials
        self.name = config.name
        self._breaker = CircuitBreaker(
            reactor, config.name, failures=breaker_failures, cooldown=breaker_cooldown
        )
        self._base = config.url
        self._host = urlsplit(config.url).hostname or ""
        # From request sent to response headers: never longer than the upstream may
        # stay silent (the read timeout), so a silent upstream fails a miss in time.
        # 0 turns either off.
        limits = [t for t in (header_timeout, read_timeout) if t > 0]
        self._header_timeout = min(limits) if limits else 0.0
        if client is None:
            pool = HTTPConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = 16
            pool.retryAutomatically = True
            policy = BrowserLikePolicyForHTTPS(trustRoot=trust_root)
            agent = Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=connect_timeout)
            client = HTTPClient(agent)
        self._client = client
        self._challenge: tuple[str, dict[str, str]] | None = None
        self._tokens: dict[str, tuple[str, float]] = {}

    # -- requests --------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        repository: str | None,
        headers: Mapping[str, str] | None = None,
        *,
        unbuffered: bool = False,
    ) -> _Response:
        """Send a request for ``path`` (under ``/v2/``), authenticating as challenged.
        Behind a circuit breaker: after ``breaker_failures`` consecutive failures
        (unreachable, timeouts, 5xx) the upstream is not asked for ``breaker_cooldown``
        seconds, and requests fail at once."""
        self._breaker.check()
        try:
            response = await self._request(method, path, repository, headers, unbuffered)
        except Unavailable as e:
            self._breaker.failed()
            self._errors.record("upstream", f"{method} {path}: {e.message}", upstream=self.name)
            raise
        if response.code >= 500:
            self._breaker.failed()
            self._errors.record(
                "upstream", f"{method} {path}: HTTP {response.code}", upstream=self.name
            )
        else:
            self._breaker.succeeded()
        return response

    @property
    def breaker_open(self) -> bool:
        return self._breaker.open

    @property
    def breaker_state(self) -> BreakerState:
        return self._breaker.state()

    async def _request(
        self,
        method: str,
        path: str,
        repository: str | None,
        headers: Mapping[str, str] | None,
        unbuffered: bool,
    ) -> _Response:
        url = self._base + path
        sent_auth = False
        for _ in range(2):
            try:
                auth = await self._authorization(repository)
            except CredentialError as e:
                raise Unavailable(
                    f"the upstream's credentials are unavailable: {e}", {"upstream": self.name}
                ) from None
            sent_auth = sent_auth or auth is not None
            response = await self._send(method, url, headers, auth, unbuffered)
            if response.code != 401:
                return response
            challenge = response.headers.getRawHeaders("www-authenticate", [""])[0]
            await discard(response, DRAIN_LIMIT)
            scheme, params = parse_challenge(challenge)
            if scheme not in ("bearer", "basic"):
                break
            if self._challenge is not None and self._challenge[0] == scheme and sent_auth:
                if scheme == "basic":
                    break
                self._tokens.pop(self._scope(repository, params), None)
            self._challenge = (scheme, params)
        raise Unauthorized(
            "the upstream registry refused the mirror's credentials"
            if self.authenticated
            else "the upstream registry requires authentication",
            {"upstream": self.name},
        )

    @property
    def authenticated(self) -> bool:
        """Reached with credentials: its content may be private to some repositories."""
        return self._credentials is not None and self._credentials.configured

    async def _credential(self) -> Credential | None:
        return await self._credentials.get() if self._credentials is not None else None

    async def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        auth: str | None,
        unbuffered: bool,
    ) -> _Response:
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            h = Headers({k: [v] for k, v in (headers or {}).items()})
            if auth is not None and _origin(url) == origin:
                h.setRawHeaders("authorization", [auth])
            try:
                response: _Response = await self._client.request(
                    method,
                    url,
                    headers=h,
                    allow_redirects=False,
                    unbuffered=unbuffered,
                    timeout=self._header_timeout,
                    reactor=self._reactor,
                )
            except (ConnectError, DNSLookupError, ConnectionLost, TimeoutError) as e:
                raise Unavailable(
                    "the upstream registry is unreachable", {"upstream": self.name}
                ) from e
            except CancelledError as e:
                if isinstance(e.__context__, TimeoutError) or "timeout" in repr(e).lower():
                    raise Unavailable(
                        "the upstream registry did not answer in time", {"upstream": self.name}
                    ) from e
                raise
            except Exception as e:
                raise Unavailable(
                    f"the upstream request failed: {type(e).__name__}", {"upstream": self.name}
                ) from e
            if response.code in (301, 302, 303, 307, 308) and method in ("GET", "HEAD"):
                location = response.headers.getRawHeaders("location", [None])[0]
                await discard(response, DRAIN_LIMIT)
                if not location:
                    raise Unavailable("the upstream redirected nowhere", {"upstream": self.name})
                url = urljoin(url, location)
                if urlsplit(url).scheme not in ("http", "https"):
                    raise Unavailable("the upstream redirected to a non-HTTP URL")
                continue
            return response
        raise Unavailable("the upstream redirected too many times", {"upstream": self.name})

    # -- authentication --------------------------------------------------------------

    def _scope(self, repository: str | None, params: Mapping[str, str]) -> str:
        if repository is None:
            return params.get("scope", "")
        return f"repository:{repository}:pull"

    async def _authorization(self, repository: str | None) -> str | None:
        if self._challenge is None:
            return None
        scheme, params = self._challenge
        if scheme == "basic":
            credential = await self._credential()
            if credential is None:
                return None
            return "Basic " + _basic(credential.username, credential.password)
        scope = self._scope(repository, params)
        cached = self._tokens.get(scope)
        if cached is not None and cached[1] > self._reactor.seconds():
            return "Bearer " + cached[0]
        token, lifetime = await self._fetch_token(params, scope)
        self._tokens[scope] = (token, self._reactor.seconds() + max(lifetime - 5, 1))
        return "Bearer " + token

    async def _fetch_token(self, params: Mapping[str, str], scope: str) -> tuple[str, float]:
        realm = params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Unavailable("the upstream sent an unusable token realm", {"upstream": self.name})
        query = {"service": params.get("service", "")}
        if scope:
            query["scope"] = scope
        headers = {}
        credential = await self._credential()
        if credential is not None:
            if _same_site(parts.hostname, self._host):
                headers["authorization"] = "Basic " + _basic(
                    credential.username, credential.password
                )
            else:
                log.warn(
                    "token realm {realm} is not on the upstream's domain; asking anonymously",
                    realm=f"{parts.scheme}://{parts.netloc}{parts.path}",
                )
        sep = "&" if parts.query else "?"
        url = realm + sep + urlencode({k: v for k, v in query.items() if v})
        try:
            response = await self._client.get(
                url,
                headers=headers,
                timeout=self._header_timeout,
                allow_redirects=True,
                reactor=self._reactor,
            )
            body = await response.content()
        except Exception as e:
            raise Unavailable("the token service is unreachable", {"upstream": self.name}) from e
        if response.code in (401, 403):
            raise Unauthorized(
                "the upstream's token service refused the mirror's credentials",
                {"upstream": self.name},
            )
        if response.code != 200:
            raise Unavailable(
                f"the token service answered {response.code}", {"upstream": self.name}
            )
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
            lifetime = float(data.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise Unavailable("the token service sent no token", {"upstream": self.name})
        return token, lifetime


def _basic(username: str, password: str) -> str:
    return base64.b64encode(f"{username}:{password}".encode()).decode()


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or ""), parts.port
