"""Tag freshness shared by the replicas of a cluster, in Redis: one upstream check per
tag and window across the cluster.

Per (upstream, repository, tag, media type) one key, ``<name>:tag|UP|REPO|TAG|TYPE``,
holds the digest the last check found and expires with the freshness window (``SET ..
PX window``). Before a replica asks the upstream, ``settle`` runs one script: the most
recent of those keys for a type the client accepts (``Seen``: served from the shared
store, no upstream request), else the claim of the check, ``SET NX PX`` on
``<name>:tagcheck|UP|REPO|TAG|ACCEPT`` (``Turn``): the replica that gets it asks the
upstream; the others poll for its result every ``POLL`` seconds, and check themselves if
none came before the claim expired (its holder died). ``Tags`` keeps the digests of each
tag in process memory; a replica that learns of a check here records it there
(``Tags._adopt``) and in its own ``LocalTagFreshness``, so later requests within the
window are answered without asking Redis again.

Redis unreachable: every call answers as ``LocalTagFreshness`` does (the turn is this
replica's): the tag is checked once per window per replica until Redis is back.
"""

from __future__ import annotations

import hashlib
from typing import Any

from regmirror.coord.redis import Coordinator, CoordinatorDown, sleep
from regmirror.domain.media import MANIFEST_TYPES, Accept
from regmirror.logs import get_logger
from regmirror.mirror.freshness import LocalTagFreshness, Seen, TagRef, Turn
from regmirror.reactor import ReactorTime

log = get_logger()

POLL = 0.02  # seconds between looks while another replica checks the tag
CLAIM = 15.0  # seconds a claim to check a tag lasts (its holder died: the next one checks)

# KEYS: the fresh keys of the accepted types, then the claim key. ARGV: the types (in
# the order of KEYS), then this replica's name and the claim's lifetime in ms.
# Returns {type, digest, ms left} for the most recent check, else "turn" or "wait".
SETTLE = """
local best, best_ttl, best_type = false, -1, false
local n = #KEYS - 1
for i = 1, n do
  local digest = redis.call('GET', KEYS[i])
  if digest then
    local ttl = redis.call('PTTL', KEYS[i])
    if ttl > best_ttl then best, best_ttl, best_type = digest, ttl, ARGV[i] end
  end
end
if best then return {best_type, best, best_ttl} end
if redis.call('SET', KEYS[n + 1], ARGV[n + 1], 'NX', 'PX', ARGV[n + 2]) then
  return 'turn'
end
return 'wait'
"""

# KEYS: the claim; ARGV: this replica's name. Gives the claim back if it is still ours.
GIVE_BACK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisTagFreshness:
    """``TagFreshness`` for a cluster (``replica`` names this one in its claims)."""

    def __init__(
        self,
        clock: ReactorTime,
        coordinator: Coordinator,
        replica: str,
        *,
        poll: float = POLL,
        claim: float = CLAIM,
    ) -> None:
        self._clock = clock
        self._coord = coordinator
        self._replica = replica
        self._poll = poll
        self._claim = claim
        self._local = LocalTagFreshness(clock)

    def _key(self, tag: TagRef, media_type: str) -> str:
        parts = (tag.upstream, tag.repository, tag.tag, media_type)
        return self._coord.key("tag|" + "|".join(parts))

    def fresh(self, tag: TagRef, media_type: str, window: float) -> bool:
        return self._local.fresh(tag, media_type, window)

    def checked(
        self, tag: TagRef, media_type: str, when: float, digest: str = "", window: float = 0.0
    ) -> None:
        self._local.checked(tag, media_type, when)
        left = window - (self._clock.seconds() - when)
        if digest and left > 0:
            key = self._key(tag, media_type)
            self._coord.send("SET", key, digest, "PX", max(1, int(left * 1000)))

    def forget(self, tag: TagRef) -> None:
        self._local.forget(tag)
        self._coord.send("DEL", *(self._key(tag, t) for t in MANIFEST_TYPES))

    async def settle(self, tag: TagRef, accept: Accept, window: float) -> Seen | Turn:
        if window <= 0:
            return Turn()
        types = sorted(accept.types) if accept.types is not None else list(MANIFEST_TYPES)
        claim = self._coord.key(
            "tagcheck|" + "|".join((tag.upstream, tag.repository, tag.tag, _accept_id(types)))
        )
        keys = [self._key(tag, t) for t in types] + [claim]
        args = [*types, self._replica, int(self._claim * 1000)]
        deadline = self._clock.seconds() + self._claim
        while True:
            try:
                answer: Any = await self._coord.eval(SETTLE, keys, args)
            except CoordinatorDown:
                return Turn()
            if isinstance(answer, list):
                media_type, digest, ttl = answer
                when = self._clock.seconds() - (window - int(ttl) / 1000)
                self._local.checked(tag, media_type, when)
                return Seen(media_type, digest, when)
            if answer == "turn":
                return Turn(lambda: self._give_back(claim))
            if self._clock.seconds() >= deadline:
                log.warn(
                    "cluster: no replica finished checking {repository}:{tag} in {s:g}s; "
                    "checking it here",
                    repository=tag.repository,
                    tag=tag.tag,
                    s=self._claim,
                )
                return Turn()
            await sleep(self._clock, self._poll)

    def _give_back(self, claim: str) -> None:
        self._coord.send_eval(GIVE_BACK, [claim], [self._replica])


def _accept_id(types: list[str]) -> str:
    return hashlib.sha256(",".join(types).encode()).hexdigest()[:16]
