"""Image references and repository names as an operator types them (pure code).

``parse_image`` reads ``[REGISTRY/]NAME[:TAG][@DIGEST]`` the way docker and podman do:
the first component is a registry when it has a ``.`` or a ``:`` or is ``localhost``
and a ``/`` follows it; the tag defaults to ``latest``; a digest wins over a tag.
``ImageRef.mirror_name`` is how ``regmirror prefetch`` names it to a mirror, the way
podman's ``registries.conf`` mirrors do: the registry as the first path component
(``/v2/ghcr.io/owner/image/...``), which the mirror routes to the upstream of that name
or alias; a registry with a port cannot be a path component, so it goes in containerd's
``?ns=`` instead.

``route`` maps a repository as typed (``library/alpine``, ``docker.io/alpine``,
``ghcr/owner/image``) to an upstream of a configuration and the repository's name
there, by the mirror's own rule (a first component that is an upstream's name, alias
or URL host; otherwise the default upstream; ``library/`` added for Docker Hub).
"""

from __future__ import annotations

import re
from urllib.parse import quote

import attrs

from regmirror.config import Config, UpstreamConfig
from regmirror.config.model import routing_table
from regmirror.domain.digest import Digest
from regmirror.domain.errors import RegistryError
from regmirror.domain.names import normalize_docker_hub, validate_name, validate_tag

_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


@attrs.frozen
class ImageRef:
    registry: str  # "" when none was given
    name: str
    tag: str = "latest"
    digest: Digest | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest, else the tag."""
        return str(self.digest) if self.digest is not None else self.tag

    @property
    def mirror_name(self) -> str:
        """The repository as a mirror is asked for it."""
        if self.registry and ":" not in self.registry:
            return f"{self.registry}/{self.name}"
        return self.name

    @property
    def query(self) -> str:
        """``?ns=...`` for a registry with a port, else empty."""
        return f"?ns={quote(self.registry, safe='')}" if ":" in self.registry else ""

    def __str__(self) -> str:
        prefix = f"{self.registry}/" if self.registry else ""
        suffix = f"@{self.digest}" if self.digest is not None else f":{self.tag}"
        return f"{prefix}{self.name}{suffix}"


def _is_registry(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def split_registry(text: str) -> tuple[str, str]:
    """``(registry, rest)``; the registry is empty when the first component is not one."""
    first, sep, rest = text.partition("/")
    if sep and _is_registry(first):
        return first, rest
    return "", text


def parse_image(text: str) -> ImageRef:
    """Parse an image reference; ``ValueError`` says what is wrong with it."""
    if not text or text != text.strip():
        raise ValueError(f"{text!r} is not an image reference")
    rest, at, digest_text = text.partition("@")
    digest = None
    if at:
        try:
            digest = Digest.parse(digest_text)
        except RegistryError:
            raise ValueError(f"{text}: {digest_text!r} is not a sha256 or sha512 digest") from None
    registry, path = split_registry(rest)
    name, tag = path, "latest"
    last_slash = path.rfind("/")
    colon = path.rfind(":")
    if colon > last_slash:
        name, tag = path[:colon], path[colon + 1 :]
    if registry and not _HOST.fullmatch(registry):
        raise ValueError(f"{text}: {registry!r} is not a registry host[:port]")
    try:
        validate_name(name)
    except RegistryError:
        raise ValueError(
            f"{text}: {name!r} is not a repository name (lower-case components separated by /)"
        ) from None
    try:
        validate_tag(tag)
    except RegistryError:
        raise ValueError(f"{text}: {tag!r} is not a tag") from None
    return ImageRef(registry, name, tag, digest)


@attrs.frozen
class Routed:
    """A repository of one upstream, as the store names it."""

    upstream: UpstreamConfig
    repository: str


def route(config: Config, name: str) -> Routed:
    """Which upstream of ``config`` a repository (as typed) belongs to, and its name
    there; ``ValueError`` for a name the spec does not allow."""
    first, sep, rest = name.partition("/")
    upstream = config.upstream
    found = routing_table(config.upstreams).get(first) if sep else None
    if found is not None:
        upstream, name = config.upstreams[found], rest
    try:
        validate_name(name)
    except RegistryError:
        raise ValueError(f"{name!r} is not a repository name") from None
    repository = normalize_docker_hub(name) if upstream.docker_hub else name
    return Routed(upstream, repository)
