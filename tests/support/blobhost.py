"""Blob storage on another host, the way registries redirect to S3 or a CDN.

distribution's ``redirect`` storage middleware (``redirect_config(url)``, merged into
an ``UpstreamRegistry``'s ``extra_config``) makes the registry answer a blob ``GET`` or
``HEAD`` it authorised with ``307 Location: <baseurl>/docker/registry/v2/blobs/...``:
the path of the blob's file in its storage. ``BlobHost(registry.root)`` serves those
files, on another loopback address (``127.0.0.2`` by default: another *host*, not just
another port), and records every request with its headers, so a test can check that
nobody forwarded the registry's ``Authorization`` to it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from tests.support.httpserver import LoopbackHTTPServer, QuietHandler

OTHER_LOOPBACK = "127.0.0.2"


def redirect_config(base_url: str) -> dict[str, Any]:
    """distribution's storage middleware that redirects blob reads to ``base_url``."""
    return {"middleware": {"storage": [{"name": "redirect", "options": {"baseurl": base_url}}]}}


@dataclass(frozen=True)
class BlobHostRequest:
    method: str
    path: str
    headers: dict[str, str] = field(repr=False)  # lower-case names
    status: int
    time: float


class _BlobHandler(QuietHandler):
    def do_GET(self) -> None:
        self.owner._serve(self)

    def do_HEAD(self) -> None:
        self.owner._serve(self)


class BlobHost(LoopbackHTTPServer):
    """Serves the files under ``root`` by path (``GET``/``HEAD``, whole files only)."""

    handler_class = _BlobHandler
    thread_name = "blob-host"

    def __init__(self, root: Path, *, host: str = OTHER_LOOPBACK, port: int = 0) -> None:
        super().__init__(host=host, port=port)
        self.root = Path(root).resolve()
        self._lock = threading.Lock()
        self._requests: list[BlobHostRequest] = []

    @property
    def requests(self) -> list[BlobHostRequest]:
        with self._lock:
            return list(self._requests)

    def count_requests(self, method: str | None = None, path_substring: str = "") -> int:
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method) and path_substring in r.path
        )

    def requests_with_authorization(self) -> list[BlobHostRequest]:
        """Requests that carried an ``Authorization`` header (should be none)."""
        return [r for r in self.requests if "authorization" in r.headers]

    def _serve(self, handler: QuietHandler) -> None:
        path = unquote(urlsplit(handler.path).path)
        target = (self.root / path.lstrip("/")).resolve()
        found = target.is_relative_to(self.root) and target.is_file()
        data = target.read_bytes() if found else b"not found\n"
        status = 200 if found else 404
        # Recorded before answering: once a client has its answer, the test sees it.
        record = BlobHostRequest(
            handler.command, path, handler.request_headers(), status, time.monotonic()
        )
        with self._lock:
            self._requests.append(record)
        if found:
            handler.send_body(
                200, data, {"Accept-Ranges": "none"}, content_type="application/octet-stream"
            )
        else:
            handler.send_body(404, data, content_type="text/plain")
