"""A minimal HTTP client on ``http.client`` that sends the request target verbatim.

Tests of path validation need to send ``..``, ``%00`` and upper-case names exactly as
written; ``http.client`` does not normalise the target (urllib and requests do).
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Response:
    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes = field(repr=False)

    def header(self, name: str) -> str | None:
        """A response header, case-insensitively; ``None`` if absent."""
        return self.headers.get(name)

    def json(self) -> Any:
        return json.loads(self.body)

    def error_codes(self) -> list[str]:
        """The ``code`` of each error in a distribution-spec error body."""
        return [e.get("code") for e in self.json().get("errors", [])]


def split_base_url(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or parts.hostname is None:
        raise ValueError(f"expected an http:// or https:// URL, got {base_url!r}")
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def connect(
    base_url: str, timeout: float = 30.0, ssl_context: ssl.SSLContext | None = None
) -> http.client.HTTPConnection:
    """A connection to ``base_url``; ``https://`` needs ``ssl_context`` (the test CA)."""
    host, port = split_base_url(base_url)
    if base_url.startswith("https://"):
        return http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl_context)
    return http.client.HTTPConnection(host, port, timeout=timeout)


def request(
    base_url: str,
    method: str,
    target: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> Response:
    """Send one request on a new connection and read the whole response.

    ``target`` (path and query) is sent as is. Raises what ``http.client`` raises if the
    server cuts the connection (``IncompleteRead``, ``RemoteDisconnected``, ...).
    """
    conn = connect(base_url, timeout, ssl_context)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None or method in ("POST", "PUT", "PATCH"):
            conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.reason, resp.headers, data)
    finally:
        conn.close()


def assert_registry_error(resp: Response, status: int, *codes: str) -> dict[str, Any]:
    """Assert ``resp`` is a distribution-spec error: ``status``, a JSON body
    ``{"errors": [{"code", "message", "detail"?}]}`` whose first code is one of
    ``codes`` (any code if none given). Returns the first error."""
    assert resp.status == status, (
        f"expected {status} {'/'.join(codes)}, got {resp.status} {resp.reason}: {resp.body[:500]!r}"
    )
    content_type = resp.header("Content-Type") or ""
    assert content_type.startswith("application/json"), f"error Content-Type {content_type!r}"
    try:
        doc = resp.json()
    except ValueError:
        raise AssertionError(f"error body is not JSON: {resp.body[:500]!r}") from None
    errors = doc.get("errors") if isinstance(doc, dict) else None
    assert isinstance(errors, list) and errors, f"no errors list in {doc!r}"
    for error in errors:
        assert isinstance(error.get("code"), str) and isinstance(error.get("message"), str), error
    if codes:
        assert errors[0]["code"] in codes, f"expected code {'/'.join(codes)}, got {doc!r}"
    first: dict[str, Any] = errors[0]
    return first
