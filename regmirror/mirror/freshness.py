"""Who checked which tag when: the seam that lets one upstream ``HEAD`` per tag and
freshness window serve every client (and, on Redis, every replica).

A tag is fresh for a media type while less than its upstream's freshness window
(``regmirror.tag_freshness``) has passed since it was last checked upstream (or served
stale because the upstream could not be asked). ``TagFreshness`` is a typing
``Protocol`` for the reasons given in ``regmirror.fetch.inflight``; ``LocalTagFreshness``
keeps the check times in memory, ``regmirror.testing.FakeTagFreshness`` is its fake,
``regmirror.mirror.redisfreshness.RedisTagFreshness`` shares the checks of a cluster.

Before asking the upstream about a tag, ``Tags`` asks ``settle``: a check that another
replica made within the window (``Seen``: the digest it found, read from the shared
store), or the turn to check it (``Turn``, handed back once the check is recorded).
One process has no one else to wait for: ``LocalTagFreshness`` always gives the turn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import attrs

from regmirror.domain.media import Accept
from regmirror.reactor import ReactorTime


@attrs.frozen(cache_hash=True)  # a dict key, hashed several times per tag request
class TagRef:
    upstream: str
    repository: str  # as the upstream names it
    tag: str


def _nothing() -> None:
    pass


@attrs.frozen
class Seen:
    """The tag was checked by another replica within the window: for clients of
    ``media_type`` it resolves to ``digest``; ``when`` is on this replica's clock."""

    media_type: str
    digest: str
    when: float


@attrs.frozen
class Turn:
    """This replica checks the tag upstream; ``done()`` once it recorded the check (or
    the check failed)."""

    done: Callable[[], None] = _nothing


@runtime_checkable
class TagFreshness(Protocol):
    def fresh(self, tag: TagRef, media_type: str, window: float) -> bool:
        """Checked less than ``window`` seconds ago (for clients of ``media_type``)."""

    def checked(
        self, tag: TagRef, media_type: str, when: float, digest: str = "", window: float = 0.0
    ) -> None:
        """The tag was checked (or served stale) at ``when`` (the clock's seconds): for
        clients of ``media_type`` it resolves to ``digest``, fresh for ``window``."""

    def forget(self, tag: TagRef) -> None:
        """The tag is gone or changed: never fresh until checked again."""

    async def settle(self, tag: TagRef, accept: Accept, window: float) -> Seen | Turn:
        """Before a check upstream: a check made elsewhere within ``window`` for a type
        ``accept`` takes, or this replica's turn to check."""


class LocalTagFreshness:
    """``TagFreshness`` in one process's memory."""

    def __init__(self, clock: ReactorTime) -> None:
        self._clock = clock
        self._checked: dict[TagRef, dict[str, float]] = {}

    def fresh(self, tag: TagRef, media_type: str, window: float) -> bool:
        when = self._checked.get(tag, {}).get(media_type, float("-inf"))
        return self._clock.seconds() - when < window

    def checked(
        self, tag: TagRef, media_type: str, when: float, digest: str = "", window: float = 0.0
    ) -> None:
        self._checked.setdefault(tag, {})[media_type] = when

    def forget(self, tag: TagRef) -> None:
        self._checked.pop(tag, None)

    async def settle(self, tag: TagRef, accept: Accept, window: float) -> Seen | Turn:
        return Turn()  # concurrent requests of this process share one check (Tags)
