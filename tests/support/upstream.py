"""The upstream: Debian's ``docker-registry`` (distribution 2.8) on a free loopback port.

Distribution writes two logs, both kept in files under the registry's base directory:

* ``registry.log`` (its stderr): logrus text lines. Every request ends with one
  ``msg="response completed"`` line (level info), or ``msg="response completed with
  error"`` (level error) for 4xx/5xx responses, carrying ``http.request.method``,
  ``http.request.uri``, ``http.response.status`` and ``http.response.written`` fields.
  Values are bare, or Go-quoted when they contain characters such as ``:`` or spaces.
* ``access.log`` (its stdout): one Apache combined-format line per request.

Both lines are written when the handler returns, i.e. just *after* the client has
received the last byte: poll (``wait_for_requests``) rather than read once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.merge import deep_merge
from tests.support.ports import LOOPBACK, free_port
from tests.support.process import ManagedProcess, require_tool, tail, wait_http_ready
from tests.support.wait import poll_until

# key=value or key="go \"quoted\" value"
_LOGRUS_FIELD = re.compile(r'([\w.\-]+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logrus_line(line: str) -> dict[str, str]:
    """Parse one logrus text-formatter line into its fields (``msg``, ``level``, ...)."""
    fields: dict[str, str] = {}
    for key, raw in _LOGRUS_FIELD.findall(line):
        if raw.startswith('"'):
            try:
                value = json.loads(raw)
            except ValueError:  # Go escapes JSON does not know (\x..): keep them as is
                value = raw[1:-1]
        else:
            value = raw
        fields[key] = value
    return fields


@dataclass(frozen=True)
class RequestLogEntry:
    """One request the registry completed, from its ``response completed`` log line."""

    method: str
    uri: str
    status: int
    written: int
    fields: Mapping[str, str]


class UpstreamRegistry:
    """A distribution registry with its own storage under ``base_dir``.

    ``start()`` blocks until ``GET /v2/`` answers 200; ``stop()`` sends SIGTERM to its
    PID (SIGKILL after ``timeout``). It can be stopped and started again on the same
    port with the same storage. Usable as a context manager.
    """

    binary_name = "docker-registry"
    # For a registry serving https (http.tls in extra_config): what checks it is ready.
    ssl_context: ssl.SSLContext | None = None

    def __init__(
        self,
        base_dir: Path,
        *,
        port: int | None = None,
        extra_config: Mapping[str, Any] | None = None,
        ready_timeout: float = 20.0,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.port = port or free_port()
        self.root = self.base_dir / "store"
        self.config_path = self.base_dir / "config.yml"
        self.log_path = self.base_dir / "registry.log"
        self.access_log_path = self.base_dir / "access.log"
        self.extra_config = dict(extra_config or {})
        self.ready_timeout = ready_timeout
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry part of an image reference."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "fields": {"service": "upstream"}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.root)},
                "delete": {"enabled": True},
                # No blob descriptor cache: tests edit blob files behind its back.
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"{LOOPBACK}:{self.port}",
                "secret": "regmirror-tests-not-a-secret",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        return deep_merge(config, self.extra_config)

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"the upstream registry is already running (pid {self.pid})")
        binary = require_tool(self.binary_name)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        # REGISTRY_* variables would override the config file.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self._process = ManagedProcess(
            [binary, "serve", str(self.config_path)],
            stdout_path=self.access_log_path,
            stderr_path=self.log_path,
            cwd=self.base_dir,
            env=env,
            name="docker-registry",
        )
        self._process.start()
        try:
            self._wait_ready()
        except BaseException:
            self._process.stop()
            raise

    def _wait_ready(self) -> None:
        assert self._process is not None
        wait_http_ready(
            self._process,
            self.url + "/v2/",
            self.ready_timeout,
            log_path=self.log_path,
            # With auth configured, an anonymous GET /v2/ is answered with a challenge.
            expect_status=401 if self.config().get("auth") else 200,
            ssl_context=self.ssl_context,
        )

    def stop(self, timeout: float = 10.0) -> None:
        if self._process is not None:
            self._process.stop(timeout)

    def kill9(self) -> None:
        if self._process is not None:
            self._process.kill9()

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove_storage(self) -> None:
        """Delete the storage directory (the registry must be stopped)."""
        if self.running:
            raise RuntimeError("stop the registry before removing its storage")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> UpstreamRegistry:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- storage layout -----------------------------------------------------------

    def blob_data_path(self, digest: str) -> Path:
        """Where distribution's filesystem driver keeps the bytes of ``digest``."""
        algorithm, _, hex_ = digest.partition(":")
        return self.root / "docker/registry/v2/blobs" / algorithm / hex_[:2] / hex_ / "data"

    # --- logs ---------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def request_log_lines(self) -> list[RequestLogEntry]:
        """Every request completed so far, in order, from ``registry.log``."""
        entries = []
        for line in self.log_text().splitlines():
            if 'msg="response completed' not in line:
                continue
            fields = parse_logrus_line(line)
            if not fields.get("msg", "").startswith("response completed"):
                continue
            entries.append(
                RequestLogEntry(
                    method=fields.get("http.request.method", ""),
                    uri=fields.get("http.request.uri", ""),
                    status=int(fields.get("http.response.status", "0") or 0),
                    written=int(fields.get("http.response.written", "0") or 0),
                    fields=fields,
                )
            )
        return entries

    def requests(
        self, method: str | None = None, path_substring: str = ""
    ) -> list[RequestLogEntry]:
        return [
            e
            for e in self.request_log_lines()
            if (method is None or e.method == method) and path_substring in e.uri
        ]

    def count_requests(self, method: str | None, path_substring: str = "") -> int:
        """How many completed requests had this method (``None``: any) and a URI
        containing ``path_substring``."""
        return len(self.requests(method, path_substring))

    def wait_for_requests(
        self, method: str | None, path_substring: str, at_least: int = 1, timeout: float = 10.0
    ) -> int:
        """Poll the log until ``at_least`` matching requests completed; return the count."""
        return poll_until(
            lambda: n if (n := self.count_requests(method, path_substring)) >= at_least else 0,
            timeout,
            what=f"{at_least} {method or 'any'} request(s) for {path_substring!r} in the "
            "upstream registry's log",
            describe=lambda: self.log_tail(),
        )

    def access_log_lines(self) -> list[str]:
        try:
            return self.access_log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
