"""A circuit breaker per upstream: after ``failures`` consecutive failures (unreachable,
timeouts, 5xx) the upstream is not asked for ``cooldown`` seconds, and requests fail at
once with ``Unavailable`` (cached content is still served above)."""

from __future__ import annotations

from regmirror.domain.errors import Unavailable
from regmirror.logs import get_logger
from regmirror.reactor import ReactorTime

log = get_logger()


class CircuitBreaker:
    def __init__(self, clock: ReactorTime, name: str, *, failures: int, cooldown: float) -> None:
        self._clock = clock
        self._name = name
        self._max_failures = failures
        self._cooldown = cooldown
        self._failures = 0
        self._open_until = 0.0

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

    def succeeded(self) -> None:
        self._failures = 0

    def failed(self) -> None:
        self._failures += 1
        if self._failures >= self._max_failures > 0:
            self._open_until = self._clock.seconds() + self._cooldown
            log.warn(
                "circuit breaker for {upstream} opened after {count} consecutive failures; "
                "answering misses at once for {cooldown} s",
                upstream=self._name,
                count=self._failures,
                cooldown=self._cooldown,
            )
