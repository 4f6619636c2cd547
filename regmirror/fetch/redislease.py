"""This replica's lease on a digest in a cluster (``regmirror.fetch.redisinflight``):
renewed while the fetch runs, its progress reported through Redis for the replicas
that follow it, given back when it ends; and the Lua scripts that do it atomically."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from regmirror.domain.digest import Digest
from regmirror.fetch.blobfetch import BlobFetch, State
from regmirror.fetch.inflight import FetchLease
from regmirror.fetch.remote import Progress
from regmirror.logs import get_logger

if TYPE_CHECKING:
    from regmirror.fetch.redisinflight import RedisInFlight

log = get_logger()

REPORT_EVERY = 0.05  # seconds between progress reports of a fetch, at most
FINAL_KEEP = 60.0  # seconds a fetch's last report stays readable after it ended

# KEYS: lease, info. ARGV: our lease value, its lifetime (ms). Renews the lease if it is
# ours; takes it again if it is gone (Redis restarted empty). 1: ours, 0: lost.
RENEW = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] or not held then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('PEXPIRE', KEYS[2], 2 * ARGV[2])
  return 1
end
return 0
"""
# KEYS: info. ARGV: its value, its lifetime (ms), the channel, the report.
REPORT = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
# KEYS: lease. ARGV: our lease value. Gives the lease back if it is still ours.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: the readers sets to renew. ARGV: this replica, the entries' lifetime (ms).
REGISTER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
end
return #KEYS
"""


class RedisLease:
    """This replica's lease on a digest: renewed until the fetch ended, its progress
    reported; wraps the local lease (the fetch slot, the local bookkeeping)."""

    def __init__(self, owner: RedisInFlight, digest: Digest, value: str, local: FetchLease) -> None:
        self._owner = owner
        self._coord = owner._coord
        self.digest = digest
        self._value = value
        self._local = local
        self._fetch: BlobFetch | None = None
        self._report_due: Any = None
        self._ended = False
        self._renewal = LoopingCall(self.renew)
        self._renewal.clock = owner._clock
        self._renewal.start(owner.lease / 3, now=False).addErrback(
            lambda f: log.failure("cluster: renewing a lease stopped", f)
        )

    def _keys(self) -> tuple[str, str]:
        return self._owner._key("fetch", self.digest), self._owner._key("fetchinfo", self.digest)

    def renew(self) -> None:
        if self._ended or not self._coord.connected:
            return
        d = Deferred.fromCoroutine(
            self._coord.eval(RENEW, self._keys(), [self._value, int(self._owner.lease * 1000)])
        )

        def renewed(ours: object) -> None:
            if ours == 1 and self._fetch is not None:
                self._report()  # Redis may have restarted empty: say again where it is
            elif ours != 1 and not self._ended:
                log.warn(
                    "cluster: the lease on {digest} was taken by another replica; "
                    "finishing this fetch anyway",
                    digest=str(self.digest),
                )

        d.addCallbacks(renewed, lambda f: None)

    # -- FetchLease ------------------------------------------------------------------

    def started(self, fetch: BlobFetch) -> None:
        self._local.started(fetch)
        self._fetch = fetch
        fetch.follow(self)
        self._report()

    def ended(self, fetch: BlobFetch) -> None:
        self._end()
        self._report(final=True)
        self._coord.send_eval(RELEASE, [self._keys()[0]], [self._value])
        self._local.ended(fetch)

    def abandon(self) -> None:
        """``start`` failed (the upstream said no): give the lease back at once."""
        self._end()
        self._coord.send_eval(RELEASE, [self._keys()[0]], [self._value])

    def _end(self) -> None:
        self._ended = True
        if self._renewal.running:
            self._renewal.stop()
        if self._report_due is not None and self._report_due.active():
            self._report_due.cancel()
        if self._fetch is not None:
            self._fetch.unfollow(self)
        if self._owner._leases.get(self.digest) is self:
            del self._owner._leases[self.digest]

    # -- the fetch's Follower side: its progress, reported ---------------------------

    def fetch_changed(self) -> None:
        fetch = self._fetch
        if fetch is None or self._ended:
            return
        if fetch.state is not State.RUNNING:
            self._report()
        elif self._report_due is None or not self._report_due.active():
            self._report_due = self._owner._clock.callLater(REPORT_EVERY, self._report)

    def _report(self, *, final: bool = False) -> None:
        fetch = self._fetch
        if fetch is None:
            return
        progress = Progress(fetch.state, fetch.written, fetch.hashed, fetch.size)
        relative = PurePosixPath(Path(fetch.path).relative_to(self._owner._store.root))
        info = f"{self._owner._replica} {relative} {progress.encode()}"
        keep = FINAL_KEEP if final else 2 * self._owner.lease
        self._coord.send_eval(
            REPORT,
            [self._keys()[1]],
            [info, int(keep * 1000), self._owner._key("progress", self.digest), progress.encode()],
        )


def parse_info(info: str | None) -> tuple[str, str, Progress] | None:
    """(holder, temporary file relative to the store's root, last report)."""
    if not info:
        return None
    try:
        holder, relative, progress = info.split(" ", 2)
        parsed = Progress.decode(progress)
    except (ValueError, KeyError):
        return None
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts or path.parts[:1] != ("_tmp",):
        return None
    return holder, relative, parsed
