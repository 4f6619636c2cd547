"""Who checked which tag when: the seam that lets one upstream ``HEAD`` per tag and
freshness window serve every client (and, on Redis, every replica).

A tag is fresh for a media type while less than its upstream's freshness window
(``regmirror.tag_freshness``) has passed since it was last checked upstream (or served
stale because the upstream could not be asked). ``TagFreshness`` is a typing
``Protocol`` for the reasons given in ``regmirror.fetch.inflight``; ``LocalTagFreshness``
keeps the check times in memory, ``regmirror.testing.FakeTagFreshness`` is its fake.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import attrs

from regmirror.reactor import ReactorTime


@attrs.frozen
class TagRef:
    upstream: str
    repository: str  # as the upstream names it
    tag: str


@runtime_checkable
class TagFreshness(Protocol):
    def fresh(self, tag: TagRef, media_type: str, window: float) -> bool:
        """Checked less than ``window`` seconds ago (for clients of ``media_type``)."""

    def checked(self, tag: TagRef, media_type: str, when: float) -> None:
        """The tag was checked (or served stale) at ``when`` (the clock's seconds)."""

    def forget(self, tag: TagRef) -> None:
        """The tag is gone or changed: never fresh until checked again."""


class LocalTagFreshness:
    """``TagFreshness`` in one process's memory."""

    def __init__(self, clock: ReactorTime) -> None:
        self._clock = clock
        self._checked: dict[TagRef, dict[str, float]] = {}

    def fresh(self, tag: TagRef, media_type: str, window: float) -> bool:
        when = self._checked.get(tag, {}).get(media_type, float("-inf"))
        return self._clock.seconds() - when < window

    def checked(self, tag: TagRef, media_type: str, when: float) -> None:
        self._checked.setdefault(tag, {})[media_type] = when

    def forget(self, tag: TagRef) -> None:
        self._checked.pop(tag, None)
