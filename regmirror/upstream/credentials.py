"""Where an upstream's credentials come from: the config, an environment variable, a
file (Kubernetes and systemd secrets), a docker-credential-helpers program, or a Docker
``config.json``. Credentials are never logged: ``Credential.__repr__`` hides the secret.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred

from regmirror.config import UpstreamConfig
from regmirror.logs import get_logger

log = get_logger()

HELPER_TIMEOUT = 30.0


@attrs.frozen
class Credential:
    username: str
    password: str = attrs.field(repr=False)


class CredentialError(Exception):
    """A configured credential source failed; the message names the source, never the
    secret."""


class Credentials:
    """The credentials of one upstream, resolved on use (cheaply: files are re-read only
    when they change, helpers are run in a thread and cached for their lifetime)."""

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        clock: Callable[[], float],
        run_in_thread: Callable[..., Deferred[Any]],
        environ: dict[str, str] | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._run = run_in_thread
        self._environ = os.environ if environ is None else environ
        self._file_cache: tuple[float, str] | None = None
        self._helper_cache: tuple[float, Credential | None] | None = None
        self.configured = bool(
            config.username
            or config.password
            or config.password_env
            or config.password_file
            or config.helper_command
            or config.docker_config
        )

    async def get(self) -> Credential | None:
        config = self._config
        if config.helper_command:
            return await self._helper()
        if config.docker_config:
            found = self._docker_config()
            if found is not None:
                return found
        password = config.password
        if config.password_env:
            password = self._environ.get(config.password_env, "")
            if not password:
                raise CredentialError(f"the environment variable {config.password_env} is not set")
        elif config.password_file:
            password = self._read_file(config.password_file)
        if not config.username and not password:
            return None
        return Credential(config.username, password)

    def _read_file(self, path: str) -> str:
        try:
            mtime = os.stat(path).st_mtime
            if self._file_cache is None or self._file_cache[0] != mtime:
                with open(path) as f:
                    self._file_cache = (mtime, f.read().strip())
        except OSError as e:
            raise CredentialError(f"cannot read the password file {path}: {e.strerror}") from None
        return self._file_cache[1]

    def _docker_config(self) -> Credential | None:
        path = self._config.docker_config
        try:
            with open(path) as f:
                auths = json.load(f).get("auths", {})
        except (OSError, ValueError, AttributeError) as e:
            raise CredentialError(
                f"cannot read the Docker config {path}: {type(e).__name__}"
            ) from None
        parts = urlsplit(self._config.url)
        host = parts.netloc
        candidates = [host, parts.hostname or "", self._config.url, f"{parts.scheme}://{host}"]
        if self._config.docker_hub:
            candidates += ["https://index.docker.io/v1/", "index.docker.io", "docker.io"]
        for key in candidates:
            entry = auths.get(key) if isinstance(auths, dict) else None
            if not isinstance(entry, dict):
                continue
            if isinstance(entry.get("auth"), str):
                try:
                    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    raise CredentialError(f"a malformed auth entry in {path}") from None
                return Credential(user, password)
            if isinstance(entry.get("username"), str):
                return Credential(entry["username"], str(entry.get("password", "")))
        return None

    async def _helper(self) -> Credential | None:
        now = self._clock()
        if self._helper_cache is not None and self._helper_cache[0] > now:
            return self._helper_cache[1]
        found: Credential | None = await self._run(
            run_helper, self._config.helper_command, _server_url(self._config)
        )
        self._helper_cache = (now + self._config.helper_lifetime, found)
        return found


def _server_url(config: UpstreamConfig) -> str:
    if config.docker_hub:
        return "https://index.docker.io/v1/"
    return urlsplit(config.url).netloc


def run_helper(command: str, server: str) -> Credential | None:
    """``command get`` with the server on stdin (the docker-credential-helpers
    protocol). Blocking: call it in a thread."""
    try:
        done = subprocess.run(
            [command, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CredentialError(
            f"the credential helper {command} failed: {type(e).__name__}"
        ) from None
    if done.returncode != 0:
        if b"credentials not found" in done.stdout.lower() + done.stderr.lower():
            return None
        raise CredentialError(f"the credential helper {command} exited with {done.returncode}")
    try:
        data = json.loads(done.stdout)
        return Credential(str(data["Username"]), str(data["Secret"]))
    except (ValueError, KeyError, TypeError):
        raise CredentialError(f"the credential helper {command} printed no credentials") from None
