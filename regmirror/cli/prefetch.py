"""``regmirror prefetch``: warm a running mirror's cache as a client would.

For each image: ``GET`` its manifest with the Accept header of a modern client; for an
index, ``GET`` each child manifest (every platform, or those of ``--platform``); then
``GET`` every blob (config and layers) and read it to its end, hashing it (a blob whose
bytes do not match its digest is an error) and discarding it. Each blob is fetched once
per run, however many images or platforms share it.

Cached or fetched is what the mirror says of each response in its ``X-Cache`` header
(``HIT``: served from the cache; ``MISS``: the upstream was asked); a mirror that does
not send it is counted as ``unknown``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from regmirror.cli.http import MirrorClient, error_message
from regmirror.cli.output import Exit, Failed
from regmirror.cli.refs import ImageRef
from regmirror.domain.media import INDEX_TYPES
from regmirror.mirror.prefetch.matching import platform_matches

ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)
CHUNK = 1024 * 1024


@attrs.frozen
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"{text!r} is not a platform like linux/amd64 or linux/arm/v7")
        return cls(*parts)

    def matches(self, platform: Any) -> bool:
        """An index entry's ``platform`` is this one (without a variant: any variant)."""
        return platform_matches(platform, [str(self)])

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@attrs.define
class ImageResult:
    image: str
    digest: str = ""
    manifests: int = 0
    blobs: int = 0
    bytes: int = 0
    fetched_bytes: int = 0
    cached_bytes: int = 0
    unknown_bytes: int = 0
    error: str = ""

    def count(self, size: int, cache: str | None) -> None:
        self.bytes += size
        if cache == "HIT":
            self.cached_bytes += size
        elif cache == "MISS":
            self.fetched_bytes += size
        else:
            self.unknown_bytes += size


Progress = Callable[[int, int], None]  # (bytes done now, total bytes) for one image


class Prefetch:
    """Walks images through one mirror; ``seen`` blobs are fetched once per run."""

    def __init__(self, client: MirrorClient, platforms: Iterable[Platform] = ()) -> None:
        self._client = client
        self._platforms = tuple(platforms)
        self._seen: set[str] = set()

    def image(self, ref: ImageRef, progress: Progress) -> ImageResult:
        result = ImageResult(str(ref))
        try:
            self._walk(ref, result, progress)
        except _ImageError as e:
            result.error = str(e)
        return result

    def _walk(self, ref: ImageRef, result: ImageResult, progress: Progress) -> None:
        data, media_type, digest = self._manifest(ref, ref.reference, result)
        result.digest = digest
        images = [data]
        if media_type in INDEX_TYPES or "manifests" in data:
            images = []
            children = [
                c
                for c in data.get("manifests", [])
                if isinstance(c, dict)
                and (
                    not self._platforms
                    or any(p.matches(c.get("platform")) for p in self._platforms)
                )
            ]
            if not children:
                raise _ImageError(f"{ref}: no manifest in the index for the platforms asked")
            for child in children:
                images.append(self._manifest(ref, str(child.get("digest", "")), result)[0])
        blobs: dict[str, int] = {}
        for manifest in images:
            descriptors = [manifest.get("config"), *manifest.get("layers", [])]
            for d in descriptors:
                if isinstance(d, dict) and isinstance(d.get("digest"), str):
                    blobs.setdefault(d["digest"], int(d.get("size", 0) or 0))
        total = sum(size for digest, size in blobs.items() if digest not in self._seen)
        done = 0
        progress(0, total)
        for blob_digest in blobs:
            if blob_digest in self._seen:
                continue
            self._seen.add(blob_digest)

            def advance(n: int) -> None:
                nonlocal done
                done += n
                progress(done, total)

            self._blob(ref, blob_digest, result, advance)

    def _get(self, ref: ImageRef, kind: str, reference: str, accept: str | None) -> Any:
        path = f"/v2/{ref.mirror_name}/{kind}/{reference}{ref.query}"
        response = self._client.request("GET", path, {"Accept": accept} if accept else {})
        if response.status != 200:
            body = response.read()
            try:
                message = error_message(json.loads(body))
            except ValueError:
                message = body[:200].decode("latin-1")
            if response.status in (401, 403):
                message += " (--user USER:PASSWORD?)"
            raise _ImageError(f"{ref}: {kind} {reference}: {response.status} {message}")
        return response

    def _manifest(
        self, ref: ImageRef, reference: str, result: ImageResult
    ) -> tuple[dict[str, Any], str, str]:
        response = self._get(ref, "manifests", reference, ACCEPT)
        body = response.read()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise _ImageError(f"{ref}: manifest {reference}: the mirror sent other bytes")
        sent = response.getheader("docker-content-digest")
        if sent and sent.startswith("sha256:") and sent != digest:
            raise _ImageError(f"{ref}: manifest {reference}: not the digest the mirror named")
        try:
            data = json.loads(body)
        except ValueError:
            raise _ImageError(f"{ref}: manifest {reference} is not JSON") from None
        if not isinstance(data, dict):
            raise _ImageError(f"{ref}: manifest {reference} is not a JSON object")
        result.manifests += 1
        result.count(len(body), response.getheader("x-cache"))
        media_type = response.getheader("content-type", "") or str(data.get("mediaType", ""))
        return data, media_type.split(";")[0].strip(), digest

    def _blob(
        self, ref: ImageRef, digest: str, result: ImageResult, advance: Callable[[int], None]
    ) -> None:
        algorithm, _, hex_ = digest.partition(":")
        try:
            hasher = hashlib.new(algorithm)
        except ValueError:
            raise _ImageError(f"{ref}: blob {digest}: unsupported digest") from None
        response = self._get(ref, "blobs", digest, None)
        size = 0
        try:
            while chunk := response.read(CHUNK):
                hasher.update(chunk)
                size += len(chunk)
                advance(len(chunk))
        except (OSError, http.client.HTTPException) as e:
            self._client.close()
            raise _ImageError(f"{ref}: blob {digest}: the transfer broke: {e!r}") from None
        if hasher.hexdigest() != hex_:
            self._client.close()
            raise _ImageError(f"{ref}: blob {digest}: the bytes do not match the digest")
        result.blobs += 1
        result.count(size, response.getheader("x-cache"))


class _ImageError(Exception):
    pass


def summary(results: list[ImageResult]) -> dict[str, Any]:
    return {
        "images": [attrs.asdict(r) for r in results],
        "bytes": sum(r.bytes for r in results),
        "fetched_bytes": sum(r.fetched_bytes for r in results),
        "cached_bytes": sum(r.cached_bytes for r in results),
        "unknown_bytes": sum(r.unknown_bytes for r in results),
        "failed": sum(1 for r in results if r.error),
    }


def exit_code(results: list[ImageResult]) -> Exit:
    return Exit.PROBLEMS if any(r.error for r in results) else Exit.OK


def parse_platforms(text: str | None) -> list[Platform]:
    if not text:
        return []
    try:
        return [Platform.parse(p) for p in text.split(",") if p.strip()]
    except ValueError as e:
        raise Failed(Exit.USAGE, f"--platform: {e}") from None
