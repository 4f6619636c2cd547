"""The repository side of the store, read whole: what ``regmirror ls`` lists and what a
purge removes (``regmirror.expiry.purge``).

A repository is a directory under ``ROOT/repositories/UPSTREAM/`` with manifest links
(``Store.catalog`` finds them); it holds its tags (tag -> digest per media type), its
links (manifests and, for private upstreams, blobs it is known to reference) and its
last tag list. What it *references* is the closure of those roots through the manifests
on disk (an index's children, an image's config and layers). Paths come from ``Store``
and the layout names in ``regmirror.storage.store``; every method walks or reads
files: call them in a thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs

from regmirror.domain.digest import Digest
from regmirror.domain.kinds import Kind
from regmirror.domain.references import manifest_references, valid_digests
from regmirror.storage.store import _LINKS, _TAGS, Store

_TAGLIST = "_taglist.json"


@attrs.frozen(order=True)
class RepoKey:
    """A repository of one upstream, as the store names it."""

    upstream: str
    name: str

    def __str__(self) -> str:
        return f"{self.upstream}/{self.name}"


@attrs.frozen
class Repository:
    """What the store holds for one repository."""

    key: RepoKey
    tags: Mapping[str, Mapping[str, str]]  # tag -> {media type: digest}
    manifests: frozenset[Digest]  # linked
    blobs: frozenset[Digest]  # linked (private upstreams)

    def roots(self) -> set[Digest]:
        """The digests it names itself: its tags' and its links."""
        found = set(self.manifests) | set(self.blobs)
        for variants in self.tags.values():
            found.update(valid_digests(variants.values()))
        return found


class Repositories:
    """Reads the repositories of one store (blocking: in a thread)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._refs: dict[Digest, tuple[Digest, ...]] = {}

    def keys(self) -> list[RepoKey]:
        """Every repository of every upstream, sorted."""
        try:
            upstreams = sorted(e.name for e in os.scandir(self._store.repositories) if e.is_dir())
        except FileNotFoundError:
            return []
        return [RepoKey(u, name) for u in upstreams for name in self._store.catalog(u)]

    def read(self, key: RepoKey) -> Repository | None:
        base = self._store.repo_dir(key.upstream, key.name)
        if not (base / _LINKS[Kind.MANIFEST]).is_dir():
            return None
        tags = {}
        for path in _files(base / _TAGS):
            if path.name.endswith(".json"):
                tag = path.name.removesuffix(".json")
                variants = self._store.read_tag(key.upstream, key.name, tag)
                if variants:
                    tags[tag] = variants
        return Repository(
            key,
            dict(sorted(tags.items())),
            frozenset(self._links(base / _LINKS[Kind.MANIFEST])),
            frozenset(self._links(base / _LINKS[Kind.BLOB])),
        )

    def kind(self, digest: Digest) -> Kind | None:
        """Whether the store holds ``digest`` as a manifest or a blob (None: not at all)."""
        path = self._store.blob_path(digest)
        if not path.is_file():
            return None
        return Kind.MANIFEST if path.with_name(path.name + ".type").exists() else Kind.BLOB

    def closure(self, roots: Iterable[Digest]) -> set[Digest]:
        """``roots`` and everything their manifests on disk reference, recursively."""
        seen: set[Digest] = set()
        todo = list(roots)
        while todo:
            digest = todo.pop()
            if digest in seen:
                continue
            seen.add(digest)
            todo.extend(self._references(digest))
        return seen

    def remove(self, key: RepoKey) -> None:
        """Delete a repository's tags, links and tag list (not a repository nested in
        it), and the directories this leaves empty."""
        base = self._store.repo_dir(key.upstream, key.name)
        for sub in (_TAGS, *_LINKS.values()):
            for dirpath, _, filenames in os.walk(base / sub, topdown=False):
                for name in filenames:
                    self._store.discard(Path(dirpath, name))
                _rmdir(Path(dirpath))
        self._store.discard(base / _TAGLIST)
        top = self._store.repositories
        path = base
        while path != top and path.is_relative_to(top) and _rmdir(path):
            path = path.parent

    def _references(self, digest: Digest) -> tuple[Digest, ...]:
        refs = self._refs.get(digest)
        if refs is None:
            found = self._store.read_manifest(digest) if self.kind(digest) else None
            refs = manifest_references(found[0]) if found is not None else ()
            self._refs[digest] = refs
        return refs

    def _links(self, directory: Path) -> list[Digest]:
        found = []
        for algorithm in _subdirs(directory):
            found.extend(valid_digests(f"{algorithm.name}:{p.name}" for p in _files(algorithm)))
        return found


def _files(directory: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(directory) if e.is_file()]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _subdirs(directory: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(directory) if e.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _rmdir(path: Path) -> bool:
    """Remove an empty directory; False if it is not empty (or not there)."""
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True
