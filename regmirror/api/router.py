"""What a ``/v2/`` request asks for: its route, validated before anything else.

``route()`` maps the raw request path (not percent-decoded) to a ``Route``: the kind of
endpoint, and the repository name and reference it names, checked against the spec's
grammar. Anything else is a ``RegistryError``: an unknown endpoint, a push (the mirror
is read-only), a bad name, tag or digest. Query parameters (``n``, ``last``, ``ns``) are
read here too, and ``artifactType`` (referrers).
"""

from __future__ import annotations

import re
from enum import StrEnum

import attrs
from twisted.web.server import Request

from regmirror.domain.digest import Digest
from regmirror.domain.errors import PaginationInvalid, Unsupported
from regmirror.domain.names import parse_reference, validate_name

READ_METHODS = (b"GET", b"HEAD")
_ROUTE = re.compile(
    r"(?P<name>.+)/(?:(?P<kind>manifests|blobs)/(?P<ref>[^/]+)|tags/(?P<tags>list)"
    r"|referrers/(?P<subject>[^/]+))\Z"
)
_UPLOADS = re.compile(r".+/blobs/uploads(?:/.*)?\Z")


class RouteKind(StrEnum):
    BASE = "base"  # /v2/
    CATALOG = "catalog"  # /v2/_catalog
    MANIFEST = "manifest"  # /v2/NAME/manifests/REFERENCE
    BLOB = "blob"  # /v2/NAME/blobs/DIGEST
    TAGS = "tags"  # /v2/NAME/tags/list
    REFERRERS = "referrers"  # /v2/NAME/referrers/DIGEST (OCI 1.1)


@attrs.frozen
class Route:
    kind: RouteKind
    name: str = ""
    reference: str | Digest = ""


def route(method: bytes, path: bytes) -> Route:
    """Map a raw request path (not percent-decoded) to what it asks for, validating the
    name, tag and digest it contains. Raises ``RegistryError`` for anything else."""
    try:
        text = path.decode("ascii")
    except UnicodeDecodeError:
        raise Unsupported("unknown endpoint", status=404) from None
    if not text.startswith("/v2/") and text != "/v2":
        raise Unsupported("unknown endpoint", status=404)
    rest = text[4:]
    if rest == "":
        return _read_only(method, Route(RouteKind.BASE))
    if rest == "_catalog":
        return _read_only(method, Route(RouteKind.CATALOG))
    if _UPLOADS.match(rest):
        raise Unsupported("this registry is a read-only mirror: pushes are not supported")
    match = _ROUTE.match(rest)
    if match is None:
        raise Unsupported("unknown endpoint", status=404)
    name = validate_name(match.group("name"))
    if match.group("tags"):
        return _read_only(method, Route(RouteKind.TAGS, name))
    if match.group("subject") is not None:
        _read_only(method, Route(RouteKind.REFERRERS, name))
        return Route(RouteKind.REFERRERS, name, Digest.parse(match.group("subject")))
    kind = RouteKind.MANIFEST if match.group("kind") == "manifests" else RouteKind.BLOB
    if method not in READ_METHODS:
        _read_only(method, Route(kind, name))
    reference = parse_reference(match.group("ref"))
    if kind is RouteKind.BLOB and not isinstance(reference, Digest):
        reference = Digest.parse(match.group("ref"))
    return Route(kind, name, reference)


def _read_only(method: bytes, r: Route) -> Route:
    if method not in READ_METHODS:
        error = Unsupported("this registry is a read-only mirror", status=405)
        error.headers[b"allow"] = b"GET, HEAD"
        raise error
    return r


def query_int(request: Request, key: bytes) -> int | None:
    """A non-negative integer parameter (``n``), or None; ``PAGINATION_NUMBER_INVALID``
    if it is not one."""
    args: dict[bytes, list[bytes]] = request.args or {}
    values = args.get(key)
    if not values:
        return None
    text = values[0].decode("latin-1")
    if not text.isdigit() or len(text) > 9:
        raise PaginationInvalid("invalid number of results requested", {"n": text[:20]})
    return int(text)


def query_media_types(request: Request, key: bytes) -> frozenset[str]:
    """Every non-empty value of a media-type parameter (``artifactType``). A ``+``
    left unencoded arrives as a space, which no media type has: it is put back."""
    args: dict[bytes, list[bytes]] = request.args or {}
    values = (v.decode("utf-8", "replace").strip() for v in args.get(key, []))
    return frozenset(v.replace(" ", "+") for v in values if v)


def query_str(request: Request, key: bytes) -> str | None:
    args: dict[bytes, list[bytes]] = request.args or {}
    values = args.get(key)
    return values[0].decode("utf-8", "replace") if values else None
