"""The reaper of a cluster: one replica at a time expires and evicts from the shared
store, from the ledger in Redis (``regmirror.expiry.clusterusage``).

Every ``interval`` each replica's ``ClusterReaper`` ticks. One of them leads: it holds
``P:reaper`` (``SET NX PX lease``, renewed at each tick), whose value carries a fencing
token (``P:reaper:token``, incremented at each new leadership, seeded from Redis's clock
so that it keeps growing after Redis restarted empty). The others only listen.

The leader, once per leadership, adopts what the store holds (a scan in a thread: files
that Redis does not know are taken as used when adopted, so each gets a full TTL: after
Redis lost its data, a file's mtime says when it was fetched, not when it was last used,
and a hot blob fetched more than a TTL ago would go at once; entries whose files are gone
are dropped). Then at each tick: what expired (``ZRANGEBYSCORE P:lastuse -inf now-ttl``),
above the quota's high watermark what was least recently used (``ZRANGE``), in batches
of ``BATCH``. Every batch is claimed with one script before its files are deleted; the
script refuses (``FENCED``) unless the caller still leads with its token, and leaves out
every digest that a replica reads now (``P:readers|<digest>``, registered with an expiry
and a heartbeat by ``regmirror.fetch.redisinflight``). So a leader that paused (a stop,
a long GC, a VM migration) past its lease and resumes cannot delete what the new leader
has since seen used: its plan is stale, its token too. A manifest's claim also lists the
blobs no live manifest references any more: they are claimed next.

Removed digests are published on ``P:removed``; every replica drops what it holds in
memory of them (``on_removed``). Redis unreachable: nobody reaps (logged once per
outage); the leader's lease expires and the next tick elects one again.

The leader also sweeps the temporary files of replicas that are gone (no heartbeat):
what a replica killed mid-fetch left in ``_tmp/<replica>/``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from regmirror.coord.redis import Coordinator, CoordinatorDown, Refused
from regmirror.domain.digest import Digest
from regmirror.domain.errors import DigestInvalid
from regmirror.domain.kinds import Kind
from regmirror.expiry.clusterscripts import CLAIM, LEAD
from regmirror.expiry.clusterusage import ClusterUsage
from regmirror.logs import get_logger
from regmirror.storage.store import Store, Stored

log = get_logger()

BATCH = 500

RunInThread = Callable[..., "Deferred[Any]"]


class Fenced(Exception):
    """Another replica leads the reaping now: stop."""


class ClusterReaper(Service):
    """Expiry and quota of a shared store, run by one replica of the cluster at a time.
    ``in_use`` says what this replica reads or writes now; ``on_removed(kind, digest)``
    is told of every removal, by whichever replica made it."""

    def __init__(
        self,
        clock: Any,
        coordinator: Coordinator,
        store: Store,
        usage: ClusterUsage,
        replica: str,
        *,
        run_in_thread: RunInThread,
        in_use: Callable[[Digest], bool],
        on_removed: Callable[[Kind, Digest], None],
        ttl: float,
        max_size: int = 0,
        high: float = 0.95,
        low: float = 0.85,
        interval: float = 60.0,
        lease: float | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._coord = coordinator
        self._store = store
        self._usage = usage
        self._replica = replica
        self._run = run_in_thread
        self._in_use = in_use
        self._on_removed = on_removed
        self.ttl = ttl
        self.max_size = max_size
        self.high = int(max_size * high)
        self.low = int(max_size * low)
        self.interval = interval
        self.lease = lease if lease is not None else max(15.0, 3 * interval)
        self._now = wall_clock
        self.leader: str | None = None  # the leader value while this replica leads
        self._token = ""
        self._settled = False
        self.ready = True  # nothing to load: the ledger is Redis's (regmirror.expiry.view)
        self.usage = 0  # bytes in the store, as Redis last said
        self.entry_count = 0
        self.stats = {"expired": 0, "evicted": 0, "freed": 0}
        self._loop: LoopingCall | None = None
        self._ticking = False
        self._paused = False
        usage.on_evict(lambda: self.tick())

    @property
    def reserved(self) -> int:
        """Bytes announced by this replica's fetches in flight."""
        return self._usage.reserved

    def _key(self, name: str) -> str:
        return self._coord.key(name)

    # -- lifecycle -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._coord.subscribe(self._key("removed"), self._removed_elsewhere)
        if self.interval > 0:
            self._loop = LoopingCall(self.tick)
            self._loop.clock = self._clock
            self._loop.start(self.interval, now=True).addErrback(
                lambda f: log.failure("the cluster reaper stopped", f)
            )

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._coord.unsubscribe(self._key("removed"), self._removed_elsewhere)
        return None

    # -- the periodic work -----------------------------------------------------------

    def tick(self) -> Deferred[None] | None:
        """Lead if nobody does; if this replica leads, reap. Never raises."""
        if self._ticking:
            return None
        self._ticking = True
        d = Deferred.fromCoroutine(self._tick())

        def done(result: Any) -> None:
            self._ticking = False
            if hasattr(result, "getTraceback"):
                if result.check(CoordinatorDown):
                    return
                if result.check(Fenced):
                    log.warn("cluster reaper: another replica leads now; stopped here")
                    self.leader = None
                    return
                log.failure("cluster reaper tick failed", result)

        d.addBoth(done)
        return d

    async def _tick(self) -> None:
        if not self._coord.connected:
            if not self._paused:
                self._paused = True
                log.warn("cluster reaper paused: Redis is unreachable (nothing is removed)")
            self.leader = None
            return
        self._paused = False
        if not await self.lead():
            return
        if not self._settled:
            await self.settle()
        for batch in await self.due_expired():
            await self.delete_batch(batch, "expired")
        await self._evict()
        await self._sweep_gone_replicas()
        await self._count()

    async def lead(self) -> bool:
        """Take or keep the leadership; False when another replica holds it."""
        held = await self._coord.eval(
            LEAD, [], [self._coord.prefix, self._replica, int(self.lease * 1000), self._token]
        )
        if not held:
            if self.leader is not None:
                log.warn("cluster reaper: lost the lead to another replica")
            self.leader = None
            self._settled = False
            await self._count()
            return False
        if held != self.leader:
            self._token = held.rsplit(" ", 1)[1]
            self._settled = False
            log.info(
                "cluster reaper: this replica leads (fencing token {token})", token=self._token
            )
        self.leader = held
        return True

    async def settle(self) -> None:
        """Adopt what the store holds that Redis does not know; drop entries whose files
        are gone (once per leadership: Redis may have restarted empty)."""
        found: list[Stored] = await self._run(self._store.scan)
        now = self._now()  # the last use of what Redis does not know: unknown, so now
        adopted = await self._usage.add_entries(
            [(s.digest, s.kind, s.size, s.refs, now) for s in found], "adopt"
        )
        known = set(await self._coord.call("HKEYS", self._key("entries")))
        gone = known - {str(s.digest) for s in found}
        if gone:
            await self._claim(sorted(gone), "due")
        self._settled = True
        if adopted or gone:
            log.info(
                "cluster reaper: adopted {adopted} files of the store, dropped {gone} entries "
                "whose files are gone",
                adopted=adopted,
                gone=len(gone),
            )

    async def due_expired(self) -> list[list[Digest]]:
        """The batches of what expired (not being read or written here)."""
        if self.ttl <= 0:
            return []
        cutoff = self._now() - self.ttl
        found = await self._coord.call(
            "ZRANGEBYSCORE", self._key("lastuse"), "-inf", repr(cutoff), "LIMIT", 0, 50 * BATCH
        )
        due = [d for d in _digests(found) if not self._in_use(d)]
        return [due[i : i + BATCH] for i in range(0, len(due), BATCH)]

    async def _evict(self) -> None:
        if not self.max_size:
            return
        usage = int(await self._coord.call("GET", self._key("usage")) or 0)
        projected = usage + self._usage.reserved
        if projected <= self.high:
            return
        victims: list[Digest] = []
        offset = 0
        while projected > self.low:
            found = await self._coord.call(
                "ZRANGE", self._key("lastuse"), offset, offset + BATCH - 1
            )
            if not found:
                break
            offset += len(found)
            for digest in _digests(found):
                if self._in_use(digest):
                    continue
                size = await self._coord.call("HGET", self._key("entries"), str(digest))
                if size is None:
                    continue
                victims.append(digest)
                projected -= int(size.rsplit(" ", 1)[1])
                if projected <= self.low:
                    break
        for i in range(0, len(victims), BATCH):
            await self.delete_batch(victims[i : i + BATCH], "evicted")
        log.info(
            "cluster quota: evicted {count} entries (high {high}, low {low})",
            count=len(victims),
            high=self.high,
            low=self.low,
        )

    async def delete_batch(self, digests: list[Digest], why: str, mode: str = "due") -> None:
        """Claim a batch (refused unless this replica still leads with its token; what a
        replica reads is left out), delete its files, tell every replica. The blobs no
        manifest references any more follow."""
        if not digests:
            return
        claimed, orphans = await self._claim([str(d) for d in digests], mode)
        if claimed:
            removed = [(Kind(kind), Digest.parse(d)) for kind, d in (c.split(" ") for c in claimed)]
            freed = await self._run(self._store.remove, [d for _, d in removed])
            self.stats[why] += len(removed)
            self.stats["freed"] += freed
            for kind, digest in removed:
                self._forget(kind, digest)
            message = " ".join([self._replica, *claimed])
            self._coord.send("PUBLISH", self._key("removed"), message)
            log.info("cluster reaper removed {count} entries ({why})", count=len(removed), why=why)
        rest = [d for d in _digests(orphans) if not self._in_use(d)]
        if rest:
            await self.delete_batch(rest, why, "orphan")

    async def _claim(self, digests: list[str], mode: str) -> tuple[list[str], list[str]]:
        if self.leader is None:
            raise Fenced("this replica does not lead")
        try:
            claimed, orphans = await self._coord.eval(
                CLAIM, [], [self._coord.prefix, self.leader, mode, *digests]
            )
        except Refused as e:
            if "FENCED" in str(e):
                self.leader = None
                raise Fenced(str(e)) from None
            raise
        return list(claimed or []), list(orphans or [])

    # -- what the others removed; counts for /metrics --------------------------------

    def _removed_elsewhere(self, message: str) -> None:
        sender, *claimed = message.split(" ")
        if sender == self._replica:
            return
        for kind, digest in zip(claimed[::2], claimed[1::2], strict=False):
            try:
                self._forget(Kind(kind), Digest.parse(digest))
            except (ValueError, DigestInvalid):
                continue

    def _forget(self, kind: Kind, digest: Digest) -> None:
        try:
            self._on_removed(kind, digest)
        except Exception:
            log.failure("forgetting {digest} failed", digest=str(digest))

    async def _count(self) -> None:
        try:
            self.usage = int(await self._coord.call("GET", self._key("usage")) or 0)
            self.entry_count = int(await self._coord.call("HLEN", self._key("entries")))
        except CoordinatorDown:
            pass

    async def _sweep_gone_replicas(self) -> None:
        """Temporary files of replicas without a heartbeat, older than a lease."""
        base = self._store.root / "_tmp"
        try:
            names = [e.name for e in os.scandir(base) if e.is_dir() and e.name != self._replica]
        except FileNotFoundError:
            return
        for name in names:
            if await self._coord.call("EXISTS", self._key(f"replica|{name}")):
                continue
            swept = await self._run(_sweep, base / name, self._now() - 2 * self.lease)
            if swept:
                log.info(
                    "cluster reaper: swept {count} temporary files of gone replica {name}",
                    count=swept,
                    name=name,
                )


def _digests(values: Any) -> list[Digest]:
    out = []
    for value in values or []:
        try:
            out.append(Digest.parse(value))
        except DigestInvalid:
            continue
    return out


def _sweep(directory: Any, older_than: float) -> int:
    swept = 0
    for entry in os.scandir(directory):
        try:
            if entry.is_file() and entry.stat().st_mtime < older_than:
                os.unlink(entry.path)
                swept += 1
        except OSError:
            continue
    return swept
