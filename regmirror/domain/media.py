"""Manifest media types and what a client accepts (pure code).

``Accept`` is parsed once per distinct ``Accept`` header; a request without one, or
with ``*/*``, accepts every manifest type. ``media_type_of`` names a manifest whose
upstream sent no usable ``Content-Type``.
"""

from __future__ import annotations

import json

import attrs

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
)
ALL_MANIFEST_TYPES = ", ".join(MANIFEST_TYPES)
INDEX_TYPES = frozenset(MANIFEST_TYPES[:2])  # they reference manifests, not blobs
OCI_INDEX, OCI_MANIFEST = MANIFEST_TYPES[0], MANIFEST_TYPES[2]


@attrs.frozen
class Accept:
    """The manifest media types a client accepts; ``types=None`` means any."""

    types: frozenset[str] | None

    @classmethod
    def parse(cls, headers: list[str] | None) -> Accept:
        if not headers:
            return cls(None)
        types = set()
        for header in headers:
            for item in header.split(","):
                media_type = item.split(";", 1)[0].strip().lower()
                if media_type in ("*/*", "application/*", "application/json"):
                    return cls(None)
                if media_type:
                    types.add(media_type)
        return cls(frozenset(types) if types else None)

    def accepts(self, media_type: str) -> bool:
        return self.types is None or media_type in self.types

    def header(self) -> str:
        if self.types is None:
            return ALL_MANIFEST_TYPES
        return ", ".join(sorted(self.types))


ANY = Accept(None)


def manifest_media_type(content_type: str, data: bytes) -> str:
    """A manifest's media type: its ``Content-Type`` (parameters dropped), or, when
    that is missing or plain JSON, what the document says it is."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if not media_type or media_type == "application/json":
        return media_type_of(data)
    return media_type


def media_type_of(data: bytes) -> str:
    """The media type a manifest document declares, else OCI's index or manifest."""
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    media_type = parsed.get("mediaType") if isinstance(parsed, dict) else None
    if isinstance(media_type, str) and media_type:
        return media_type
    if isinstance(parsed, dict) and "manifests" in parsed:
        return OCI_INDEX
    return OCI_MANIFEST
