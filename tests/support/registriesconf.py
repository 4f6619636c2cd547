"""``registries.conf`` (containers-registries.conf(5), version 2) as podman, CRI-O and
skopeo read it, for pulling through the mirror the way operators configure it.

A ``[[registry]]`` whose ``prefix`` matches an image reference is tried through its
``[[registry.mirror]]`` locations first, then its own ``location``. A mirror location
may carry a path (``mirror:5000/ghcr``): ``ghcr.io/owner/img`` is then requested as
``/v2/ghcr/owner/img/...`` from the mirror, which is how regmirror's upstream aliases
are reached. skopeo takes the file with its hidden global ``--registries-conf``
option (``skopeo_copy(..., registries_conf=path)``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RegistryEntry:
    prefix: str  # e.g. "ghcr.io"
    location: str  # where to go when every mirror failed
    mirrors: Sequence[str] = ()  # e.g. ("127.0.0.1:5000/ghcr",)
    insecure: bool = True  # plain HTTP to the mirrors


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a TOML basic string is JSON-compatible for these values


def registries_conf_text(entries: Sequence[RegistryEntry]) -> str:
    lines = ["unqualified-search-registries = []", ""]
    for entry in entries:
        lines += [
            "[[registry]]",
            f"prefix = {_toml_str(entry.prefix)}",
            f"location = {_toml_str(entry.location)}",
            "",
        ]
        for mirror in entry.mirrors:
            lines += [
                "[[registry.mirror]]",
                f"location = {_toml_str(mirror)}",
                f"insecure = {'true' if entry.insecure else 'false'}",
                "",
            ]
    return "\n".join(lines)


def write_registries_conf(path: Path, entries: Sequence[RegistryEntry]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(registries_conf_text(entries))
    return path
