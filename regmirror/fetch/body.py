"""The upstream body of a blob, received into its ``BlobFetch``.

The body arrives through treq (``unbuffered=True``): each chunk read from the socket (up
to 1 MiB, see ``TuneTransport``) is handed to the fetch as it is, with no copy (readers
send from the temporary file, not from these bytes); the connection (the body's
transport, a push producer) is given to the fetch to pause while the disk falls behind,
and a body that stays silent ``idle`` seconds fails the fetch.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from regmirror.fetch.blobfetch import BlobFetch
from regmirror.reactor import ReactorTime

TuneTransport = Callable[[object], None]
"""Called with the transport of an upstream blob body as it starts: the service hands
in ``regmirror.http.internals.read_more_at_once`` (it reaches into Twisted's private
attributes, which only ``regmirror.http.internals`` does), so the connection reads
1 MiB per call instead of 64 KiB: fewer, larger writes and hash updates, and fewer
wake-ups of the writer threads."""


def leave_transport(transport: object) -> None:
    """A ``TuneTransport`` that changes nothing (unit tests)."""


class BlobBody(Protocol):
    """Receives an upstream blob body into its fetch; cut after ``idle`` seconds of
    silence. ``tune_transport`` is called with the body's transport once connected."""

    def __init__(
        self,
        fetch: BlobFetch,
        clock: ReactorTime,
        idle: float,
        tune_transport: TuneTransport,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._idle = idle
        self._tune = tune_transport
        self._last = clock.seconds()
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        if self.transport is not None:
            self._fetch.attach(self.transport)  # type: ignore[arg-type]
            self._tune(self.transport)
        if self._idle > 0:
            self._timer = self._clock.callLater(self._idle, self._check_idle)
        if self._fetch.size == 0:
            self._fetch.write(b"")

    def _check_idle(self) -> None:
        silent = self._clock.seconds() - self._last
        if silent >= self._idle:
            self._timer = None
            self._fetch.fail(TimeoutError(f"upstream sent nothing for {silent:.0f} s"))
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
        else:
            self._timer = self._clock.callLater(self._idle - silent, self._check_idle)

    def dataReceived(self, data: bytes) -> None:
        self._last = self._clock.seconds()
        self._fetch.write(data)
        if self._fetch.error is not None and self.transport is not None:  # it failed
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if reason.check(ResponseDone):
            self._fetch.finish()
        else:
            self._fetch.fail(reason.value)
