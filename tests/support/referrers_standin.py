"""A STAND-IN upstream registry with the OCI 1.1 referrers API.

No registry installable here (Debian's docker-registry is distribution 2.8, which has
no referrers API) implements ``GET /v2/<name>/referrers/<digest>``, so the tests of the
mirror's upstream-API path use this small server instead. It is not a registry: it
serves what a test put in it (``add_blob``, ``add_manifest``), read-only:

* ``GET /v2/``;
* ``GET``/``HEAD /v2/<name>/manifests/<tag or digest>`` and ``/v2/<name>/blobs/<digest>``;
* ``GET /v2/<name>/referrers/<digest>``, as the distribution spec asks: an OCI image
  index of the manifests in ``<name>`` whose ``subject`` is ``<digest>`` (each
  descriptor with ``artifactType``: the manifest's, else its config's media type, and
  its annotations), ``200`` even when there are none; ``?artifactType=`` filters it and
  sets ``OCI-Filters-Applied: artifactType``; with ``page_size`` set, the list comes in
  pages linked by ``Link: <...?n=N&last=DIGEST>; rel="next"``.

Every request is recorded (``requests``: method and target, query included).
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from tests.support.httpserver import LoopbackHTTPServer, QuietHandler

OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Handler(QuietHandler):
    owner: ReferrersStandin

    def do_GET(self) -> None:
        self.owner.record(self.command, self.path)
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        if path == "/v2/":
            self.send_body(200, b"{}")
            return
        head, _, last = path.rpartition("/")
        name, _, kind = head.removeprefix("/v2/").rpartition("/")
        if kind == "manifests" and (found := self.owner.manifest(name, last)) is not None:
            data, media_type = found
            headers = {"Docker-Content-Digest": _digest(data)}
            self.send_body(200, data, headers, content_type=media_type)
        elif kind == "blobs" and (blob := self.owner.blobs.get(last)) is not None:
            headers = {"Docker-Content-Digest": last}
            self.send_body(200, blob, headers, content_type="application/octet-stream")
        elif kind == "referrers":
            self._referrers(name, last, query)
        else:
            error = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "unknown"}]}
            self.send_body(404, json.dumps(error).encode())

    do_HEAD = do_GET

    def _referrers(self, name: str, subject: str, query: dict[str, list[str]]) -> None:
        listed = self.owner.referrers(name, subject)
        headers = {}
        wanted = query.get("artifactType")
        if wanted:
            listed = [d for d in listed if d.get("artifactType") in wanted]
            headers["OCI-Filters-Applied"] = "artifactType"
        size = self.owner.page_size
        if size:
            after = query.get("last", [""])[0]
            if after:
                digests = [d["digest"] for d in listed]
                listed = listed[digests.index(after) + 1 :] if after in digests else []
            if len(listed) > size:
                page = {"n": str(size), "last": listed[size - 1]["digest"]}
                if wanted:
                    page["artifactType"] = wanted[0]
                headers["Link"] = f'</v2/{name}/referrers/{subject}?{urlencode(page)}>; rel="next"'
                listed = listed[:size]
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": listed}
        self.send_body(200, json.dumps(index).encode(), headers, content_type=OCI_INDEX)


class ReferrersStandin(LoopbackHTTPServer):
    """The stand-in (see the module's docstring); ``start()``/``stop()``/``url``."""

    handler_class = _Handler
    thread_name = "referrers-standin"

    def __init__(self, *, page_size: int = 0) -> None:
        super().__init__()
        self.page_size = page_size
        self.blobs: dict[str, bytes] = {}
        self._manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self._order: list[tuple[str, str]] = []  # (name, digest) in the order added
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []

    def add_blob(self, data: bytes) -> str:
        digest = _digest(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(self, name: str, data: bytes, media_type: str, tag: str | None = None) -> str:
        digest = _digest(data)
        with self._lock:
            self._manifests[(name, digest)] = (data, media_type)
            self._order.append((name, digest))
            if tag is not None:
                self._manifests[(name, tag)] = (data, media_type)
        return digest

    def manifest(self, name: str, reference: str) -> tuple[bytes, str] | None:
        with self._lock:
            return self._manifests.get((name, reference))

    def referrers(self, name: str, subject: str) -> list[dict[str, Any]]:
        """The descriptors of ``name``'s manifests whose subject is ``subject``."""
        found = []
        with self._lock:
            entries = [(d, self._manifests[(n, d)]) for n, d in self._order if n == name]
        for digest, (data, media_type) in entries:
            manifest = json.loads(data)
            if (manifest.get("subject") or {}).get("digest") != subject:
                continue
            descriptor: dict[str, Any] = {
                "mediaType": media_type,
                "digest": digest,
                "size": len(data),
                "artifactType": manifest.get("artifactType")
                or manifest.get("config", {}).get("mediaType"),
            }
            if manifest.get("annotations"):
                descriptor["annotations"] = manifest["annotations"]
            found.append(descriptor)
        return found

    def record(self, method: str, target: str) -> None:
        with self._lock:
            self.requests.append((method, target))

    def count(self, method: str, part: str) -> int:
        with self._lock:
            return sum(1 for m, t in self.requests if m == method and part in t)
