"""``regmirror.access``: which repositories clients may pull through the mirror.

``AccessRules`` are fnmatch patterns. A repository is known by several names: as the
client sent it (``ghcr.io/owner/app``, ``alpine``), as routed to its upstream
(``owner/app``), as that upstream names it (``library/alpine`` on Docker Hub), and
prefixed with the upstream's name (``docker.io/library/alpine``), so that one list can
hold rules for several upstreams. A name matching a ``deny`` pattern is denied; when
``allow`` patterns exist, a name must match one of them.

``Access`` applies the rules with those names, in one place, to requests (before any
upstream request) and to the catalog, whose entries are routed as a request for them
would be: ``ghcr.io/owner/app`` is checked with ghcr.io's naming.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from fnmatch import fnmatchcase

import attrs

from regmirror.domain.errors import Denied
from regmirror.mirror.cache import Cache
from regmirror.mirror.mirrors import Mirrors


@attrs.frozen
class AccessRules:
    """``regmirror.access``: deny and allow patterns."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    @property
    def restricts(self) -> bool:
        return bool(self.allow or self.deny)

    def allows(self, names: Iterable[str]) -> bool:
        """Whether the repository known by ``names`` (as sent, as named upstream) may be
        pulled: no name matches a deny pattern, and one matches an allow pattern (if
        there are any)."""
        forms = set(names)
        if any(fnmatchcase(n, p) for p in self.deny for n in forms):
            return False
        return not self.allow or any(fnmatchcase(n, p) for p in self.allow for n in forms)


class Access:
    """The rules applied to what clients ask for, each name as its upstream knows it."""

    def __init__(self, rules: AccessRules, mirrors: Mirrors) -> None:
        self._rules = rules
        self._mirrors = mirrors

    def allows(self, sent: str, name: str, cache: Cache) -> bool:
        """Whether the repository ``sent`` by a client, routed to ``cache`` as ``name``,
        may be pulled."""
        upstream = cache.upstream
        repository = upstream.repository(name)
        return self._rules.allows((sent, name, repository, f"{upstream.name}/{repository}"))

    def check(self, sent: str, name: str, cache: Cache) -> None:
        """Raise ``Denied`` (403) for a repository the rules deny."""
        if not self.allows(sent, name, cache):
            raise Denied("access to this repository is denied", {"name": sent})

    def filter_catalog(self, body: bytes) -> bytes:
        """A catalog page without the repositories the rules deny."""
        doc = json.loads(body)
        doc["repositories"] = [
            entry for entry in doc.get("repositories") or [] if self._listed(entry)
        ]
        return json.dumps(doc).encode()

    def _listed(self, entry: str) -> bool:
        cache, name = self._mirrors.pick(entry)
        return self.allows(entry, name, cache)
