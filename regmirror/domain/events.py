"""Recent errors an operator should see: a bounded ring, newest first.

``RecentErrors`` is handed, as a constructor argument, to whoever meets an error worth
showing on the status page: the upstream client (an upstream unreachable, timing out
or answering 5xx) and the blobs of each mirror (a fetch that ended without committing:
wrong bytes, a full disk, a body cut by the upstream). It keeps the last ``size``
events; an event equal to the newest one (same kind, upstream, digest and message) is
counted on it instead of pushing the others out, so a failing upstream asked a hundred
times a minute is one line with a count. Pure: the clock is injected.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from typing import Literal

import attrs

ErrorKind = Literal["digest", "disk", "upstream"]
MAX_MESSAGE = 300  # characters of a message kept


@attrs.frozen
class ErrorEvent:
    """One error (or a run of equal ones): when it was first and last seen, how often."""

    kind: ErrorKind
    message: str
    upstream: str = ""
    digest: str = ""
    first: float = 0.0
    last: float = 0.0
    count: int = 1


class RecentErrors:
    """The last ``size`` error events; ``totals`` counts every event by kind."""

    def __init__(self, clock: Callable[[], float], size: int = 50) -> None:
        self._clock = clock
        self._events: deque[ErrorEvent] = deque(maxlen=size)
        self.totals: Counter[ErrorKind] = Counter()

    def record(
        self, kind: ErrorKind, message: str, *, upstream: str = "", digest: str = ""
    ) -> None:
        now = self._clock()
        message = message[:MAX_MESSAGE]
        self.totals[kind] += 1
        newest = self._events[-1] if self._events else None
        if newest is not None and (newest.kind, newest.upstream, newest.digest, newest.message) == (
            kind,
            upstream,
            digest,
            message,
        ):
            self._events[-1] = attrs.evolve(newest, last=now, count=newest.count + 1)
            return
        self._events.append(ErrorEvent(kind, message, upstream, digest, now, now))

    def events(self) -> list[ErrorEvent]:
        """Newest first."""
        return list(reversed(self._events))
