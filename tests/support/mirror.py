"""regmirror itself, started with twistd as an operator would, in a directory of its own.

``Mirror(base_dir, upstream_url)`` writes ``base_dir/config.yml`` (distribution's
format plus the ``regmirror:`` section) and runs twistd with the test's Python::

    python -c TWISTD_MAIN --pidfile= -n --logfile=BASE/regmirror.log regmirror -c CONFIG

from the repository root, so the plugin in ``twisted/plugins/`` is found. Start-up
output that happens before logging is set up (tracebacks, config errors) goes to
``BASE/regmirror.stderr``; ``log_text()`` reads both, and the start-up failure message
includes their tails.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.support.merge import deep_merge
from tests.support.ports import LOOPBACK, free_port
from tests.support.process import ManagedProcess, tail, wait_http_ready

REPO_ROOT = Path(__file__).resolve().parents[2]

# ``python -m twisted`` is ``twist`` (the new runner), not ``twistd``, and
# ``twisted.scripts.twistd`` has no ``__main__`` guard: this is what the ``twistd``
# console script does. With ``-c``, ``sys.path[0]`` is the working directory (the
# repository root), so ``twisted/plugins/regmirror_plugin.py`` is found from the source.
TWISTD_MAIN = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


class Mirror:
    """One regmirror process with its own config, store and log under ``base_dir``.

    ``start()`` blocks until ``GET /v2/`` answers 200 (or raises with the log tail);
    ``stop()`` sends SIGTERM to its PID and waits (SIGKILL after ``timeout``);
    ``kill9()`` simulates a crash; ``restart()`` stops and starts it on the same port
    with the same store. Usable as a context manager.
    """

    def __init__(
        self,
        base_dir: Path,
        upstream_url: str,
        *,
        port: int | None = None,
        listen_ip: str = LOOPBACK,
        tag_freshness: str | float = "30s",
        log_level: str = "debug",
        extra: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        ready_headers: Mapping[str, str] | None = None,
        ready_timeout: float = 20.0,
        repo_root: Path = REPO_ROOT,
        python: str = sys.executable,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.upstream_url = upstream_url.rstrip("/")
        self.port = port or free_port()
        # The address it listens on: 127.0.0.1, or ``::1`` (then ``url`` is
        # ``http://[::1]:PORT``); ``port`` must be free there.
        self.listen_ip = listen_ip
        self.tag_freshness = tag_freshness
        self.log_level = log_level
        self.extra = dict(extra or {})
        self.env = dict(env or {})  # added to the test's environment (secrets by env var)
        self.ready_timeout = ready_timeout
        # With http.tls in ``extra``: how readiness is checked (the test CA, and a client
        # certificate for mutual TLS); with auth: the Authorization header to send.
        self.ssl_context = ssl_context
        self.ready_headers = dict(ready_headers or {})
        self.repo_root = repo_root
        self.python = python
        self.root = self.base_dir / "store"
        self.config_path = self.base_dir / "config.yml"
        self.log_path = self.base_dir / "regmirror.log"
        self.stderr_path = self.base_dir / "regmirror.stderr"
        self._process: ManagedProcess | None = None

    # --- addresses ----------------------------------------------------------------

    @property
    def tls(self) -> bool:
        """Whether ``extra`` configures ``http.tls`` (then ``url`` is https://)."""
        return bool(self.extra.get("http", {}).get("tls"))

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` (``[::1]:PORT``), the registry part of an image reference."""
        ip = f"[{self.listen_ip}]" if ":" in self.listen_ip else self.listen_ip
        return f"{ip}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    # --- config -------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": self.log_level},
            "http": {"addr": self.host},
            "storage": {"filesystem": {"rootdirectory": str(self.root)}},
            "proxy": {"remoteurl": self.upstream_url},
            "regmirror": {"tag_freshness": self.tag_freshness},
        }
        return deep_merge(config, self.extra)

    def write_config(self) -> Path:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        return self.config_path

    def argv(self) -> list[str]:
        return [
            self.python,
            "-c",
            TWISTD_MAIN,
            "--pidfile=",
            "-n",
            f"--logfile={self.log_path}",
            "regmirror",
            "-c",
            str(self.config_path),
        ]

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"regmirror is already running (pid {self.pid})")
        self.write_config()
        self._process = ManagedProcess(
            self.argv(),
            stdout_path=self.stderr_path,
            stderr_path=self.stderr_path,
            cwd=self.repo_root,
            env={**os.environ, **self.env} if self.env else None,
            name="regmirror",
        )
        self._process.start()
        try:
            wait_http_ready(
                self._process,
                self.url + "/v2/",
                self.ready_timeout,
                log_path=self.log_path,
                extra_logs=(self.stderr_path,),
                headers=self.ready_headers,
                ssl_context=self.ssl_context,
            )
        except BaseException:
            self._process.stop()
            raise

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, SIGKILL fallback. Returns the exit status (None: never started)."""
        return self._process.stop(timeout) if self._process is not None else None

    def kill9(self) -> int | None:
        return self._process.kill9() if self._process is not None else None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Mirror:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- store layout -------------------------------------------------------------

    @property
    def tmp_dir(self) -> Path:
        return self.root / "_tmp"

    def blob_path(self, digest: str) -> Path:
        algorithm, _, hex_ = digest.partition(":")
        return self.root / "blobs" / algorithm / hex_[:2] / hex_

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def blob_sha256(self, digest: str) -> str:
        """``sha256:<hex>`` of the stored file for ``digest`` (raises if absent)."""
        h = hashlib.sha256()
        with open(self.blob_path(digest), "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return "sha256:" + h.hexdigest()

    def tmp_files(self) -> list[Path]:
        """Files under ``_tmp`` (in-flight downloads), recursively."""
        if not self.tmp_dir.exists():
            return []
        return sorted(p for p in self.tmp_dir.rglob("*") if p.is_file())

    # --- logs ---------------------------------------------------------------------

    def log_text(self) -> str:
        """The whole twistd log, rotated parts first (twistd rotates at 1 MB), then the
        start-up stderr."""
        parts: list[str] = []
        rotated = sorted(
            (p for p in self.base_dir.glob(self.log_path.name + ".*") if p.suffix[1:].isdigit()),
            key=lambda p: -int(p.suffix[1:]),
        )
        for path in [*rotated, self.log_path, self.stderr_path]:
            try:
                parts.append(path.read_text(errors="replace"))
            except FileNotFoundError:
                pass
        return "".join(parts)

    def log_tail(self, lines: int = 60) -> str:
        return (
            f"--- {self.log_path} (tail) ---\n{tail(self.log_path, lines)}\n"
            f"--- {self.stderr_path} (tail) ---\n{tail(self.stderr_path, lines)}"
        )
