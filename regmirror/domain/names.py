"""Repository names and references, validated against the distribution spec (pure code)."""

from __future__ import annotations

import re

from regmirror.domain.digest import Digest
from regmirror.domain.errors import NameInvalid, TagInvalid

# distribution/reference grammar: path components separated by "/".
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
MAX_NAME_LENGTH = 255

DOCKER_HUB_HOSTS = frozenset(
    {"registry-1.docker.io", "docker.io", "index.docker.io", "registry.hub.docker.com"}
)


# Public registries where one ``owner/name`` belongs to one party: a mirror whose only
# upstream is one of them never serves another registry's ``?ns=`` from it.
WELL_KNOWN_REGISTRIES = frozenset(
    {
        *DOCKER_HUB_HOSTS, "ghcr.io", "quay.io", "gcr.io", "us.gcr.io", "eu.gcr.io",
        "asia.gcr.io", "k8s.gcr.io", "registry.k8s.io", "public.ecr.aws",
        "mcr.microsoft.com", "nvcr.io", "registry.gitlab.com", "docker.elastic.co",
        "cgr.dev", "registry.redhat.io", "registry.access.redhat.com",
        "container-registry.oracle.com", "docker.pkg.github.com",
    }
)  # fmt: skip


def is_well_known_registry(host: str) -> bool:
    """``host`` (a host name, maybe with a port) is a multi-tenant public registry."""
    hostname = host.lower().rsplit(":", 1)[0] if not host.startswith("[") else host
    return hostname in WELL_KNOWN_REGISTRIES or hostname.endswith(".pkg.dev")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid repository name, else raise ``NAME_INVALID``."""
    if not name or len(name) > MAX_NAME_LENGTH:
        raise NameInvalid("invalid repository name", {"name": name[:300]})
    for component in name.split("/"):
        if not _COMPONENT.match(component):
            raise NameInvalid("invalid repository name", {"name": name[:300]})
    return name


def validate_tag(tag: str) -> str:
    if not _TAG.match(tag):
        raise TagInvalid("invalid tag", {"tag": tag[:300]})
    return tag


def parse_reference(reference: str) -> str | Digest:
    """A manifest reference is a digest (contains ':') or a tag."""
    if ":" in reference:
        return Digest.parse(reference)
    return validate_tag(reference)


def normalize_docker_hub(name: str) -> str:
    """Official images live under ``library/`` on Docker Hub."""
    return name if "/" in name else f"library/{name}"
