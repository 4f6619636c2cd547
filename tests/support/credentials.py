"""Credential sources for the mirror's upstreams, as operators provide them.

* ``write_docker_config(path, {server: (user, password)})``: a Docker ``config.json``
  whose ``auths`` entries hold ``{"auth": base64(user:password)}`` (``form="auth"``,
  what ``docker login`` writes) or ``{"username", "password"}`` (``form="fields"``).
* ``CredentialHelper(directory, username, secret)``: an executable
  ``docker-credential-<name>`` speaking the docker-credential-helpers protocol: ``get``
  reads the server URL on stdin and prints ``{"ServerURL", "Username", "Secret"}``.
  Every call is appended to a log (``calls()``: argv and stdin), so a test can check
  that the mirror ran it, with what, and how often (caching for ``lifetime``).
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal


def write_docker_config(
    path: Path,
    auths: Mapping[str, tuple[str, str]],
    *,
    form: Literal["auth", "fields"] = "auth",
) -> Path:
    entries: dict[str, Any] = {}
    for server, (username, password) in auths.items():
        if form == "auth":
            entries[server] = {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}
        else:
            entries[server] = {"username": username, "password": password}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": entries}, indent=2))
    return path


_HELPER = '''#!{python}
"""docker-credential-helpers protocol, for regmirror's tests."""
import json, sys, time
action = sys.argv[1] if len(sys.argv) > 1 else ""
data = sys.stdin.read()
with open({log!r}, "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "stdin": data, "time": time.time()}}) + "\\n")
if action != "get":
    sys.stderr.write("unsupported action " + repr(action) + "\\n")
    sys.exit(1)
server = data.strip()
if {servers!r} is not None and server not in {servers!r}:
    sys.stdout.write("credentials not found in native keychain\\n")
    sys.exit(1)
json.dump({{"ServerURL": server, "Username": {username!r}, "Secret": {secret!r}}}, sys.stdout)
'''


class CredentialHelper:
    """An executable credential helper under ``directory`` (``path``); answers ``get``
    for any server URL, or only for those in ``servers`` if given."""

    def __init__(
        self,
        directory: Path,
        username: str,
        secret: str,
        *,
        name: str = "regmirror-test",
        servers: list[str] | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"docker-credential-{name}"
        self.log_path = directory / f"docker-credential-{name}.calls"
        self.username = username
        self.secret = secret
        self.path.write_text(
            _HELPER.format(
                python=sys.executable,
                log=str(self.log_path),
                servers=servers,
                username=username,
                secret=secret,
            )
        )
        self.path.chmod(0o755)

    def calls(self) -> list[dict[str, Any]]:
        """``[{"argv": [...], "stdin": "...", "time": ...}, ...]`` in order."""
        try:
            text = self.log_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def get_calls(self) -> list[str]:
        """The server URLs ``get`` was asked for, in order."""
        return [c["stdin"].strip() for c in self.calls() if c["argv"][:1] == ["get"]]
