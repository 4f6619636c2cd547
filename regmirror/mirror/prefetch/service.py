"""The prefetch service: each policy of ``regmirror.prefetch`` on its own ``LoopingCall``.

A run lists what the policy matches — its repositories (a pattern matches the
repositories already in the cache for that upstream: registries rarely offer their
catalog), then each one's tags (``tags/list`` upstream through the mirror, unless every
tag is named) less the excluded ones — and warms each tag (``regmirror.mirror.prefetch
.warm``). Runs never overlap for one policy; blobs are fetched ``concurrency`` at a time
for all policies together. A failing tag or blob is logged and counted, and the run goes
on; a run that fails as a whole is logged, and the next one starts on time.

Docker Hub's rate limit: below the reserve (``ratelimit-remaining`` at most the
policy's reserve, a count or a share of ``ratelimit-limit``) a run stops before the
next manifest it would fetch, and later runs only send one ``HEAD`` (which Docker Hub
does not count) to see the budget again, until it is above the reserve. Pausing and
resuming are logged once each.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from regmirror.config import PrefetchPolicy, Reserve
from regmirror.domain.errors import RegistryError
from regmirror.domain.media import ANY
from regmirror.logs import get_logger
from regmirror.mirror.cache import Cache
from regmirror.mirror.mirrors import Mirrors
from regmirror.mirror.prefetch.matching import (
    Budget,
    budget,
    is_pattern,
    matches,
    needs_listing,
    select_tags,
)
from regmirror.mirror.prefetch.warm import Paused, Tally, Warmer
from regmirror.reactor import ReactorTime

log = get_logger()

T = TypeVar("T")


class PolicyRunner:
    """One policy: its loop, its runs and what they did."""

    def __init__(
        self,
        clock: ReactorTime,
        cache: Cache,
        policy: PrefetchPolicy,
        reserve: Reserve,
        slots: DeferredSemaphore,
    ) -> None:
        self._clock = clock
        self.cache = cache
        self.policy = policy
        self.reserve = reserve
        self._warmer = Warmer(cache, slots, policy.platforms, self._exhausted)
        self._loop: LoopingCall | None = None
        self.current: Tally | None = None
        self.last: Tally | None = None
        self.last_ok: float | None = None  # when the last run without failures ended
        self.paused = False
        self.totals: Counter[str] = Counter()
        self._probe: tuple[str, str] | None = None  # a tag to HEAD while paused

    # -- the loop --------------------------------------------------------------------

    def start(self) -> None:
        self._loop = LoopingCall(self.tick)
        self._loop.clock = cast(IReactorTime, self._clock)
        self._loop.start(self.policy.interval, now=True).addErrback(
            lambda f: log.failure("prefetch policy {policy} stopped", f, policy=self.policy.name)
        )

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    @property
    def next_run(self) -> float | None:
        """When the next run starts (None: running now, or stopped)."""
        call = self._loop.call if self._loop is not None else None
        return call.getTime() if call is not None and call.active() else None

    @property
    def state(self) -> str:
        if self.current is not None:
            return "running"
        if self.paused:
            return "paused"
        return "idle" if self._loop is not None else "stopped"

    def tick(self) -> Deferred[Tally | None]:
        """One run; whatever happens, it ends without an error (the loop goes on)."""
        d: Deferred[Tally | None] = Deferred.fromCoroutine(self.run())
        d.addErrback(lambda f: log.failure("prefetch run of {p} failed", f, p=self.policy.name))
        return d

    async def run(self) -> Tally:
        tally = Tally(started=self._clock.seconds())
        self.current = tally
        try:
            if await self._paused_at_start():
                tally.outcome = "paused"
            else:
                await self._run(tally)
                tally.outcome = "failed" if tally.failures else "ok"
        except Paused:
            tally.outcome = "paused"
        except Exception:
            tally.outcome = "error"
            tally.failures += 1
            log.failure("prefetch run of {policy} failed", policy=self.policy.name)
        finally:
            self._finish(tally)
        return tally

    def _finish(self, tally: Tally) -> None:
        tally.finished = self._clock.seconds()
        self.current = None
        self.last = tally
        if tally.outcome == "ok":
            self.last_ok = tally.finished
        self.totals["runs"] += 1
        self.totals[f"runs_{tally.outcome}"] += 1
        for key in Tally.COUNTS:
            self.totals[key] += getattr(tally, key)
        log.info(
            "prefetch {policy}: {outcome}; {checked} of {matched} tags checked, {changed} "
            "changed, {blobs} blobs ({bytes} bytes) fetched, {failures} failures",
            policy=self.policy.name,
            outcome=tally.outcome,
            checked=tally.tags_checked,
            matched=tally.tags_matched,
            changed=tally.tags_changed,
            blobs=tally.blobs_fetched,
            bytes=tally.bytes_fetched,
            failures=tally.failures,
        )

    async def _run(self, tally: Tally) -> None:
        for name in await self._repositories():
            tags = await self._attempt(tally, name, self._tags(name))
            if tags is None:
                continue
            tally.tags_matched += len(tags)
            for tag in tags:
                if self._exhausted():
                    raise Paused()
                if await self._attempt(tally, f"{name}:{tag}", self._warmer.tag(name, tag, tally)):
                    self._probe = (name, tag)

    async def _attempt(self, tally: Tally, what: str, work: Coroutine[Any, Any, T]) -> T | None:
        """What ``work`` answers, or None when it failed (counted and logged: the run
        goes on). ``Paused`` ends the run."""
        try:
            return await work
        except Paused:
            raise
        except RegistryError as e:
            tally.failures += 1
            log.warn(
                "prefetch {policy}: {what}: {reason}",
                policy=self.policy.name,
                what=what,
                reason=e.message,
            )
        except Exception:
            tally.failures += 1
            log.failure("prefetch {policy}: {what} failed", policy=self.policy.name, what=what)
        return None

    async def _repositories(self) -> list[str]:
        """The policy's repositories: named ones, and the cached repositories of this
        upstream that a pattern matches."""
        repository = self.cache.upstream.repository
        named = [repository(p) for p in self.policy.repositories if not is_pattern(p)]
        patterns = [repository(p) for p in self.policy.repositories if is_pattern(p)]
        found: list[str] = []
        if patterns:
            found = [n for n in await self.cache.repositories() if matches(n, patterns)]
        return list(dict.fromkeys([*named, *found]))

    async def _tags(self, name: str) -> list[str]:
        include, exclude = self.policy.tags, self.policy.exclude
        if not needs_listing(include):
            return select_tags(include, include, exclude)
        body, _ = await self.cache.tags(name, None, None)
        listed = json.loads(body).get("tags") or []
        return select_tags([t for t in listed if isinstance(t, str)], include, exclude)

    # -- the rate-limit budget -------------------------------------------------------

    @property
    def budget(self) -> Budget:
        remote = self.cache.upstream
        return budget(remote.ratelimit_remaining, remote.ratelimit_limit, self.reserve)

    def _exhausted(self) -> bool:
        """Below the reserve (logged once when that changes)."""
        now = self.budget
        if now.exhausted != self.paused:
            self.paused = now.exhausted
            if now.exhausted:
                self.totals["pauses"] += 1
            log.info(
                "prefetch {policy} {what}: {upstream} rate limit remaining {remaining}, "
                "reserve for on-demand pulls {reserve}",
                policy=self.policy.name,
                what="paused" if now.exhausted else "resumed",
                upstream=self.cache.upstream.name,
                remaining=now.remaining,
                reserve=now.reserve,
            )
        return now.exhausted

    async def _paused_at_start(self) -> bool:
        """Still paused: one ``HEAD`` (not counted by Docker Hub) to see the budget
        again, then the answer."""
        if not self.paused:
            return self._exhausted()
        if self._probe is not None:
            name, tag = self._probe
            remote = self.cache.upstream
            try:
                await remote.head_manifest(remote.repository(name), tag, ANY)
            except RegistryError as e:
                log.debug("prefetch: the budget probe failed: {reason}", reason=e.message)
        return self._exhausted()

    # -- what status.json shows ------------------------------------------------------

    def status(self) -> dict[str, Any]:
        policy = self.policy
        now = self.budget
        return {
            "name": policy.name,
            "upstream": policy.upstream,
            "repositories": list(policy.repositories),
            "tags": list(policy.tags),
            "exclude": list(policy.exclude),
            "platforms": list(policy.platforms),
            "interval": policy.interval,
            "state": self.state,
            "next_run": self.next_run,
            "current_run": self.current.as_json() if self.current is not None else None,
            "last_run": self.last.as_json() if self.last is not None else None,
            "last_ok": self.last_ok,
            "totals": dict(self.totals),
            "budget": {"remaining": now.remaining, "limit": now.limit, "reserve": now.reserve},
        }


class PrefetchService(Service):
    """Keeps the tags of ``policies`` warm in ``mirrors``: a ``PolicyRunner`` each,
    blobs fetched ``concurrency`` at a time in all. ``reserve`` is the rate-limit
    reserve of policies that set none."""

    def __init__(
        self,
        clock: ReactorTime,
        mirrors: Mirrors,
        policies: Sequence[PrefetchPolicy],
        *,
        reserve: Reserve,
        concurrency: int = 3,
    ) -> None:
        self._slots = DeferredSemaphore(concurrency)
        self.concurrency = concurrency
        self.runners = [
            PolicyRunner(
                clock,
                mirrors.by_name[policy.upstream],
                policy,
                policy.reserve or reserve,
                self._slots,
            )
            for policy in policies
        ]

    def startService(self) -> None:
        super().startService()
        for runner in self.runners:
            runner.start()

    def stopService(self) -> None:
        super().stopService()
        for runner in self.runners:
            runner.stop()

    def status(self) -> dict[str, Any]:
        """What the status page shows (JSON-able; times are the clock's seconds)."""
        return {
            "concurrency": self.concurrency,
            "policies": [runner.status() for runner in self.runners],
        }
