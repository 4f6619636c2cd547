"""OCI 1.1 referrers (pure code): the descriptors an image index lists, the fallback
tag of the referrers tag schema, the index the mirror answers with, and its
``artifactType`` filter.

A referrer is a manifest whose ``subject`` names another manifest (a signature, an
SBOM, an attestation). A registry with the referrers API lists them at
``/v2/<name>/referrers/<digest>``; for one without it, clients push the same list as an
image index tagged ``<alg>-<hex>`` (the subject's digest, its hex cut to 64
characters) in the same repository. Either way the list is an OCI image index whose
``manifests`` are descriptors; each is kept here as the JSON object the upstream sent
(annotations, ``artifactType`` and any other field included), never rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from regmirror.domain.digest import Digest
from regmirror.domain.errors import DigestInvalid
from regmirror.domain.media import OCI_INDEX

Descriptor = dict[str, Any]  # one entry of an index's "manifests", as sent
MAX_TAG_REF = 64  # the spec's limit on the <ref> part of the fallback tag


def fallback_tag(subject: Digest) -> str:
    """The referrers tag schema's tag for ``subject``: ``sha256-<hex>``."""
    return f"{subject.algorithm}-{subject.hex[:MAX_TAG_REF]}"


def index_descriptors(data: bytes) -> tuple[Descriptor, ...] | None:
    """The descriptors of an image index, or None when ``data`` is not one. Entries
    that are not objects with a valid ``digest`` and a ``mediaType`` are left out:
    nothing the mirror lists points nowhere."""
    try:
        parsed = json.loads(data)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    manifests = parsed.get("manifests", [])
    if not isinstance(manifests, list):
        return None
    found = []
    for entry in manifests:
        if not isinstance(entry, dict) or not isinstance(entry.get("mediaType"), str):
            continue
        digest = entry.get("digest")
        try:
            Digest.parse(digest if isinstance(digest, str) else "")
        except DigestInvalid:
            continue
        found.append(entry)
    return tuple(found)


def index_document(descriptors: Iterable[Descriptor]) -> bytes:
    """The OCI image index a referrers answer is: ``descriptors`` in their order."""
    return json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(descriptors)},
        separators=(",", ":"),
    ).encode()


def of_artifact_types(
    descriptors: Iterable[Descriptor], artifact_types: frozenset[str]
) -> list[Descriptor]:
    """The descriptors whose ``artifactType`` is one of ``artifact_types``."""
    return [d for d in descriptors if d.get("artifactType") in artifact_types]
