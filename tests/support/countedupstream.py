"""A side's own way to the upstream, counted without a proxy in the path.

``CountedUpstream`` is a second distribution registry serving the upstream's storage
directory (read-only: ``maintenance.readonly``) on a port of its own. A system under
test that is pointed at it reaches the same content as through the upstream itself,
with nothing in between; what it fetched is read from that registry's own log, one
``msg="response completed"`` line per request with ``http.response.written`` (the body
bytes), and what is still being served from its debug server's Prometheus gauge
``registry_http_in_flight_requests``.

The log line is written when a response ends, so ``bytes_down`` and
``count_requests`` count completed responses (a transfer in flight shows in
``in_flight()`` only); ``wait_quiet`` waits for both to settle. The log is read
incrementally: only what was appended since the last look.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from tests.support.ports import LOOPBACK, free_port
from tests.support.rawhttp import request
from tests.support.upstream import RequestLogEntry, UpstreamRegistry, parse_logrus_line

_IN_FLIGHT = re.compile(r"^registry_http_in_flight_requests\{[^}]*\} (\S+)$", re.MULTILINE)


class CountedUpstream:
    """``start()`` runs the registry on ``root`` (the upstream's storage directory)."""

    def __init__(self, base_dir: Path, root: Path, *, name: str = "counted-upstream") -> None:
        self.base_dir = Path(base_dir)
        self.debug_port = free_port()
        self.registry = UpstreamRegistry(
            self.base_dir,
            extra_config={
                "storage": {
                    "filesystem": {"rootdirectory": str(root)},
                    "maintenance": {"readonly": {"enabled": True}},
                },
                "log": {
                    "level": "info",
                    "accesslog": {"disabled": True},
                    "fields": {"service": name},
                },
                "http": {
                    "debug": {
                        "addr": f"{LOOPBACK}:{self.debug_port}",
                        "prometheus": {"enabled": True, "path": "/metrics"},
                    }
                },
            },
        )
        self._lock = threading.Lock()
        self._offset = 0
        self._partial = b""
        self._entries: list[RequestLogEntry] = []
        self._bytes = 0

    @property
    def url(self) -> str:
        return self.registry.url

    @property
    def host(self) -> str:
        return self.registry.host

    @property
    def pid(self) -> int | None:
        return self.registry.pid

    def __repr__(self) -> str:
        return f"<CountedUpstream {self.url}>"

    def start(self) -> None:
        self.registry.start()

    def stop(self) -> None:
        self.registry.stop()

    def __enter__(self) -> CountedUpstream:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- counting -------------------------------------------------------------------

    def _refresh(self) -> None:
        """Parse the log lines appended since the last call."""
        with self._lock:
            try:
                with open(self.registry.log_path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return
            self._offset += len(data)
            data = self._partial + data
            *lines, self._partial = data.split(b"\n")
            for raw in lines:
                if b'msg="response completed' not in raw:
                    continue
                fields = parse_logrus_line(raw.decode(errors="replace"))
                entry = RequestLogEntry(
                    method=fields.get("http.request.method", ""),
                    uri=fields.get("http.request.uri", ""),
                    status=int(fields.get("http.response.status", "0") or 0),
                    written=int(fields.get("http.response.written", "0") or 0),
                    fields=fields,
                )
                self._entries.append(entry)
                self._bytes += entry.written

    @property
    def bytes_down(self) -> int:
        """Body bytes of every completed response (HEAD and errors included)."""
        self._refresh()
        return self._bytes

    @property
    def requests(self) -> list[RequestLogEntry]:
        self._refresh()
        with self._lock:
            return list(self._entries)

    def count_requests(self, method: str | None = None, path_substring: str = "") -> int:
        """Completed requests with this method (``None``: any) and a URI containing
        ``path_substring``."""
        return sum(
            1
            for e in self.requests
            if (method is None or e.method == method) and path_substring in e.uri
        )

    def in_flight(self) -> int:
        """Requests being served right now (the registry's own gauge)."""
        text = request(f"http://{LOOPBACK}:{self.debug_port}", "GET", "/metrics").body.decode()
        return sum(int(float(v)) for v in _IN_FLIGHT.findall(text))

    def wait_quiet(self, quiet: float = 0.5, timeout: float = 120.0) -> None:
        """Wait until nothing was in flight and no response ended for ``quiet`` s."""
        deadline = time.monotonic() + timeout
        last, since = self.bytes_down, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now, busy = self.bytes_down, self.in_flight()
            if now != last or busy:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
        raise TimeoutError(f"upstream traffic through {self.url} did not stop in {timeout:g}s")
