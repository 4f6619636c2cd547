"""What the replicas of a cluster tell the expiry layer, written to Redis (``Usage``).

The ledger of the shared store lives in Redis, under the cluster's name ``P``:

- ``P:entries`` (hash): digest -> ``"<kind> <size>"``, every verified blob and manifest;
- ``P:lastuse`` (sorted set): digest -> its last use (Unix seconds); the deadline of an
  entry is its last use plus ``proxy.ttl``, so this one set orders both;
- ``P:usage``: the bytes of all entries;
- ``P:entryrefs|<digest>`` (set): what a manifest references; ``P:refs|<digest>`` (set):
  the manifests referencing a digest (a blob no live manifest references goes with
  the last of them).

Uses and additions are collected here and written every ``flush_every`` seconds (one
script per flush, whatever the request rate); while Redis is unreachable they wait here
(one entry per digest, the latest use) and are written when it is back. Nothing
verified is lost meanwhile: what is on disk but not in Redis is adopted by the next
reaper that leads (``regmirror.expiry.clusterreaper``), from a scan of the store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from regmirror.coord.redis import Coordinator, CoordinatorDown
from regmirror.domain.digest import Digest
from regmirror.domain.kinds import Kind
from regmirror.logs import get_logger

log = get_logger()

# ARGV: the prefix, then per entry: digest, kind, size, refs (comma-separated), time,
# mode ("use": a use now, "adopt": found on disk, its mtime as last use if it has none).
ADD = """
local p = ARGV[1]
local added = 0
for i = 2, #ARGV, 6 do
  local d, kind, size, refs = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3]
  local t, mode = ARGV[i+4], ARGV[i+5]
  if redis.call('HSETNX', p .. ':entries', d, kind .. ' ' .. size) == 1 then
    added = added + 1
    redis.call('INCRBY', p .. ':usage', size)
    for ref in string.gmatch(refs, '[^,]+') do
      redis.call('SADD', p .. ':refs|' .. ref, d)
      redis.call('SADD', p .. ':entryrefs|' .. d, ref)
    end
  end
  if mode == 'adopt' then
    redis.call('ZADD', p .. ':lastuse', 'NX', t, d)
  else
    redis.call('ZADD', p .. ':lastuse', 'GT', t, d)
  end
end
return added
"""

# ARGV: the prefix, then pairs of digest and time. A manifest's use keeps the manifests
# it lists (an index's) alive too.
USED = """
local p = ARGV[1]
for i = 2, #ARGV, 2 do
  local d, t = ARGV[i], ARGV[i+1]
  local entry = redis.call('HGET', p .. ':entries', d)
  if entry then
    redis.call('ZADD', p .. ':lastuse', 'GT', t, d)
    if string.sub(entry, 1, 8) == 'manifest' then
      for _, ref in ipairs(redis.call('SMEMBERS', p .. ':entryrefs|' .. d)) do
        local child = redis.call('HGET', p .. ':entries', ref)
        if child and string.sub(child, 1, 8) == 'manifest' then
          redis.call('ZADD', p .. ':lastuse', 'GT', t, ref)
        end
      end
    end
  end
end
return 1
"""


class ClusterUsage:
    """``Usage`` of a cluster: uses and additions written to Redis in batches. Quota:
    ``max_size`` and the low watermark ``low`` (bytes) decide what may be cached at all;
    eviction is the leading reaper's (``on_evict`` subscribes it)."""

    def __init__(
        self,
        clock: Any,
        coordinator: Coordinator,
        *,
        max_size: int = 0,
        low: int = 0,
        flush_every: float = 1.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._coord = coordinator
        self.max_size = max_size
        self.low = low
        self._now = wall_clock
        self._uses: dict[Digest, float] = {}
        self._adds: dict[Digest, tuple[Kind, int, tuple[Digest, ...], float]] = {}
        self._reserved: dict[Digest, int] = {}
        self._evictors: list[Callable[[], object]] = []
        self._loop = LoopingCall(self.flush)
        self._loop.clock = clock
        self._flush_every = flush_every
        self._flushing = False
        coordinator.on_change(self._connection_changed)

    def _connection_changed(self, connected: bool) -> None:
        if connected:
            self.flush()

    def start(self) -> None:
        self._loop.start(self._flush_every, now=False).addErrback(
            lambda f: log.failure("cluster: writing uses stopped", f)
        )

    def stop(self) -> Deferred[None]:
        if self._loop.running:
            self._loop.stop()
        return self.flush()

    # -- Usage -----------------------------------------------------------------------

    def used(self, digest: Digest) -> None:
        self._uses[digest] = self._now()

    def added(self, kind: Kind, digest: Digest, size: int, refs: tuple[Digest, ...] = ()) -> None:
        self._adds[digest] = (kind, size, refs, self._now())

    def reserve(self, digest: Digest, size: int) -> bool:
        if self.max_size and size > self.low:
            return False
        self._reserved[digest] = size
        return True

    def release(self, digest: Digest) -> None:
        self._reserved.pop(digest, None)

    def evict(self) -> list[object]:
        return [evict() for evict in self._evictors]

    def on_evict(self, evict: Callable[[], object]) -> None:
        self._evictors.append(evict)

    @property
    def reserved(self) -> int:
        """Bytes announced by the fetches in flight on this replica."""
        return sum(self._reserved.values())

    # -- writing ---------------------------------------------------------------------

    def flush(self) -> Deferred[None]:
        """Write what was collected (never raises; kept for later if Redis is away)."""
        if self._flushing or not (self._uses or self._adds) or not self._coord.connected:
            return Deferred.fromCoroutine(_nothing())
        self._flushing = True
        d = Deferred.fromCoroutine(self._flush())

        def done(result: object) -> None:
            self._flushing = False
            if isinstance(result, Failure):
                log.failure("cluster: writing uses failed", result)

        d.addBoth(done)
        return d

    async def _flush(self) -> None:
        adds, self._adds = self._adds, {}
        uses, self._uses = self._uses, {}
        try:
            if adds:
                await self.add_entries(
                    [(d, kind, size, refs, t) for d, (kind, size, refs, t) in adds.items()], "use"
                )
            if uses:
                args: list[object] = [self._coord.prefix]
                for digest, t in uses.items():
                    args += [str(digest), repr(t)]
                await self._coord.eval(USED, [], args)
        except CoordinatorDown:
            for d, add in adds.items():
                self._adds.setdefault(d, add)
            for d, t in uses.items():
                self._uses[d] = max(t, self._uses.get(d, 0.0))

    async def add_entries(
        self, entries: list[tuple[Digest, Kind, int, tuple[Digest, ...], float]], mode: str
    ) -> int:
        """Write entries (``mode``: ``use``, or ``adopt`` for what a scan found)."""
        added = 0
        for i in range(0, len(entries), 500):
            args: list[object] = [self._coord.prefix]
            for digest, kind, size, refs, t in entries[i : i + 500]:
                args += [str(digest), str(kind), size, ",".join(map(str, refs)), repr(t), mode]
            added += int(await self._coord.eval(ADD, [], args))
        return added


async def _nothing() -> None:
    return None
