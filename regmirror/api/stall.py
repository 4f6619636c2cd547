"""``StallTimer``: cut a response whose client stopped reading.

The listener's idle timeout (``Site(timeout=...)``) closes connections that send
nothing between requests, but Twisted suspends it while a response is being sent; a
blob sender that waits for a client which stopped reading uses this instead, with the
same timeout.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from regmirror.logs import get_logger

log = get_logger()


class StallTimer:
    """Aborts a response whose client has not taken any data for ``timeout`` seconds.

    The sender calls ``paused()`` when the transport pauses it and ``resumed()`` when it
    resumes; both are cheap (a sender is paused and resumed many times a second), with
    one delayed call per stall window rather than one per pause."""

    def __init__(
        self, clock: IReactorTime | None, timeout: float, on_stall: Callable[[], object]
    ) -> None:
        self._clock = clock
        self._timeout = timeout if clock is not None else 0.0
        self._on_stall = on_stall
        self._call: IDelayedCall | None = None
        self._paused_at: float | None = None

    def paused(self) -> None:
        if not self._timeout or self._paused_at is not None:
            return
        assert self._clock is not None
        self._paused_at = self._clock.seconds()
        if self._call is None:
            self._call = self._clock.callLater(self._timeout, self._check)

    def resumed(self) -> None:
        self._paused_at = None

    def stop(self) -> None:
        self._paused_at = None
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _check(self) -> None:
        self._call = None
        if self._paused_at is None:
            return
        assert self._clock is not None
        waited = self._clock.seconds() - self._paused_at
        if waited < self._timeout:
            self._call = self._clock.callLater(self._timeout - waited, self._check)
            return
        log.info("a client stopped reading a response for {timeout}s; cut", timeout=self._timeout)
        self._on_stall()
