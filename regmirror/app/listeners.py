"""The listener side of the service tree: the site, TLS, client authentication, and
what SIGHUP reloads.

``check_files`` reads the certificate, key, client CAs and htpasswd file once at
start-up (``Options.postOptions``), so a missing or bad file stops twistd with one line
and exit status 2, like any other configuration error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
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
from regmirror.app.sockets import FAMILIES, Inherited
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


class AdoptedPort(service.Service):
    """Serves ``factory`` on a listening socket this process inherited (a worker's),
    once ``ready()`` fired (a worker joined its coordinator, or gave up waiting):
    meanwhile connections wait in the socket's queue.

    Stopping stops accepting; a unix socket is not closed, since closing the port would
    remove its file, which the other workers still listen on."""

    def __init__(
        self,
        reactor: Any,
        inherited: Inherited,
        factory: Any,
        ready: Callable[[], Deferred[Any]] | None = None,
    ) -> None:
        self._reactor = reactor
        self._inherited = inherited
        self._factory = factory
        self._ready = ready
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        if self._ready is None:
            self._adopt()
        else:
            self._ready().addBoth(lambda _: self._adopt() if self.running else None)

    def _adopt(self) -> None:
        family = FAMILIES[self._inherited.family]
        os.set_blocking(self._inherited.fd, False)  # as it was bound: a blocking socket
        self.port = self._reactor.adoptStreamPort(self._inherited.fd, family, self._factory)

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        if self._inherited.family == "unix":
            port.stopReading()
            return None
        return port.stopListening()


def add_listener(
    top: service.MultiService,
    config: Config,
    cache: Cache | Mirrors,
    reactor: Any,
    tls: ServerTLS | None = None,
    pages: OperatorPages | None = None,
    inherited: Inherited | None = None,
    ready: Callable[[], Deferred[Any]] | None = None,
) -> RegistrySite:
    """Add the HTTP(S) listener, and what it needs, to ``top``: on ``config.listen``,
    or on the socket a worker ``inherited`` from its parent (accepting once ``ready()``
    fired); ``pages`` (the probes and the status page) are mounted on it behind its
    client authentication."""
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
        fast_path=config.fast_path,
        tls=tls is not None,
        auth=auth,
        access=AccessRules(config.access.allow, config.access.deny),
        limits=config.limits,
        reactor=reactor,
        worker=inherited.worker if inherited is not None else None,
    )
    if pages is not None:
        pages.mount(site.resource, auth)
    factory: Any = site if tls is None else TLSFactory(tls, site, reactor)
    if tls is not None:
        reloaders.insert(0, tls.reload)
    if inherited is not None:
        AdoptedPort(reactor, inherited, factory, ready).setServiceParent(top)
    elif tls is None:
        strports.service(config.listen, site).setServiceParent(top)
    else:
        endpoint = serverFromString(reactor, config.listen)
        StreamServerEndpointService(endpoint, factory).setServiceParent(top)
    if reloaders:
        ReloadOnHangup(reactor, reloaders).setServiceParent(top)
    return site
