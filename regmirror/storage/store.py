"""Content-addressable storage on a local file system, with atomic commits.

Layout (DESIGN.md)::

    ROOT/blobs/sha256/ab/abcdef...          verified content (blobs and manifests)
    ROOT/blobs/sha256/ab/abcdef....type     a manifest's media type, beside it
    ROOT/repositories/UPSTREAM/NAME/...     tags, per-repository links, tag lists
    ROOT/_tmp/                              in-flight downloads (swept at start-up)
    ROOT/_state/                            reaper and usage state

Every path is built from names and digests that were validated before they got here
(``regmirror.names``, ``regmirror.digest``); content becomes visible only by ``rename``
from ``_tmp`` (same file system), after its digest matched.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from pathlib import Path
from typing import Any

import attrs

from regmirror.domain.digest import Digest
from regmirror.logs import get_logger

log = get_logger()


@attrs.frozen
class TempFile:
    fd: int
    path: Path


class Store:
    """Files on disk. Small metadata writes are synchronous; blob bodies are written by
    the fetch in bounded chunks, and fsync runs in a thread (see ``regmirror.fetch``)."""

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.blobs = self.root / "blobs"
        self.repositories = self.root / "repositories"
        self.tmp = self.root / "_tmp"
        self.state = self.root / "_state"

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

    def link_manifest(self, upstream: str, name: str, digest: Digest) -> None:
        self._touch(self.repo_dir(upstream, name) / "_manifests" / digest.algorithm / digest.hex)

    def link_blob(self, upstream: str, name: str, digest: Digest) -> None:
        self._touch(self.repo_dir(upstream, name) / "_layers" / digest.algorithm / digest.hex)

    def read_tag(self, upstream: str, name: str, tag: str) -> dict[str, str]:
        """The digests last seen for a tag, per manifest media type."""
        data = self._read_json(self.repo_dir(upstream, name) / "_tags" / f"{tag}.json")
        variants = data.get("variants") if isinstance(data, dict) else None
        if not isinstance(variants, dict):
            return {}
        return {str(k): str(v) for k, v in variants.items()}

    def write_tag(self, upstream: str, name: str, tag: str, variants: dict[str, str]) -> None:
        path = self.repo_dir(upstream, name) / "_tags" / f"{tag}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_atomic(path, json.dumps({"variants": variants}).encode())

    def delete_tag(self, upstream: str, name: str, tag: str) -> None:
        try:
            os.unlink(self.repo_dir(upstream, name) / "_tags" / f"{tag}.json")
        except FileNotFoundError:
            pass

    def read_tag_list(self, upstream: str, name: str) -> list[str] | None:
        data = self._read_json(self.repo_dir(upstream, name) / "_taglist.json")
        if not isinstance(data, list):
            return None
        return [str(t) for t in data]

    def write_tag_list(self, upstream: str, name: str, tags: list[str]) -> None:
        path = self.repo_dir(upstream, name) / "_taglist.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_atomic(path, json.dumps(tags).encode())

    def catalog(self, upstream: str) -> list[str]:
        """Repositories with at least one cached manifest (a directory walk: call in a
        thread)."""
        base = self.repositories / upstream
        names = []
        for dirpath, dirnames, _ in os.walk(base):
            if "_manifests" in dirnames:
                names.append(os.path.relpath(dirpath, base))
            dirnames[:] = [d for d in dirnames if not d.startswith("_")]
        return sorted(names)

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


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
