"""What the status page shows over time: blob traffic sampled every minute (the last
hour kept), and the recent rate of each fetch in flight.

Traffic is counted by the caches (``Cache.stats``) as responses and fetches end:

- ``served``: body bytes of blob responses sent to clients (``blob_bytes_served``);
- ``fetched``: body bytes of blobs received from the upstreams (``blob_bytes_fetched``:
  a fetch's when it ends, committed or not; a pass-through's size when it starts);
- ``saved`` = ``served`` - ``fetched`` (never below 0): what the upstream links were
  spared, since without the mirror every byte served would have crossed them;
- ``hits`` / ``requests``: blob GETs answered from the store, of all blob GETs that
  were answered from the store, joined a fetch in flight or started one.

``Sampler`` is a service: a ``LoopingCall`` on the injected clock ticks every second,
noting each fetch's bytes (for its rate over the last ``rate_window`` seconds) and,
once a minute, a snapshot of the totals. A tick never raises (a LoopingCall stops for
good on its first exception).
"""

from __future__ import annotations

from collections import deque
from itertools import pairwise
from typing import Any, cast

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from regmirror.domain.digest import Digest
from regmirror.fetch.inflight import FetchProgress
from regmirror.logs import get_logger
from regmirror.mirror.mirrors import Mirrors
from regmirror.reactor import ReactorTime

log = get_logger()


@attrs.frozen
class Traffic:
    """Blob traffic from ``since`` to ``until`` (the clock's seconds)."""

    since: float
    until: float
    served: int = 0
    fetched: int = 0
    hits: int = 0
    requests: int = 0

    @property
    def saved(self) -> int:
        return max(0, self.served - self.fetched)

    @property
    def hit_ratio(self) -> float | None:
        return self.hits / self.requests if self.requests else None

    def after(self, earlier: Traffic) -> Traffic:
        """The traffic between ``earlier`` and this, both counted since the start."""
        return Traffic(
            earlier.until,
            self.until,
            self.served - earlier.served,
            self.fetched - earlier.fetched,
            self.hits - earlier.hits,
            self.requests - earlier.requests,
        )


@attrs.frozen
class _Seen:
    time: float
    received: int


class Sampler(Service):
    """Traffic totals every ``minute`` seconds (``keep`` of them), and fetch rates."""

    def __init__(
        self,
        clock: ReactorTime,
        mirrors: Mirrors,
        *,
        minute: float = 60.0,
        keep: int = 60,
        tick: float = 1.0,
        rate_window: float = 10.0,
    ) -> None:
        self._clock = clock
        self._mirrors = mirrors
        self._minute = minute
        self._tick_every = tick
        self._rate_window = rate_window
        self.started = clock.seconds()
        self._samples: deque[Traffic] = deque([self.totals()], maxlen=keep + 1)
        self._next_sample = self.started + minute
        self._seen: dict[Digest, deque[_Seen]] = {}
        self._loop: LoopingCall | None = None

    # -- lifecycle -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.tick)
        self._loop.clock = cast(IReactorTime, self._clock)
        self._loop.start(self._tick_every, now=False).addErrback(
            lambda f: log.failure("the status sampler stopped", f)
        )

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()

    def tick(self) -> None:
        """A snapshot once a minute; note the fetches' progress. Never raises: each part
        that fails is logged, and the next tick tries again."""
        now = self._clock.seconds()
        if now >= self._next_sample:
            self._next_sample = max(self._next_sample + self._minute, now)
            try:
                self._samples.append(self.totals())
            except Exception:
                log.failure("status sampling failed: traffic totals")
        try:
            self._observe(now)
        except Exception:
            log.failure("status sampling failed: fetch progress")

    # -- traffic ---------------------------------------------------------------------

    def totals(self) -> Traffic:
        """Since the start, until now."""
        served = fetched = hits = requests = 0
        for cache in self._mirrors.caches:
            stats = cache.stats
            served += stats["blob_bytes_served"]
            fetched += stats["blob_bytes_fetched"]
            hits += stats["blob_hits"]
            requests += stats["blob_hits"] + stats["blob_joins"] + stats["blob_fetches"]
        return Traffic(self.started, self._clock.seconds(), served, fetched, hits, requests)

    def last_hour(self) -> Traffic:
        """Since the oldest snapshot kept (the start, in the first hour)."""
        return self.totals().after(self._samples[0])

    def minutes(self) -> list[Traffic]:
        """Each minute kept, oldest first, then the one under way."""
        samples = [*self._samples, self.totals()]
        return [b.after(a) for a, b in pairwise(samples)]

    # -- fetch rates -----------------------------------------------------------------

    def _observe(self, now: float) -> None:
        fetches = self._mirrors.inflight.fetches()
        live = {p.digest for p in fetches}
        for digest in [d for d in self._seen if d not in live]:
            del self._seen[digest]
        for p in fetches:
            seen = self._seen.setdefault(p.digest, deque())
            seen.append(_Seen(now, p.received))
            while len(seen) > 1 and now - seen[0].time > self._rate_window:
                seen.popleft()

    def rate(self, progress: FetchProgress) -> float | None:
        """Bytes per second of a fetch over the last ``rate_window`` seconds (since it
        started, until a tick a second ago saw it); None before anything is known."""
        now = self._clock.seconds()
        seen = self._seen.get(progress.digest)
        if (
            seen
            and now - seen[0].time >= self._tick_every
            and progress.received >= seen[0].received
        ):
            return (progress.received - seen[0].received) / (now - seen[0].time)
        if progress.started and now > progress.started:
            return progress.received / (now - progress.started)
        return None
