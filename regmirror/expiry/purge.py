"""Removing content on an operator's word (``regmirror purge``, ``regmirror fsck
--repair``), with the reaper's rules.

A ``Target`` is a tag (its tag link goes, the content stays until it expires), a
repository (its tags and links go, and the blobs and manifests that no other
repository references), or a digest (that content, everywhere: the store also drops
the tags that resolve to it and every link). ``plan`` works out what that means from
the files (``regmirror.storage.repositories``); ``Purger`` carries it out:

- nothing is removed while any of the content is being read or fetched (``in_use``):
  the purge is refused, naming the busy digests, and can be retried (marking content
  to remove once its readers are done would leave a purge half done for as long as a
  slow client reads);
- otherwise each entry is dropped from the ledger (``drop``), whoever holds a copy in
  memory is told (``on_removed``, ``on_tag_removed``), then the files are deleted (in a
  thread).

The running mirror builds one behind its admin socket (``regmirror.api.admin``); the
CLI, when no mirror runs, builds one on the store with nothing in use and the reaper's
state database for ``drop``: the same code either way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from regmirror.domain.digest import Digest
from regmirror.domain.kinds import Kind
from regmirror.storage.check import Verdict, quarantine, verify
from regmirror.storage.repositories import RepoKey, Repositories
from regmirror.storage.store import Store

RunInThread = Callable[..., "Deferred[Any]"]


@attrs.frozen
class Target:
    """What to purge: ``digest`` everywhere, or ``upstream``'s ``repository`` (as the
    store names it), or one ``tag`` of it."""

    upstream: str = ""
    repository: str = ""
    tag: str = ""
    digest: Digest | None = None

    def __str__(self) -> str:
        if self.digest is not None:
            return str(self.digest)
        return f"{self.upstream}/{self.repository}" + (f":{self.tag}" if self.tag else "")

    def as_json(self) -> dict[str, str]:
        out = {"upstream": self.upstream, "repository": self.repository, "tag": self.tag}
        return {"digest": str(self.digest)} if self.digest is not None else out

    @classmethod
    def from_json(cls, data: object) -> Target:
        """Raises ``ValueError`` (or ``DigestInvalid``) for anything malformed."""
        if not isinstance(data, Mapping) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError("expected an object of strings")
        if data.get("digest"):
            return cls(digest=Digest.parse(data["digest"]))
        if not data.get("upstream") or not data.get("repository"):
            raise ValueError("expected a digest, or an upstream and a repository")
        return cls(data["upstream"], data["repository"], data.get("tag", ""))


@attrs.frozen
class Plan:
    """What purging a target removes."""

    target: Target
    tags: tuple[tuple[RepoKey, str], ...] = ()
    repositories: tuple[RepoKey, ...] = ()
    content: tuple[tuple[Digest, Kind], ...] = ()

    @property
    def matched(self) -> bool:
        return bool(self.tags or self.repositories or self.content)


@attrs.frozen
class Outcome:
    """What a purge did: ``busy`` names what was in use (then nothing was removed)."""

    plan: Plan
    busy: tuple[Digest, ...] = ()
    freed: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "target": str(self.plan.target),
            "matched": self.plan.matched,
            "removed": not self.busy and self.plan.matched,
            "busy": [str(d) for d in self.busy],
            "tags": [f"{key}:{tag}" for key, tag in self.plan.tags],
            "repositories": [str(key) for key in self.plan.repositories],
            "content": [{"digest": str(d), "kind": str(k)} for d, k in self.plan.content],
            "freed": self.freed,
        }


def plan(store: Store, target: Target) -> Plan:
    """Work out what purging ``target`` removes (blocking: a walk of the repositories)."""
    repos = Repositories(store)
    if target.digest is not None:
        kind = repos.kind(target.digest)
        return Plan(target, content=((target.digest, kind),) if kind else ())
    key = RepoKey(target.upstream, target.repository)
    found = repos.read(key)
    if found is None:
        return Plan(target)
    if target.tag:
        return Plan(target, tags=((key, target.tag),) if target.tag in found.tags else ())
    others: set[Digest] = set()
    for other_key in repos.keys():
        other = repos.read(other_key) if other_key != key else None
        if other is not None:
            others |= repos.closure(other.roots())
    content = []
    for digest in sorted(repos.closure(found.roots()) - others):
        kind = repos.kind(digest)
        if kind is not None:
            content.append((digest, kind))
    return Plan(
        target,
        tags=tuple((key, tag) for tag in found.tags),
        repositories=(key,),
        content=tuple(content),
    )


def delete(store: Store, plan: Plan) -> int:
    """Delete what ``plan`` names (blocking); returns the bytes freed."""
    freed = store.remove([d for d, _ in plan.content])
    for key, tag in plan.tags:
        store.delete_tag(key.upstream, key.name, tag)
    repos = Repositories(store)
    for key in plan.repositories:
        repos.remove(key)
    return freed


@attrs.frozen
class Repair:
    """What ``quarantine`` found of each digest it was given."""

    verdicts: Mapping[Digest, Verdict]

    def as_json(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {v.value: [] for v in Verdict}
        for digest, verdict in sorted(self.verdicts.items()):
            out[verdict.value].append(str(digest))
        return {"quarantined" if k == "damaged" else k: v for k, v in out.items()}


class Purger:
    """Purges and quarantines with the reaper's rules (see the module's docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        run_in_thread: RunInThread,
        in_use: Callable[[Digest], bool],
        drop: Callable[[Digest], object],
        on_removed: Callable[[Kind, Digest], None],
        on_tag_removed: Callable[[str, str, str], None],
    ) -> None:
        self._store = store
        self._run = run_in_thread
        self._in_use = in_use
        self._drop = drop
        self._on_removed = on_removed
        self._on_tag_removed = on_tag_removed

    async def purge(self, target: Target) -> Outcome:
        planned: Plan = await self._run(plan, self._store, target)
        busy = tuple(d for d, _ in planned.content if self._in_use(d))
        if busy or not planned.matched:
            return Outcome(planned, busy)
        for digest, kind in planned.content:
            self._forget(kind, digest)
        for key, tag in planned.tags:
            self._on_tag_removed(key.upstream, key.name, tag)
        freed: int = await self._run(delete, self._store, planned)
        return Outcome(planned, (), freed)

    async def quarantine(self, digests: list[Digest]) -> Repair:
        """Re-hash each digest (in a thread) and move the damaged ones aside; a reader
        that has one open keeps its descriptor, the next request fetches it again."""
        verdicts = {}
        for digest in dict.fromkeys(digests):
            verdict: Verdict = await self._run(verify, self._store, digest)
            if verdict is Verdict.DAMAGED:
                kind = await self._run(Repositories(self._store).kind, digest)
                moved = await self._run(quarantine, self._store, digest)
                if moved:
                    self._forget(kind or Kind.BLOB, digest)
            verdicts[digest] = verdict
        return Repair(verdicts)

    def _forget(self, kind: Kind, digest: Digest) -> None:
        self._drop(digest)
        self._on_removed(kind, digest)
