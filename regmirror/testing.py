"""Test doubles shipped beside what they fake.

``FakeRegistry`` is a twisted.web Resource speaking the read side of the distribution
API; wrap it in ``treq.testing.StubTreq`` and hand that to ``Upstream(client=...)`` to
test the cache and the web layer without sockets. ``FakeInFlight`` and
``FakeTagFreshness`` fake the seams ``regmirror.fetch.inflight.InFlight`` and
``regmirror.mirror.freshness.TagFreshness`` (tests/unit/test_seams.py checks that they,
and the local implementations, match their Protocols).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from regmirror.domain.digest import Digest
from regmirror.domain.media import Accept
from regmirror.fetch.blobfetch import BlobFetch, FetchView
from regmirror.fetch.inflight import (
    FailureReason,
    FetchProgress,
    InFlight,
    Release,
    StartFetch,
    failure_reason,
)
from regmirror.mirror.freshness import Seen, TagFreshness, TagRef, Turn


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
        # (repository, subject digest) -> descriptors its referrers API lists; with
        # ``referrers_api`` False the endpoint is a plain-text 404, as distribution 2.8's
        self.referrers: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.referrers_api = False
        # (remaining, limit): Docker Hub's ratelimit-* headers on every answer; as
        # there, each manifest GET (not a HEAD) takes one from remaining
        self.ratelimit: tuple[int, int] | None = None

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
        if self.ratelimit is not None:
            remaining, limit = self.ratelimit
            if method == "GET" and "/manifests/" in path:
                remaining = max(remaining - 1, 0)
                self.ratelimit = (remaining, limit)
            request.setHeader(b"ratelimit-remaining", b"%d;w=21600" % remaining)
            request.setHeader(b"ratelimit-limit", b"%d;w=21600" % limit)
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
        if len(parts) >= 5 and parts[-2] == "referrers":
            return self._referrers(request, name, parts[-1])
        if path.endswith("/tags/list"):
            name = path[len("/v2/") : -len("/tags/list")]
            if name not in self.tag_lists:
                request.setResponseCode(404)
                return b'{"errors":[{"code":"NAME_UNKNOWN","message":"unknown"}]}'
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

    def _referrers(self, request: Request, name: str, digest: str) -> bytes:
        if not self.referrers_api:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"404 page not found\n"
        listed = self.referrers.get((name, digest), [])
        args: dict[bytes, list[bytes]] = request.args or {}
        wanted = args.get(b"artifactType")
        if wanted:
            listed = [d for d in listed if d.get("artifactType") == wanted[0].decode()]
            request.setHeader(b"oci-filters-applied", b"artifactType")
        request.setHeader(b"content-type", b"application/vnd.oci.image.index.v1+json")
        index = {"schemaVersion": 2, "manifests": listed}
        return json.dumps(index).encode()


class FakeInFlight:
    """``InFlight`` as simple as it gets, its state open to the test: no fetch slots
    and no single flight (each ``join_or_start`` that finds no fetch running calls its
    ``start``); ``started`` lists the fetches begun, ``running`` those in flight,
    ``reads`` the readers now; the digests in ``held`` are in use as if read."""

    def __init__(self) -> None:
        self.held: set[Digest] = set()
        self.started: list[Digest] = []
        self.running: dict[Digest, BlobFetch] = {}
        self.reads: dict[object, Digest] = {}  # one entry per reader
        self.failed: Counter[FailureReason] = Counter()

    def fetch(self, digest: Digest) -> FetchView | None:
        return self.running.get(digest)

    def active(self, digest: Digest) -> bool:
        return digest in self.running

    async def join_or_start(self, digest: Digest, start: StartFetch) -> FetchView:
        if digest in self.running:
            return self.running[digest]
        self.started.append(digest)
        return await start(_FakeLease(self))

    def reading(self, digest: Digest) -> Release:
        token = object()
        self.reads[token] = digest

        def release() -> None:
            self.reads.pop(token, None)

        return release

    def in_use(self, digest: Digest) -> bool:
        return digest in self.held or digest in self.running or digest in self.reads.values()

    def failures(self) -> Mapping[FailureReason, int]:
        return self.failed

    def count(self) -> int:
        return len(self.running)

    def readers(self) -> int:
        return len(self.reads)

    def fetches(self) -> list[FetchProgress]:
        readers = Counter(self.reads.values())
        return [FetchProgress.of(f, readers[d]) for d, f in self.running.items()]


class _FakeLease:
    def __init__(self, owner: FakeInFlight) -> None:
        self._owner = owner

    def started(self, fetch: BlobFetch) -> None:
        self._owner.running[fetch.digest] = fetch

    def ended(self, fetch: BlobFetch) -> None:
        self._owner.running.pop(fetch.digest, None)
        reason = failure_reason(fetch)
        if reason is not None:
            self._owner.failed[reason] += 1


class FakeTagFreshness:
    """``TagFreshness`` that a test sets: a (tag, media type) is fresh while it is in
    ``fresh_now``, whatever the window; ``checked`` records each check (and makes it
    fresh), ``forget`` drops a tag; ``seen`` holds what other replicas checked."""

    def __init__(self) -> None:
        self.fresh_now: set[tuple[TagRef, str]] = set()
        self.checks: list[tuple[TagRef, str, float]] = []
        self.seen: dict[TagRef, Seen] = {}

    def fresh(self, tag: TagRef, media_type: str, window: float) -> bool:
        return (tag, media_type) in self.fresh_now

    def checked(
        self, tag: TagRef, media_type: str, when: float, digest: str = "", window: float = 0.0
    ) -> None:
        self.checks.append((tag, media_type, when))
        self.fresh_now.add((tag, media_type))

    def forget(self, tag: TagRef) -> None:
        self.fresh_now = {(t, m) for t, m in self.fresh_now if t != tag}

    async def settle(self, tag: TagRef, accept: Accept, window: float) -> Seen | Turn:
        """What ``seen`` holds for the tag (another replica's check), else the turn."""
        seen = self.seen.get(tag)
        return seen if seen is not None else Turn()


def _fakes_match_their_protocols() -> tuple[InFlight, TagFreshness]:
    """Never called: mypy checks here that the fakes are what they fake."""
    return FakeInFlight(), FakeTagFreshness()
