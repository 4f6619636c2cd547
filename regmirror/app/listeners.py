"""The listener side of the service tree: the site, TLS, client authentication, and
what SIGHUP reloads.

``check_files`` reads the certificate, key, client CAs and htpasswd file once at
start-up (``Options.postOptions``), so a missing or bad file stops twistd with one line
and exit status 2, like any other configuration error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from regmirror.api.access import AccessRules
from regmirror.api.auth import (
    ClientAuth,
    Htpasswd,
    HtpasswdError,
    check_password,
    parse_htpasswd,
)
from regmirror.api.status import OperatorPages
from regmirror.config import Config, ConfigError
from regmirror.http.site import RegistrySite, make_site
from regmirror.http.tls import ReloadOnHangup, ServerTLS, TLSError, TLSFactory, upstream_trust_root
from regmirror.mirror.cache import Cache
from regmirror.mirror.mirrors import Mirrors

AUTH_THREADS = 2


def check_files(config: Config) -> ServerTLS | None:
    """Load what the configuration names; raise ``ConfigError`` (one line) if unusable."""
    tls = None
    if config.tls is not None:
        try:
            tls = ServerTLS(config.tls)
        except TLSError as e:
            raise ConfigError(f"{config.source}: http.tls: {e}") from None
    if config.upstream_ca:
        try:
            upstream_trust_root(config.upstream_ca)
        except TLSError as e:
            raise ConfigError(f"{config.source}: regmirror.upstream_ca: {e}") from None
    if config.auth is not None:
        try:
            with open(config.auth.htpasswd, encoding="utf-8", errors="replace") as f:
                parse_htpasswd(f.read(), config.auth.htpasswd)
        except OSError as e:
            raise ConfigError(
                f"{config.source}: auth.htpasswd.path: {config.auth.htpasswd}: {e.strerror}"
            ) from None
        except HtpasswdError as e:
            raise ConfigError(f"{config.source}: auth.htpasswd.path: {e}") from None
    return tls


class _PoolService(service.Service):
    """Starts and stops a thread pool with the application."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> Any:
        self.pool.stop()
        return super().stopService()


def add_listener(
    top: service.MultiService,
    config: Config,
    cache: Cache | Mirrors,
    reactor: Any,
    tls: ServerTLS | None = None,
    pages: OperatorPages | None = None,
) -> RegistrySite:
    """Add the HTTP(S) listener, and what it needs, to ``top``; ``pages`` (the probes and
    the status page) are mounted on it behind its client authentication."""
    auth = None
    reloaders: list[Callable[[], object]] = []
    if config.auth is not None:
        pool = ThreadPool(minthreads=0, maxthreads=AUTH_THREADS, name="regmirror-auth")
        _PoolService(pool).setServiceParent(top)

        def verify(password: bytes, hashed: bytes) -> Any:
            return deferToThreadPool(reactor, pool, check_password, password, hashed)

        htpasswd = Htpasswd(config.auth.htpasswd, reactor, verify)
        try:
            htpasswd.load()
        except HtpasswdError as e:
            raise ConfigError(f"{config.source}: auth.htpasswd.path: {e}") from None
        auth = ClientAuth(htpasswd, config.auth.realm, config.auth.anonymous_read)
        reloaders.append(htpasswd.reload)
    if config.tls is not None and tls is None:
        tls = check_files(config)
    site = make_site(
        cache,
        access_log=config.access_log,
        tls=tls is not None,
        auth=auth,
        access=AccessRules(config.access.allow, config.access.deny),
        limits=config.limits,
        reactor=reactor,
    )
    if pages is not None:
        pages.mount(site.resource, auth)
    if tls is None:
        strports.service(config.listen, site).setServiceParent(top)
    else:
        endpoint = serverFromString(reactor, config.listen)
        StreamServerEndpointService(endpoint, TLSFactory(tls, site, reactor)).setServiceParent(top)
        reloaders.insert(0, tls.reload)
    if reloaders:
        ReloadOnHangup(reactor, reloaders).setServiceParent(top)
    return site
