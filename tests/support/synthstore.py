"""Synthetic stores: many small blobs (and manifests), written straight to disk in the
layout ``regmirror.storage.store`` uses, for tests and benchmarks of a large cache.

Entry ``i`` is a blob whose content, ``blob_data(i)`` (32 bytes), hashes to its file
name; with ``manifest_every=k``, every k-th entry is instead an image manifest (with its
``.type`` file) referencing the three blobs written just before it. Files are written in
threads (the system calls release the GIL): 1,000,000 entries take about a minute and
4 GB of disk (one block per file).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CHUNK = 10_000  # entries per task


def blob_data(i: int) -> bytes:
    return b"regmirror synthetic blob %06d\n" % i


def blob_digest(i: int) -> str:
    return "sha256:" + hashlib.sha256(blob_data(i)).hexdigest()


def manifest_data(i: int, refs: Sequence[str]) -> bytes:
    def descriptor(digest: str) -> dict[str, object]:
        return {"mediaType": "application/octet-stream", "digest": digest, "size": 32}

    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE,
            "config": descriptor(refs[0]),
            "layers": [descriptor(r) for r in refs[1:]],
            "annotations": {"synthetic": str(i)},
        },
        separators=(",", ":"),
    ).encode()


@dataclass(frozen=True)
class SyntheticStore:
    root: Path
    entries: int
    manifests: int
    blob: str  # the digest of entry 0 (a blob): one to GET


def _write(path: str, data: bytes, mtime: float | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def _chunk(
    blobs_dir: str,
    start: int,
    stop: int,
    manifest_every: int,
    mtime: Callable[[int], float] | None,
) -> int:
    recent: list[str] = []
    manifests = 0
    for i in range(start, stop):
        manifest = manifest_every and i % manifest_every == manifest_every - 1 and len(recent) >= 3
        data = manifest_data(i, recent[-3:]) if manifest else blob_data(i)
        hexdigest = hashlib.sha256(data).hexdigest()
        path = os.path.join(blobs_dir, hexdigest[:2], hexdigest)
        when = mtime(i) if mtime is not None else None
        _write(path, data, when)
        if manifest:
            _write(path + ".type", MEDIA_TYPE.encode(), when)
            manifests += 1
        else:
            recent.append("sha256:" + hexdigest)
    return manifests


def build_store(
    root: Path,
    entries: int,
    *,
    manifest_every: int = 0,
    mtime: Callable[[int], float] | None = None,
    threads: int = 4,
) -> SyntheticStore:
    """Write a store of ``entries`` entries under ``root`` (``mtime(i)``: entry ``i``'s
    modification time, else now). A store already there with the same parameters
    (``root/.synthetic``) is reused when ``mtime`` is None."""
    marker = root / ".synthetic"
    blobs_dir = root / "blobs" / "sha256"
    key = f"{entries} {manifest_every}"
    if mtime is None and marker.exists():
        words = marker.read_text().split()
        if " ".join(words[:2]) == key:
            return SyntheticStore(root, entries, int(words[2]), blob_digest(0))
    if root.exists():
        shutil.rmtree(root)
    for prefix in range(256):
        (blobs_dir / f"{prefix:02x}").mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        manifests = sum(
            pool.map(
                lambda start: _chunk(
                    str(blobs_dir), start, min(start + CHUNK, entries), manifest_every, mtime
                ),
                range(0, entries, CHUNK),
            )
        )
    marker.write_text(f"{key} {manifests}\n")
    return SyntheticStore(root, entries, manifests, blob_digest(0))
