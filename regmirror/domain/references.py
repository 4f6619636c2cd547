"""What a manifest references (pure code): the digests parsed once, here."""

from __future__ import annotations

import json
from collections.abc import Iterable

from regmirror.domain.digest import Digest
from regmirror.domain.errors import DigestInvalid


def manifest_references(data: bytes) -> tuple[Digest, ...]:
    """The digests a manifest references: config and layers, or an index's manifests
    (and an artifact's blobs), in order, once each; anything that is not a valid digest
    is left out."""
    try:
        parsed = json.loads(data)
    except ValueError:
        return ()
    if not isinstance(parsed, dict):
        return ()
    found: list[str] = []
    config = parsed.get("config")
    if isinstance(config, dict) and isinstance(config.get("digest"), str):
        found.append(config["digest"])
    for key in ("layers", "manifests", "blobs"):
        items = parsed.get(key)
        if isinstance(items, list):
            found.extend(
                i["digest"]
                for i in items
                if isinstance(i, dict) and isinstance(i.get("digest"), str)
            )
    return tuple(dict.fromkeys(valid_digests(found)))


def valid_digests(texts: Iterable[str]) -> list[Digest]:
    """The digests of ``texts`` that parse, in order; the others are left out."""
    valid = []
    for text in texts:
        try:
            valid.append(Digest.parse(text))
        except DigestInvalid:
            continue
    return valid
