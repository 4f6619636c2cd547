"""The CLI's HTTP: to a mirror's listener (``prefetch``) and to its admin socket."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from regmirror.cli.output import Exit, Failed


class MirrorClient:
    """Keep-alive requests to one mirror URL (``http://`` or ``https://``); a dropped
    connection is reopened once per request."""

    def __init__(
        self,
        url: str,
        *,
        insecure: bool = False,
        ca: str | None = None,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 120.0,
    ) -> None:
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Failed(
                Exit.USAGE, f"--mirror: expected http://HOST:PORT or https://..., got {url}"
            )
        self.url = url.rstrip("/")
        self._parts = parts
        self._timeout = timeout
        self._context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._context = ssl.create_default_context(cafile=ca)
            if insecure:
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE
        self._auth = None
        if user is not None:
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            self._auth = f"Basic {token}"
        self._conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        host, port = self._parts.hostname or "", self._parts.port
        if self._context is not None:
            return http.client.HTTPSConnection(
                host, port, timeout=self._timeout, context=self._context
            )
        return http.client.HTTPConnection(host, port, timeout=self._timeout)

    def request(
        self, method: str, path: str, headers: Mapping[str, str] | None = None
    ) -> http.client.HTTPResponse:
        """Send a request; the caller reads the response to its end before the next."""
        sent = dict(headers or {})
        if self._auth is not None:
            sent["Authorization"] = self._auth
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = self._connect()
            try:
                self._conn.request(method, path, headers=sent)
                return self._conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt == 2:
                    raise
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise Failed(
                    Exit.UNREACHABLE, f"cannot reach the mirror at {self.url}: {e}"
                ) from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def admin_call(
    socket_path: str, method: str, path: str, body: Any = None, timeout: float = 600.0
) -> tuple[int, Any]:
    """One request to a running mirror's admin API: (status, JSON answer). Raises
    ``OSError`` when nothing listens on the socket."""
    conn = _UnixConnection(socket_path, timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        text = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, {"errors": [{"message": text[:200].decode("latin-1")}]}


def error_message(answer: Any) -> str:
    """The first message of a registry error body (the spec's format)."""
    try:
        return str(answer["errors"][0]["message"])
    except (KeyError, IndexError, TypeError):
        return str(answer)[:200]
