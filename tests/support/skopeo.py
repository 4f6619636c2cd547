"""Pull images with the real ``skopeo`` client and check what landed on disk.

``skopeo copy docker://HOST/NAME:TAG dir:DEST`` writes, byte for byte as served:

* ``manifest.json``: the manifest it was asked for (for an index copied with
  ``--multi-arch all``: the index), ``version``: ``Directory Transport Version: 1.1``;
* one file per blob named by the digest's hex (layers are *not* decompressed: the
  ``dir:`` transport keeps the source compression unless ``--dest-decompress``);
* with ``--multi-arch all``: one ``<hex>.manifest.json`` per child manifest.

We pass ``--preserve-digests`` so that skopeo fails rather than rewrite a manifest.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.images import Image, Manifest
from tests.support.process import require_tool


class SkopeoError(AssertionError):
    """skopeo failed; the message carries its command line and stderr."""


def skopeo_copy(
    src_ref: str,
    dest_dir: Path | str,
    *,
    tls_verify: bool = False,
    all_platforms: bool = False,
    extra_args: Sequence[str] = (),
    timeout: float = 120.0,
    debug: bool = False,
    check: bool = True,
    creds: str | None = None,
    registries_conf: Path | str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``skopeo copy docker://SRC dir:DEST`` and return the finished process.

    ``src_ref`` is ``HOST:PORT/name:tag`` or ``...@sha256:...`` (``docker://`` is added
    if missing). ``all_platforms`` copies every image of an index
    (``--multi-arch all``; without it skopeo picks the one matching this machine).
    Raises ``SkopeoError`` with stderr when skopeo fails (unless ``check=False``) or
    runs longer than ``timeout`` seconds. ``creds`` (``USER:PASSWORD``) is sent to the
    source registry (default: no credentials at all); ``registries_conf`` is a
    ``registries.conf`` skopeo uses instead of the system's (its mirrors apply).
    """
    skopeo = require_tool("skopeo")
    Path(dest_dir).parent.mkdir(parents=True, exist_ok=True)  # dir: needs the parent
    src = src_ref if "://" in src_ref else f"docker://{src_ref}"
    argv = [skopeo]
    if debug:
        argv.append("--debug")
    if registries_conf is not None:
        argv.append(f"--registries-conf={registries_conf}")
    argv += [
        "copy",
        f"--src-tls-verify={'true' if tls_verify else 'false'}",
        f"--src-creds={creds}" if creds is not None else "--src-no-creds",
        "--preserve-digests",
        "--retry-times=0",
    ]
    if all_platforms:
        argv.append("--multi-arch=all")
    argv += [*extra_args, src, f"dir:{dest_dir}"]
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        raise SkopeoError(
            f"skopeo did not finish within {timeout:g}s: {' '.join(argv)}\n{stderr or ''}"
        ) from None
    if check and proc.returncode != 0:
        raise SkopeoError(
            f"skopeo exited with {proc.returncode}: {' '.join(argv)}\n"
            f"--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc


@dataclass(frozen=True)
class DirCheck:
    """What ``verify_dir`` found: the top manifest and the blob digests present."""

    manifest: Manifest
    blob_digests: frozenset[str]
    child_manifest_digests: frozenset[str]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_dir(dest_dir: Path | str, image: Image) -> DirCheck:
    """Check a ``dir:`` copy of ``image`` file by file; raise ``AssertionError`` if wrong.

    * ``manifest.json`` is byte-identical to the pushed top manifest, or (an index
      copied for one platform) to one of its children;
    * every blob file's sha256 equals its name and it is a blob of that manifest;
    * every blob (and, for an index, every child manifest) of that manifest is there;
    * no other file exists.
    """
    dest = Path(dest_dir)
    files = {p.name: p for p in dest.iterdir()}
    problems: list[str] = []

    top_bytes = files.pop("manifest.json").read_bytes() if "manifest.json" in files else None
    if top_bytes is None:
        raise AssertionError(f"{dest}: no manifest.json (files: {sorted(files)})")
    candidates = {m.data: m for m in image.manifests()}
    if top_bytes not in candidates:
        raise AssertionError(
            f"{dest}/manifest.json ({hashlib.sha256(top_bytes).hexdigest()}) is neither the "
            f"pushed manifest {image.digest} nor one of its children"
        )
    top = candidates[top_bytes]

    version = files.pop("version", None)
    if version is None:
        problems.append("no version file")
    elif not version.read_text().startswith("Directory Transport Version:"):
        problems.append(f"unexpected version file: {version.read_text()!r}")

    expected_blobs = {b.hex: b for b in top.blobs()}
    expected_children = {c.hex: c for c in top.children}
    blobs_seen: set[str] = set()
    children_seen: set[str] = set()
    for name, path in sorted(files.items()):
        if name.endswith(".manifest.json"):
            hex_ = name.removesuffix(".manifest.json")
            child = expected_children.get(hex_)
            if child is None:
                problems.append(f"unexpected child manifest {name}")
            elif path.read_bytes() != child.data:
                problems.append(f"{name} differs from the pushed manifest {child.digest}")
            else:
                children_seen.add(child.digest)
            continue
        blob = expected_blobs.get(name)
        if blob is None:
            problems.append(f"unexpected file {name}")
            continue
        actual = _sha256_file(path)
        if actual != name:
            problems.append(f"blob file {name} has sha256 {actual}")
        elif path.stat().st_size != blob.size:
            problems.append(f"blob file {name} has {path.stat().st_size} bytes, not {blob.size}")
        else:
            blobs_seen.add(blob.digest)
    for hex_, blob in expected_blobs.items():
        if blob.digest not in blobs_seen and hex_ not in files:
            problems.append(f"missing blob {blob.digest} ({blob.size} bytes)")
    for hex_, child in expected_children.items():
        if f"{hex_}.manifest.json" not in files:
            problems.append(f"missing child manifest {child.digest} ({child.platform})")
    if problems:
        raise AssertionError(
            f"{dest} is not a faithful copy of {image.name}:{image.tag}:\n  "
            + "\n  ".join(problems)
        )
    return DirCheck(top, frozenset(blobs_seen), frozenset(children_seen))
