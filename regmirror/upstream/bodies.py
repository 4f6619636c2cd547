"""The one way to read an upstream response body that is not a blob: collected up to a
limit, or discarded; cut when the upstream stays silent too long.

Blob bodies stream into their fetch instead (``regmirror.fetch.body``).
"""

from __future__ import annotations

from treq.response import _Response
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from regmirror.domain.errors import ManifestInvalid, RegistryError, Unavailable
from regmirror.reactor import ReactorTime

# A body read only to keep its connection reusable (a 401, a redirect): larger ones
# cut the connection instead.
DRAIN_LIMIT = 64 * 1024


class _Collector(Protocol):
    """Collects (or, with ``keep=False``, counts and drops) a body of at most ``limit``
    bytes: past it the connection is cut. Cut after ``idle`` seconds of silence when
    given a clock."""

    def __init__(
        self,
        limit: int,
        done: Deferred[bytes],
        clock: ReactorTime | None = None,
        idle: float = 0.0,
        *,
        keep: bool = True,
    ) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit
        self._keep = keep
        self._done = done
        self._timer: IDelayedCall | None = None
        self._silent = False
        if clock is not None and idle > 0:
            self._idle = idle
            self._timer = clock.callLater(idle, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self._silent = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.reset(self._idle)
        self._size += len(data)
        if self._size > self._limit:
            self._chunks = []
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        if self._keep:
            self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._silent:
            self._done.errback(Unavailable("the upstream stopped sending the response"))
        elif self._size > self._limit:
            self._done.errback(
                ManifestInvalid("the upstream response is larger than the configured maximum")
            )
        elif reason.check(ResponseDone):
            self._done.callback(b"".join(self._chunks))
        else:
            self._done.errback(Unavailable("the upstream connection broke"))


async def read_limited(
    response: _Response, limit: int, clock: ReactorTime | None = None, idle: float = 0.0
) -> bytes:
    """The whole body, at most ``limit`` bytes (``ManifestInvalid`` past it;
    ``Unavailable`` when the connection broke or stayed silent ``idle`` seconds)."""
    d: Deferred[bytes] = Deferred()
    response.deliverBody(_Collector(limit, d, clock, idle))
    return await d


async def discard(response: _Response, limit: int = 0) -> None:
    """Read and drop a body we do not need; past ``limit`` bytes (by default: any) the
    connection is cut rather than read. Never raises for the body's sake."""
    d: Deferred[bytes] = Deferred()
    response.deliverBody(_Collector(limit, d, keep=False))
    try:
        await d
    except RegistryError:
        pass
