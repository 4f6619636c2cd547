"""What a prefetch policy matches, and what the rate-limit budget allows (pure code)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping

import attrs

from regmirror.config import Reserve

_GLOB = re.compile(r"[*?\[]")


def is_pattern(text: str) -> bool:
    return _GLOB.search(text) is not None


def matches(text: str, patterns: Iterable[str]) -> bool:
    """``fnmatch`` (case-sensitive; ``*`` also matches ``/``) against any pattern."""
    return any(fnmatch.fnmatchcase(text, pattern) for pattern in patterns)


def select_tags(listed: Iterable[str], include: Iterable[str], exclude: Iterable[str]) -> list[str]:
    """The tags of ``listed`` matching a pattern of ``include`` and none of ``exclude``,
    in the order listed, once each."""
    include, exclude = tuple(include), tuple(exclude)
    return [
        tag for tag in dict.fromkeys(listed) if matches(tag, include) and not matches(tag, exclude)
    ]


def needs_listing(include: Iterable[str]) -> bool:
    """Whether the upstream's tag list must be read (a pattern), or the tags are named."""
    return any(is_pattern(tag) for tag in include)


def platform_matches(platform: object, wanted: Iterable[str]) -> bool:
    """Whether an index entry's ``platform`` is one of ``wanted`` (``os/arch`` or
    ``os/arch/variant``; without a variant, any variant matches). Nothing wanted: all."""
    wanted = tuple(wanted)
    if not wanted:
        return True
    if not isinstance(platform, Mapping):
        return False
    have = (
        str(platform.get("os", "")),
        str(platform.get("architecture", "")),
        str(platform.get("variant", "")),
    )
    for text in wanted:
        parts = text.split("/")
        if parts[0] == have[0] and parts[1] == have[1] and (len(parts) < 3 or parts[2] == have[2]):
            return True
    return False


def rate_count(header: str | None) -> int | None:
    """The count in a ``ratelimit-remaining``/``ratelimit-limit`` header
    (``76;w=21600``), or None."""
    if not header:
        return None
    text = header.split(";", 1)[0].strip()
    return int(text) if text.isdigit() else None


@attrs.frozen
class Budget:
    """An upstream's rate limit as last seen, and the reserve prefetching leaves."""

    remaining: int | None
    limit: int | None
    reserve: int | None

    @property
    def exhausted(self) -> bool:
        """Prefetching must wait: what is left is the reserve for on-demand pulls."""
        return (
            self.remaining is not None
            and self.reserve is not None
            and self.remaining <= self.reserve
        )


def budget(remaining: str | None, limit: str | None, reserve: Reserve) -> Budget:
    count = rate_count(limit)
    return Budget(rate_count(remaining), count, reserve.requests(count))
