"""Content-addressable storage on a local file system, with atomic commits.

Layout (DESIGN.md)::

    ROOT/blobs/sha256/ab/abcdef...          verified content (blobs and manifests)
    ROOT/blobs/sha256/ab/abcdef....type     a manifest's media type, beside it
    ROOT/repositories/UP/NAME/_manifests/sha256/<hex>   the repository references it
    ROOT/repositories/UP/NAME/_layers/sha256/<hex>      a blob was fetched for it
    ROOT/repositories/UP/NAME/_tags/<tag>.json          media type -> digest
    ROOT/repositories/UP/NAME/_taglist.json             the last full tag list seen
    ROOT/repositories/UP/NAME/_referrers/sha256/<hex>.json  referrers of a subject
    ROOT/_tmp/                              in-flight downloads (swept at start-up)
    ROOT/_tmp/<replica>/                    ... of one replica of a cluster
    ROOT/_state/reaper.sqlite3              the reaper's ledger (not in a cluster)
    ROOT/_state/admin.sock                  the running mirror's admin socket (the CLI's)
    ROOT/_quarantine/sha256/<hex>           content that failed ``regmirror fsck``

No module outside this package builds a path in it: the reaper asks for a ``scan`` and
for ``remove``, the mirror for ``has_link``; ``regmirror.storage.repositories`` reads
the repositories whole, ``regmirror.storage.check`` re-hashes and quarantines.

Every path is built from names and digests that were validated before they got here
(``regmirror.domain.names``, ``regmirror.domain.digest``); content becomes visible only
by ``rename`` from ``_tmp`` (same file system), after its digest matched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import attrs

from regmirror.domain.digest import Digest
from regmirror.domain.errors import DigestInvalid
from regmirror.domain.kinds import Kind
from regmirror.domain.references import manifest_references
from regmirror.logs import get_logger

log = get_logger()

_LINKS = {Kind.MANIFEST: "_manifests", Kind.BLOB: "_layers"}  # per-repository links
_TAGS = "_tags"
_REFERRERS = "_referrers"
_BLOB, _MANIFEST = Kind.BLOB.value, Kind.MANIFEST.value


@attrs.frozen
class TempFile:
    fd: int
    path: Path


@attrs.frozen
class Stored:
    """Verified content found on disk by ``Store.scan``."""

    digest: Digest
    kind: Kind
    size: int
    mtime: float
    refs: tuple[Digest, ...] = ()  # what a manifest references


class Named(NamedTuple):
    """A verified blob or manifest found on disk by ``Store.names``: a tuple, light
    enough to list a million of."""

    digest: str  # "algorithm:hex", a valid digest
    kind: str  # a ``Kind`` value


class Listed(NamedTuple):
    """A verified blob or manifest found on disk by ``Store.listing``, light enough to
    list a million of (a tuple, the row the reaper's state database inserts)."""

    digest: str  # "algorithm:hex", a valid digest
    kind: str  # a ``Kind`` value
    size: int
    mtime: float


class Store:
    """Files on disk. Small metadata writes are synchronous; blob bodies are written by
    the fetch in bounded chunks, and fsync runs in a thread (see ``regmirror.fetch``)."""

    def __init__(self, root: Path, replica: str = "") -> None:
        """``replica``: this replica's name in a cluster sharing the store; its temporary
        files are then in ``_tmp/<replica>/``, the only ones it sweeps."""
        self.root = root.absolute()
        self.blobs = self.root / "blobs"
        self.repositories = self.root / "repositories"
        self.tmp = self.root / "_tmp" / replica if replica else self.root / "_tmp"
        self.state = self.root / "_state"
        self.reaper_state = self.state / "reaper.sqlite3"
        self.admin_socket = self.state / "admin.sock"
        self.quarantine = self.root / "_quarantine"

    def prepare(self) -> int:
        """Create the directories and sweep the leftovers of a crash; returns files swept."""
        for path in (self.blobs, self.repositories, self.tmp, self.state):
            path.mkdir(parents=True, exist_ok=True)
        swept = 0
        for entry in os.scandir(self.tmp):
            try:
                os.unlink(entry.path)
                swept += 1
            except OSError as e:
                log.warn("cannot remove {path}: {error}", path=entry.path, error=e.strerror)
        return swept

    # -- blobs -----------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def open_blob(self, digest: Digest) -> tuple[int, int] | None:
        """Open a committed blob for reading: (fd, size), or None when it is not here."""
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        return fd, os.fstat(fd).st_size

    def blob_size(self, digest: Digest) -> int | None:
        try:
            return os.stat(self.blob_path(digest)).st_size
        except FileNotFoundError:
            return None

    def new_temp(self) -> TempFile:
        """A new, exclusively created temporary file in ``_tmp``."""
        while True:
            path = self.tmp / secrets.token_hex(12)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                continue
            return TempFile(fd, path)

    def probe_writable(self) -> str | None:
        """Create and remove a file in ``_tmp`` (readiness): None if that worked, else
        why not."""
        try:
            temp = self.new_temp()
        except OSError as e:
            return f"{self.tmp}: {e.strerror or e}"
        os.close(temp.fd)
        self.discard(temp.path)
        return None

    def has_room(self, size: int) -> bool:
        """Whether the file system of ``_tmp`` has ``size`` bytes free (and 1 MiB more,
        for the metadata written beside a blob). True if that cannot be known."""
        try:
            st = os.statvfs(self.tmp)
        except OSError:
            return True
        return st.f_bavail * st.f_frsize >= size + (1 << 20)

    def commit(self, temp: Path, digest: Digest) -> Path:
        """Make verified content visible under its digest (atomic rename)."""
        final = self.blob_path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(temp, final)
        return final

    def discard(self, path: Path) -> None:
        """Remove a file if it is there."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    # -- manifests -------------------------------------------------------------------

    def write_manifest(self, digest: Digest, data: bytes, media_type: str) -> None:
        """Store a verified manifest and its media type (each by atomic rename)."""
        final = self.blob_path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        self._write_atomic(final.with_name(final.name + ".type"), media_type.encode())
        if not final.exists():
            self._write_atomic(final, data)

    def read_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
            media_type = path.with_name(path.name + ".type").read_text().strip()
        except FileNotFoundError:
            return None
        if not media_type or Digest.of(data, digest.algorithm) != digest:
            log.warn("manifest {digest} on disk is damaged; ignoring it", digest=str(digest))
            return None
        return data, media_type

    # -- repositories ----------------------------------------------------------------

    def repo_dir(self, upstream: str, name: str) -> Path:
        return self.repositories / upstream / name

    def _link_path(self, upstream: str, name: str, digest: Digest, kind: Kind) -> Path:
        return self.repo_dir(upstream, name) / _LINKS[kind] / digest.algorithm / digest.hex

    def _tag_path(self, upstream: str, name: str, tag: str) -> Path:
        return self.repo_dir(upstream, name) / _TAGS / f"{tag}.json"

    def link_manifest(self, upstream: str, name: str, digest: Digest) -> None:
        self._touch(self._link_path(upstream, name, digest, Kind.MANIFEST))

    def link_blob(self, upstream: str, name: str, digest: Digest) -> None:
        self._touch(self._link_path(upstream, name, digest, Kind.BLOB))

    def has_link(self, upstream: str, name: str, digest: Digest, kind: Kind) -> bool:
        """Whether the repository is known to reference ``digest`` (a link was made)."""
        return self._link_path(upstream, name, digest, kind).exists()

    def read_tag(self, upstream: str, name: str, tag: str) -> dict[str, str]:
        """The digests last seen for a tag, per manifest media type."""
        data = self._read_json(self._tag_path(upstream, name, tag))
        variants = data.get("variants") if isinstance(data, dict) else None
        if not isinstance(variants, dict):
            return {}
        return {str(k): str(v) for k, v in variants.items()}

    def write_tag(self, upstream: str, name: str, tag: str, variants: dict[str, str]) -> None:
        path = self._tag_path(upstream, name, tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_atomic(path, json.dumps({"variants": variants}).encode())

    def delete_tag(self, upstream: str, name: str, tag: str) -> None:
        self.discard(self._tag_path(upstream, name, tag))

    def read_tag_list(self, upstream: str, name: str) -> list[str] | None:
        data = self._read_json(self.repo_dir(upstream, name) / "_taglist.json")
        if not isinstance(data, list):
            return None
        return [str(t) for t in data]

    def write_tag_list(self, upstream: str, name: str, tags: list[str]) -> None:
        path = self.repo_dir(upstream, name) / "_taglist.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_atomic(path, json.dumps(tags).encode())

    def _referrers_path(self, upstream: str, name: str, subject: Digest) -> Path:
        directory = self.repo_dir(upstream, name) / _REFERRERS / subject.algorithm
        return directory / f"{subject.hex}.json"

    def read_referrers(self, upstream: str, name: str, subject: Digest) -> bytes | None:
        """The referrers last seen for ``subject`` in the repository, as written."""
        try:
            return self._referrers_path(upstream, name, subject).read_bytes()
        except FileNotFoundError:
            return None

    def write_referrers(self, upstream: str, name: str, subject: Digest, data: bytes) -> None:
        path = self._referrers_path(upstream, name, subject)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_atomic(path, data)

    def delete_referrers(self, upstream: str, name: str, subject: Digest) -> None:
        self.discard(self._referrers_path(upstream, name, subject))

    def catalog(self, upstream: str) -> list[str]:
        """Repositories with at least one cached manifest (a directory walk: call in a
        thread)."""
        base = self.repositories / upstream
        names = []
        for dirpath, dirnames, _ in os.walk(base):
            if _LINKS[Kind.MANIFEST] in dirnames:
                names.append(os.path.relpath(dirpath, base))
            dirnames[:] = [d for d in dirnames if not d.startswith("_")]
        return sorted(names)

    # -- what the reaper needs: everything there is, and removing it ----------------

    def scan(self) -> list[Stored]:
        """Every verified blob and manifest, with what each manifest references (a
        directory walk: call it in a thread)."""
        found = []
        for listed in self.listing():
            digest = Digest.parse(listed.digest)
            kind = Kind(listed.kind)
            refs = self.manifest_refs(listed.digest) if kind is Kind.MANIFEST else ()
            found.append(Stored(digest, kind, listed.size, listed.mtime, refs))
        return found

    def listing(self) -> Iterator[Listed]:
        """Every verified blob and manifest with its size and mtime, one directory at a
        time (a walk: call it in a thread)."""
        for directory in self._blob_dirs():
            for named, entry in directory:
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue  # removed meanwhile
                yield Listed(named.digest, named.kind, stat.st_size, stat.st_mtime)

    def names(self) -> Iterator[Named]:
        """Every verified blob and manifest by name only, without a ``stat`` per file
        (a walk: call it in a thread)."""
        for directory in self._blob_dirs():
            for named, _ in directory:
                yield named

    def _blob_dirs(self) -> Iterator[list[tuple[Named, os.DirEntry[str]]]]:
        """The verified content of each directory of ``blobs/``, one listing at a time:
        a manifest is known by the ``.type`` file beside it in the same listing."""
        for algorithm_dir in _dirs(self.blobs):
            algorithm = os.path.basename(algorithm_dir)
            valid = _hex_names(algorithm)
            if valid is None:
                continue  # not ours
            for prefix_dir in _dirs(algorithm_dir):
                try:
                    with os.scandir(prefix_dir) as it:
                        entries = list(it)
                except FileNotFoundError:
                    continue
                typed = {e.name[:-5] for e in entries if e.name.endswith(".type")}
                found = []
                for entry in entries:
                    name = entry.name
                    if valid(name) and entry.is_file():
                        kind = _MANIFEST if name in typed else _BLOB
                        found.append((Named(f"{algorithm}:{name}", kind), entry))
                yield found

    def stat_named(self, named: Named) -> Listed | None:
        """``named`` with its size and mtime; None when it is gone."""
        algorithm, _, hexpart = named.digest.partition(":")
        try:
            stat = os.stat(f"{self.blobs}/{algorithm}/{hexpart[:2]}/{hexpart}")
        except FileNotFoundError:
            return None
        return Listed(named.digest, named.kind, stat.st_size, stat.st_mtime)

    def manifest_refs(self, digest: str) -> tuple[Digest, ...]:
        """What the stored manifest ``digest`` ("algorithm:hex") references; () when it
        cannot be read."""
        try:
            path = self.blob_path(Digest.parse(digest))
            with open(path, "rb") as f:
                return manifest_references(f.read())
        except (OSError, DigestInvalid):
            return ()

    def remove(self, digests: Iterable[Digest]) -> int:
        """Delete content, with the tags that resolve to it, the repository links to it
        and the referrers recorded for it as a subject (a directory walk: call it in a
        thread). Returns the bytes freed."""
        freed = 0
        gone = set(digests)
        for digest in gone:
            path = self.blob_path(digest)
            try:
                freed += path.stat().st_size
            except FileNotFoundError:
                pass
            self.discard(path)
            self.discard(path.with_name(path.name + ".type"))
        if gone:
            self._unlink_references(gone)
        return freed

    def _unlink_references(self, gone: set[Digest]) -> None:
        texts = {str(d) for d in gone}
        link_dirs = set(_LINKS.values())
        for dirpath, _, filenames in os.walk(self.repositories):
            base = os.path.basename(dirpath)
            if base == _TAGS:
                for name in filenames:
                    path = Path(dirpath, name)
                    try:
                        variants = json.loads(path.read_bytes()).get("variants", {})
                        if any(v in texts for v in variants.values()):
                            self.discard(path)
                    except (OSError, ValueError, AttributeError):
                        continue  # gone, or damaged: never served as a tag either
            elif os.path.basename(os.path.dirname(dirpath)) in link_dirs:
                for name in filenames:
                    if Digest(base, name) in gone:
                        self.discard(Path(dirpath, name))
            elif os.path.basename(os.path.dirname(dirpath)) == _REFERRERS:
                for name in filenames:
                    if Digest(base, name.removesuffix(".json")) in gone:
                        self.discard(Path(dirpath, name))

    # -- helpers ---------------------------------------------------------------------

    def _touch(self, path: Path) -> None:
        try:
            path.touch()
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()

    def _read_json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            log.warn("ignoring damaged metadata file {path}", path=str(path))
            return None

    def _write_atomic(self, path: Path, data: bytes) -> None:
        temp = self.new_temp()
        try:
            with os.fdopen(temp.fd, "wb") as f:
                f.write(data)
            os.rename(temp.path, path)
        except BaseException:
            self.discard(temp.path)
            raise


def _dirs(path: Path | str) -> list[str]:
    try:
        return [e.path for e in os.scandir(path) if e.is_dir()]
    except FileNotFoundError:
        return []


def _hex_names(algorithm: str) -> Callable[[str], object] | None:
    """A check of file names under ``blobs/ALGORITHM/``: what ``Digest.parse`` accepts
    as the hex part (without parsing a million of them); None for an algorithm it does
    not accept."""
    try:
        length = len(hashlib.new(algorithm).hexdigest())
        Digest.parse(f"{algorithm}:{'0' * length}")
    except (ValueError, TypeError, DigestInvalid):
        return None
    return re.compile(f"[0-9a-f]{{{length}}}").fullmatch


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
