"""A circuit breaker per upstream: after ``failures`` consecutive failures (unreachable,
timeouts, 5xx) the upstream is not asked for ``cooldown`` seconds, and requests fail at
once with ``Unavailable`` (cached content is still served above)."""

from __future__ import annotations

import attrs

from regmirror.domain.errors import Unavailable
from regmirror.logs import get_logger
from regmirror.reactor import ReactorTime

log = get_logger()


@attrs.frozen
class BreakerState:
    """What the status page shows of a breaker: times are the clock's seconds (None:
    never)."""

    open: bool
    consecutive_failures: int
    last_success: float | None
    last_failure: float | None

    @property
    def reachable(self) -> bool | None:
        """The upstream's last known reachability: it answered the last request (True),
        the last one failed (False), or it was never asked (None)."""
        if self.consecutive_failures:
            return False
        return True if self.last_success is not None else None


class CircuitBreaker:
    def __init__(self, clock: ReactorTime, name: str, *, failures: int, cooldown: float) -> None:
        self._clock = clock
        self._name = name
        self._max_failures = failures
        self._cooldown = cooldown
        self._failures = 0
        self._open_until = 0.0
        self._last_success: float | None = None
        self._last_failure: float | None = None

    @property
    def open(self) -> bool:
        return bool(self._clock.seconds() < self._open_until)

    def check(self) -> None:
        """Raise ``Unavailable`` while open."""
        now = self._clock.seconds()
        if now < self._open_until:
            raise Unavailable(
                "the upstream registry is failing; not asking it again for "
                f"{self._open_until - now:.0f} s",
                {"upstream": self._name},
            )

    def state(self) -> BreakerState:
        return BreakerState(self.open, self._failures, self._last_success, self._last_failure)

    def succeeded(self) -> None:
        self._failures = 0
        self._last_success = self._clock.seconds()

    def failed(self) -> None:
        self._failures += 1
        self._last_failure = self._clock.seconds()
        if self._failures >= self._max_failures > 0:
            self._open_until = self._clock.seconds() + self._cooldown
            log.warn(
                "circuit breaker for {upstream} opened after {count} consecutive failures; "
                "answering misses at once for {cooldown} s",
                upstream=self._name,
                count=self._failures,
                cooldown=self._cooldown,
            )
