"""An HTTP-level reverse proxy in front of a registry that a test can switch to ``429``.

``CountingProxy`` forwards bytes; this one forwards *requests* (one upstream request per
request, ``http.client``), so it can answer in the registry's place:

* ``rate_limit(retry_after)``: from now on, every request (or only those whose method
  is in ``methods``) gets ``429 Too Many Requests`` with ``Retry-After`` and Docker
  Hub's JSON error body (``TOOMANYREQUESTS``), and never reaches the registry;
  ``pass_through()`` ends that.
* ``response_headers``: added to every forwarded response (e.g. Docker Hub's
  ``ratelimit-limit`` / ``ratelimit-remaining``).

The ``Host`` header is passed on unchanged (distribution builds absolute ``Location``
headers from it, so uploads through the proxy stay on the proxy). Bodies are read whole:
fine for test images, not for gigabytes. ``requests`` records what came in and what
was answered.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tests.support.httpserver import LoopbackHTTPServer, QuietHandler
from tests.support.ports import LOOPBACK
from tests.support.rawhttp import split_base_url

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
}

TOO_MANY_REQUESTS_BODY = json.dumps(
    {
        "errors": [
            {
                "code": "TOOMANYREQUESTS",
                "message": "You have reached your pull rate limit. (regmirror test fixture)",
            }
        ]
    }
).encode()


@dataclass(frozen=True)
class ProxiedRequest:
    method: str
    target: str
    headers: dict[str, str] = field(repr=False)  # lower-case names
    status: int  # what the client was answered (0: the upstream request failed)
    rate_limited: bool
    time: float


class _ProxyHandler(QuietHandler):
    def _any(self) -> None:
        self.owner._handle(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any


class ReverseProxy(LoopbackHTTPServer):
    """``start()``/``stop()``; ``rate_limit()``/``pass_through()``; ``requests``."""

    handler_class = _ProxyHandler
    thread_name = "reverse-proxy"

    def __init__(
        self,
        target_url: str,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        response_headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.target_host, self.target_port = split_base_url(target_url)
        self.response_headers = dict(response_headers or {})
        self.timeout = timeout
        self._lock = threading.Lock()
        self._requests: list[ProxiedRequest] = []
        self._limit: tuple[str, frozenset[str] | None] | None = None

    # --- controls ---------------------------------------------------------------

    def rate_limit(self, retry_after: int | str = 60, methods: Iterable[str] | None = None) -> None:
        """Answer ``429`` (with ``Retry-After: retry_after``) from now on."""
        with self._lock:
            self._limit = (str(retry_after), frozenset(methods) if methods else None)

    def pass_through(self) -> None:
        with self._lock:
            self._limit = None

    # --- observations -----------------------------------------------------------

    @property
    def requests(self) -> list[ProxiedRequest]:
        with self._lock:
            return list(self._requests)

    def count_requests(
        self,
        method: str | None = None,
        path_substring: str = "",
        *,
        rate_limited: bool | None = None,
    ) -> int:
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method)
            and path_substring in r.target
            and (rate_limited is None or r.rate_limited == rate_limited)
        )

    # --- forwarding -------------------------------------------------------------

    def _handle(self, handler: QuietHandler) -> None:
        headers = handler.request_headers()
        length = int(headers.get("content-length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self._lock:
            limit = self._limit
        if limit is not None and (limit[1] is None or handler.command in limit[1]):
            self._record(handler, headers, 429, True)
            handler.send_body(
                429, TOO_MANY_REQUESTS_BODY, {"Retry-After": limit[0], **self.response_headers}
            )
            return
        self._forward(handler, headers, body)

    def _record(
        self, handler: QuietHandler, headers: dict[str, str], status: int, limited: bool
    ) -> None:
        """Recorded before answering: once a client has its answer, the test sees it."""
        record = ProxiedRequest(
            handler.command, handler.path, headers, status, limited, time.monotonic()
        )
        with self._lock:
            self._requests.append(record)

    def _forward(self, handler: QuietHandler, headers: dict[str, str], body: bytes) -> None:
        conn = http.client.HTTPConnection(self.target_host, self.target_port, timeout=self.timeout)
        try:
            conn.putrequest(
                handler.command, handler.path, skip_host=True, skip_accept_encoding=True
            )
            for name, value in headers.items():
                if name not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            if body or handler.command in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            self._record(handler, headers, 0, False)
            handler.send_body(502, b"upstream request failed\n", content_type="text/plain")
            return
        finally:
            conn.close()
        self._record(handler, headers, resp.status, False)
        handler.send_response(resp.status)
        for name, value in resp.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                handler.send_header(name, value)
        for name, value in self.response_headers.items():
            handler.send_header(name, value)
        if handler.command == "HEAD":
            handler.send_header("Content-Length", resp.getheader("Content-Length") or "0")
        else:
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD" and data:
            handler.wfile.write(data)
