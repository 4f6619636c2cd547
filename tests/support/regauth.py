"""Registry authentication for the tests: both sides of it.

Server side, for ``UpstreamRegistry(extra_config=...)``:

* ``write_htpasswd(path, users)`` writes bcrypt entries (distribution accepts nothing
  else), with the ``bcrypt`` module, or ``htpasswd -B`` from apache2-utils without it;
* ``htpasswd_config(path)`` is the ``auth: htpasswd:`` section.

Client side, for the pusher and for tests that talk to a registry directly:

* ``basic_auth(user, password)``: the ``Authorization`` value;
* ``parse_challenge(header)``: ``WWW-Authenticate`` into ``(scheme, params)``;
* ``fetch_token(params, ...)``: the Docker token protocol's ``GET realm?service=&scope=``.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from tests.support.process import require_tool
from tests.support.rawhttp import request

HTPASSWD_REALM = "regmirror-tests"

_PARAM = re.compile(r'\s*([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def basic_auth(username: str, password: str) -> str:
    """``Basic base64(user:password)``."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="...",scope="..."`` -> ``("bearer", {...})``."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        match = _PARAM.match(rest, pos)
        if match is None or match.end() == pos:
            break
        key, quoted, bare = match.groups()
        params[key.lower()] = re.sub(r"\\(.)", r"\1", quoted if quoted is not None else bare)
        pos = match.end()
    return scheme.lower(), params


def fetch_token(
    params: Mapping[str, str],
    *,
    username: str | None = None,
    password: str | None = None,
    scope: str | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Ask the realm of a Bearer challenge for a token (``scope`` overrides the
    challenge's); returns the JSON answer. Raises ``AssertionError`` on a non-200."""
    realm = urlsplit(params["realm"])
    query: list[tuple[str, str]] = []
    if "service" in params:
        query.append(("service", params["service"]))
    if scope or params.get("scope"):
        for one in (scope or params["scope"]).split(" "):
            query.append(("scope", one))
    target = realm.path + "?" + (realm.query + "&" if realm.query else "") + urlencode(query)
    headers = {}
    if username is not None:
        headers["Authorization"] = basic_auth(username, password or "")
    resp = request(
        f"{realm.scheme}://{realm.netloc}", "GET", target, headers=headers, timeout=timeout
    )
    if resp.status != 200:
        raise AssertionError(f"token request {target}: {resp.status} {resp.body[:300]!r}")
    doc: dict[str, Any] = json.loads(resp.body)
    return doc


def htpasswd_line(username: str, password: str) -> str:
    """One bcrypt htpasswd entry (cost 4, the minimum: these are test passwords)."""
    try:
        import bcrypt
    except ImportError:  # the htpasswd program of apache2-utils does the same
        out = subprocess.run(
            [require_tool("htpasswd"), "-n", "-b", "-B", "-C", "4", username, password],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return out.strip()
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"{username}:{hashed}"


def write_htpasswd(path: Path, users: Mapping[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(htpasswd_line(u, p) + "\n" for u, p in users.items()))
    return path


def htpasswd_config(path: Path, realm: str = HTPASSWD_REALM) -> dict[str, Any]:
    """distribution's ``auth: htpasswd:`` section (merge it into the registry's config)."""
    return {"auth": {"htpasswd": {"realm": realm, "path": str(path)}}}
