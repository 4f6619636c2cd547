"""Test doubles shipped beside what they fake: an in-memory upstream registry.

``FakeRegistry`` is a twisted.web Resource speaking the read side of the distribution
API; wrap it in ``treq.testing.StubTreq`` and hand that to ``Upstream(client=...)`` to
test the cache and the web layer without sockets.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeRegistry(Resource):
    """An upstream registry in memory. ``hold_blobs`` keeps blob responses open after
    their headers until ``release`` is called, so tests can join fetches in flight."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.tag_lists: dict[str, list[str]] = {}
        self.requests: Counter[tuple[str, str]] = Counter()
        self.hold_blobs = False
        self.down = False
        self.held: list[tuple[Request, bytes]] = []
        self.served_blobs: dict[str, bytes] = {}  # what to send instead of the real bytes
        # repository -> the only digests it may serve (blobs and manifests), if listed
        self.private: dict[str, set[str]] = {}

    def add_blob(self, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(self, name: str, tag: str | None, data: bytes, media_type: str) -> str:
        digest = digest_of(data)
        self.manifests[(name, digest)] = (data, media_type)
        if tag is not None:
            self.manifests[(name, tag)] = (data, media_type)
        return digest

    def count(self, method: str, path_part: str) -> int:
        return sum(n for (m, p), n in self.requests.items() if m == method and path_part in p)

    def release(self, chunk: int | None = None) -> None:
        """Finish every held blob response (or send ``chunk`` bytes more of each)."""
        still = []
        for request, rest in self.held:
            if chunk is not None and len(rest) > chunk:
                request.write(rest[:chunk])
                still.append((request, rest[chunk:]))
                continue
            if rest:
                request.write(rest)
            request.finish()
        self.held = still

    def render(self, request: Request) -> Any:
        method = request.method.decode()
        path = request.path.decode()
        self.requests[(method, path)] += 1
        if self.down:
            request.setResponseCode(503)
            return b'{"errors":[{"code":"UNAVAILABLE","message":"down"}]}'
        parts = path.split("/")
        if path == "/v2/":
            return b"{}"
        name = "/".join(parts[2:-2])
        if name in self.private and parts[-1] not in self.private[name]:
            request.setResponseCode(404)
            return b'{"errors":[{"code":"BLOB_UNKNOWN","message":"not in this repository"}]}'
        if len(parts) >= 5 and parts[-2] == "blobs":
            return self._blob(request, parts[-1])
        if len(parts) >= 5 and parts[-2] == "manifests":
            return self._manifest(request, "/".join(parts[2:-2]), parts[-1])
        if path.endswith("/tags/list"):
            name = path[len("/v2/") : -len("/tags/list")]
            if name not in self.tag_lists:
                request.setResponseCode(404)
                return b'{"errors":[{"code":"NAME_UNKNOWN","message":"unknown"}]}'
            import json

            return json.dumps({"name": name, "tags": self.tag_lists[name]}).encode()
        request.setResponseCode(404)
        return b""

    def _blob(self, request: Request, digest: str) -> Any:
        data = self.blobs.get(digest)
        if data is None:
            request.setResponseCode(404)
            return b'{"errors":[{"code":"BLOB_UNKNOWN","message":"unknown"}]}'
        data = self.served_blobs.get(digest, data)
        request.setHeader(b"content-length", b"%d" % len(data))
        request.setHeader(b"docker-content-digest", digest.encode())
        if request.method == b"HEAD":
            return b""
        if self.hold_blobs:
            request.write(b"")
            self.held.append((request, data))
            return NOT_DONE_YET
        return data

    def _manifest(self, request: Request, name: str, reference: str) -> Any:
        found = self.manifests.get((name, reference))
        if found is None:
            request.setResponseCode(404)
            return b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}'
        data, media_type = found
        request.setHeader(b"content-type", media_type.encode())
        request.setHeader(b"docker-content-digest", digest_of(data).encode())
        request.setHeader(b"content-length", b"%d" % len(data))
        return b"" if request.method == b"HEAD" else data
