"""The cluster's Redis, reached with txredisapi: commands with a deadline, Lua scripts,
pub/sub, and whether Redis can be reached now.

txredisapi is Twisted-native (docs/scaling.md says why it was chosen over redis-py in a
thread): its connections are protocols on this reactor, reconnected by Twisted's
``ClientService`` with a backoff capped here at ``RECONNECT_MAX`` seconds; replies are
Deferreds; published messages arrive on the reactor thread. No thread is ever blocked
on Redis, so an outage costs no thread and no reactor time.

``Coordinator`` is what the cluster's parts share: every key and channel is named with
``key()`` (the cluster's name as prefix, so several clusters can share one Redis);
``call`` and ``eval`` fail fast with ``CoordinatorDown`` while Redis is unreachable, and
within ``timeout`` seconds when it stops answering, so the request path never waits on
an outage; a ``PING`` every ``ping_interval`` seconds notices an outage and the return.
Whoever must change behaviour when that happens (fall back to local work, pause the
reaper, re-register readers on return) subscribes with ``on_change``. The outage and the
return are logged loudly (an error, then a warning) and exported as
``regmirror_cluster_connected``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import txredisapi
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from regmirror.config.model import RedisAddress
from regmirror.logs import get_logger

log = get_logger()

RECONNECT_MAX = 2.0  # seconds between reconnection attempts, at most
POOL_SIZE = 2  # connections for commands (each pipelines); one more for pub/sub

Listener = Callable[[bool], None]
OnMessage = Callable[[str], None]


class CoordinatorDown(Exception):
    """Redis cannot be reached now (or did not answer in time): work locally."""


class Refused(Exception):
    """Redis answered with an error (a script refused: ``FENCED``...)."""


class Coordinator(Service):
    """One Redis for the replicas of cluster ``prefix``; start it as a service."""

    def __init__(
        self,
        reactor: Any,
        address: RedisAddress,
        prefix: str,
        *,
        timeout: float = 1.0,
        ping_interval: float = 1.0,
    ) -> None:
        self._reactor = reactor
        self.address = address
        self.prefix = prefix
        self.timeout = timeout
        self.ping_interval = ping_interval
        self.connected = False
        self.outages = 0  # times Redis became unreachable after having been reached
        self._ever = False
        self._ready = 0  # command connections ready now
        self._pool: Any = None
        self._factories: list[Any] = []
        self._subscriber: Any = None  # the pub/sub connection, once ready
        self._channels: dict[str, list[OnMessage]] = {}
        self._listeners: list[Listener] = []
        self._loop: LoopingCall | None = None

    def key(self, *parts: str) -> str:
        """A key or channel of this cluster: ``<name>:<part>:<part>...``."""
        return ":".join((self.prefix, *parts))

    @property
    def where(self) -> str:
        scheme = "rediss" if self.address.tls else "redis"
        return f"{scheme}://{self.address.host}:{self.address.port}/{self.address.db}"

    # -- lifecycle -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        address = self.address
        pool = txredisapi.RedisFactory(
            self.where,
            address.db,
            POOL_SIZE,
            isLazy=True,
            password=address.password,
            username=address.username,
            replyTimeout=self.timeout,
            convertNumbers=False,
        )
        pool.protocol = _Pooled
        subscriber = txredisapi.SubscriberFactory(isLazy=True)
        subscriber.protocol = _Subscriber
        subscriber.password = address.password
        subscriber.username = address.username
        for factory in (pool, subscriber):
            factory.coordinator = self
            factory.maxDelay = RECONNECT_MAX
            factory.initialDelay = 0.2
            factory.startConnecting(self._endpoint())
            self._factories.append(factory)
        self._pool = pool.handler
        self._loop = LoopingCall(self._ping)
        self._loop.clock = self._reactor
        self._loop.start(self.ping_interval, now=False).addErrback(
            lambda f: log.failure("cluster: the Redis health check stopped", f)
        )

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._set(False, quiet=True)
        factories, self._factories = self._factories, []
        return Deferred.fromCoroutine(_disconnect_all(factories))

    def _endpoint(self) -> Any:
        endpoint = HostnameEndpoint(self._reactor, self.address.host, self.address.port, timeout=5)
        if self.address.tls:
            return _Unwrapped(wrapClientTLS(optionsForClientTLS(self.address.host), endpoint))
        return endpoint

    # -- state -----------------------------------------------------------------------

    def on_change(self, listener: Listener) -> None:
        """Call ``listener(connected)`` each time Redis becomes reachable or not."""
        self._listeners.append(listener)

    def _set(self, connected: bool, reason: str = "", *, quiet: bool = False) -> None:
        if connected == self.connected:
            return
        self.connected = connected
        if not quiet:
            if connected and not self._ever:
                log.info("cluster {name}: joined through Redis at {where}",
                         name=self.prefix, where=self.where)  # fmt: skip
            elif connected:
                log.warn(
                    "cluster {name}: Redis at {where} is back: rejoined the cluster",
                    name=self.prefix,
                    where=self.where,
                )
            else:
                self.outages += 1
                log.error(
                    "cluster {name}: Redis at {where} is unreachable ({reason}): this replica "
                    "now works alone (its own single flight and tag checks, reaper paused) "
                    "until Redis is back",
                    name=self.prefix,
                    where=self.where,
                    reason=reason or "no connection",
                )
        self._ever = self._ever or connected
        for listener in list(self._listeners):
            try:
                listener(connected)
            except Exception:
                log.failure("cluster: a listener of the Redis state failed")

    def _ping(self) -> Deferred[None]:
        d = self._deadline(self._issue("PING"))

        def ok(_: object) -> None:
            self._set(True)

        def down(f: Failure) -> None:
            self._set(False, f.getErrorMessage())

        d.addCallbacks(ok, down)
        return d

    def _pool_ready(self, up: bool) -> None:
        self._ready += 1 if up else -1
        if up and self.running:
            self._ping()
        elif not up and self._ready <= 0:
            self._set(False, "connection lost")

    # -- commands --------------------------------------------------------------------

    async def call(self, *args: object) -> Any:
        """One command's reply; ``CoordinatorDown`` when Redis cannot answer now."""
        if not self.connected or self._ready <= 0:
            raise CoordinatorDown("Redis is unreachable")
        return await self._deadline(self._issue(*args))

    async def eval(self, script: str, keys: Sequence[str], args: Sequence[object] = ()) -> Any:
        """Run a Lua script (by its SHA1 once Redis knows it)."""
        if not self.connected or self._ready <= 0:
            raise CoordinatorDown("Redis is unreachable")
        d = maybeDeferred(self._pool.eval, script, list(keys), [str(a) for a in args])
        return await self._deadline(d)

    def send(self, *args: object) -> None:
        """A command nobody waits for (lost while Redis is unreachable)."""
        _quiet(Deferred.fromCoroutine(self.call(*args)))

    def send_eval(self, script: str, keys: Sequence[str], args: Sequence[object] = ()) -> None:
        """A script nobody waits for (lost while Redis is unreachable)."""
        _quiet(Deferred.fromCoroutine(self.eval(script, keys, args)))

    def _issue(self, *args: object) -> Deferred[Any]:
        if self._pool is None:
            return Deferred.fromCoroutine(_raise(CoordinatorDown("not started")))
        return maybeDeferred(self._pool.execute_command, *args)

    def _deadline(self, d: Deferred[Any]) -> Deferred[Any]:
        """``d``'s result, or ``CoordinatorDown`` after ``timeout`` seconds (then Redis
        counts as unreachable until the next successful ping)."""
        out: Deferred[Any] = Deferred()

        def expire() -> None:
            if not out.called:
                self._set(False, f"no answer within {self.timeout:g}s")
                out.errback(CoordinatorDown("Redis did not answer in time"))

        timer = self._reactor.callLater(self.timeout, expire)

        def done(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if out.called:
                return
            if isinstance(result, Failure):
                if result.check(txredisapi.ConnectionError):
                    self._set(False, result.getErrorMessage())
                    out.errback(CoordinatorDown(result.getErrorMessage()))
                elif result.check(txredisapi.ResponseError):
                    out.errback(Refused(result.getErrorMessage()))
                else:
                    out.errback(result)
            else:
                out.callback(result)

        d.addBoth(done)
        return out

    # -- pub/sub ---------------------------------------------------------------------

    def subscribe(self, channel: str, on_message: OnMessage) -> Deferred[None]:
        """Call ``on_message(text)`` for each message on ``channel`` (again after a
        reconnection); fires once the subscription is active, or at once while Redis is
        unreachable."""
        callbacks = self._channels.setdefault(channel, [])
        callbacks.append(on_message)
        if len(callbacks) == 1 and self._subscriber is not None:
            return self._deadline(maybeDeferred(self._subscriber.subscribe, [channel])).addBoth(
                lambda _: None
            )
        return Deferred.fromCoroutine(_nothing())

    def unsubscribe(self, channel: str, on_message: OnMessage) -> None:
        callbacks = self._channels.get(channel)
        if callbacks is None or on_message not in callbacks:
            return
        callbacks.remove(on_message)
        if not callbacks:
            del self._channels[channel]
            if self._subscriber is not None:
                d = maybeDeferred(self._subscriber.unsubscribe, [channel])
                d.addErrback(lambda _: None)

    async def publish(self, channel: str, message: str) -> None:
        await self.call("PUBLISH", channel, message)

    def _subscriber_ready(self, protocol: Any) -> None:
        self._subscriber = protocol
        if self._channels:
            d = maybeDeferred(protocol.subscribe, list(self._channels))
            d.addErrback(lambda f: log.warn("cluster: cannot subscribe: {e}", e=f.value))

    def _subscriber_lost(self, protocol: Any) -> None:
        if self._subscriber is protocol:
            self._subscriber = None

    def _message(self, channel: str, message: str) -> None:
        for on_message in list(self._channels.get(channel, ())):
            try:
                on_message(message)
            except Exception:
                log.failure("cluster: a subscriber of {channel} failed", channel=channel)


class _Pooled(txredisapi.RedisProtocol):
    """A command connection that tells the coordinator when it is usable and lost."""

    _counted = False

    def connectionMade(self) -> Any:
        d = super().connectionMade()
        self.whenConnected().addCallback(self._usable)
        return d

    def _usable(self, _: object) -> None:
        self._counted = True
        self.factory.coordinator._pool_ready(True)

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        if self._counted:
            self._counted = False
            self.factory.coordinator._pool_ready(False)


class _Subscriber(txredisapi.SubscriberProtocol):
    """The pub/sub connection: messages go to the coordinator's subscribers."""

    def connectionMade(self) -> Any:
        d = super().connectionMade()
        self.whenConnected().addCallback(self.factory.coordinator._subscriber_ready)
        return d

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.coordinator._message(_text(channel), _text(message))

    def connectionLost(self, why: Failure) -> None:
        self.factory.coordinator._subscriber_lost(self)
        super().connectionLost(why)


class _Unwrapped:
    """A TLS client endpoint that hands the Redis protocol itself, not the TLS wrapper
    around it, to txredisapi's pool (which talks to what ``connect`` returns)."""

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = self._endpoint.connect(factory)
        return d.addCallback(lambda protocol: protocol.wrappedProtocol)


async def sleep(clock: Any, seconds: float) -> None:
    """Wait ``seconds`` on ``clock`` (the reactor)."""
    d: Deferred[None] = Deferred()
    clock.callLater(seconds, d.callback, None)
    await d


def _quiet(d: Deferred[Any]) -> None:
    d.addErrback(lambda f: log.debug("cluster: a write was lost: {error}", error=f.value))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _raise(error: BaseException) -> Any:
    raise error


async def _nothing() -> None:
    return None


async def _disconnect_all(factories: list[Any]) -> None:
    for factory in factories:
        try:
            await factory.disconnect()
        except Exception:
            pass
