"""Deterministic test images, and a stdlib-only pusher for the registry HTTP API.

Everything is derived from string seeds with ``random.Random(seed)``: the same seed
always gives the same bytes, so the same digests, in every run and on every machine.

Layers come in two formats:

* ``"tar+gzip"`` (default): a real gzip-compressed tar holding one file of random
  bytes, gzip level 0 ("stored" deflate blocks: fast, and random data would not
  compress anyway). The blob is slightly bigger than ``size`` (headers).
* ``"raw"``: exactly ``size`` random bytes, declared with the *uncompressed* layer media
  type. Not a valid tar, but registries, mirrors and ``skopeo copy ... dir:`` move
  blobs without looking inside. Use it when the blob size must be exact or huge.

Pushing uses the distribution API with ``http.client`` only: a monolithic blob upload
(``POST /v2/<name>/blobs/uploads/`` then ``PUT <Location>&digest=...``) per blob that
the registry does not have yet, then the manifests, children of an index first.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import random
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from tests.support.rawhttp import connect
from tests.support.regauth import basic_auth, fetch_token, parse_challenge

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCTET_STREAM = "application/octet-stream"

MANIFEST_MEDIA_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)
INDEX_MEDIA_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
# What a modern client sends: without it distribution 2.8 tries to down-convert.
ACCEPT_MANIFESTS = ", ".join(MANIFEST_MEDIA_TYPES)

Kind = Literal["docker", "oci"]
LayerFormat = Literal["tar+gzip", "raw"]

# Layer sizes (bytes of random content) of the standard images: small but not tiny.
DEFAULT_LAYER_SIZES = (300_000, 120_000)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def random_bytes(seed: str, size: int) -> bytes:
    """``size`` pseudo-random bytes, a pure function of ``seed`` (~200 MB/s)."""
    return random.Random(seed).randbytes(size)


@dataclass(frozen=True)
class Blob:
    """A blob as pushed: its bytes, digest, size, the media type its descriptor uses,
    and the seed it was generated from (regenerate with the same function and seed)."""

    digest: str
    media_type: str
    data: bytes = field(repr=False)
    seed: str = ""

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def hex(self) -> str:
        return self.digest.partition(":")[2]

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "size": self.size, "digest": self.digest}


def make_blob(seed: str, size: int, media_type: str = OCTET_STREAM) -> Blob:
    """A blob of exactly ``size`` random bytes."""
    data = random_bytes(seed, size)
    return Blob(sha256_digest(data), media_type, data, seed)


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def as_json(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


LINUX_AMD64 = Platform("linux", "amd64")
LINUX_ARM64 = Platform("linux", "arm64")


@dataclass(frozen=True)
class Manifest:
    """An image manifest (``config`` + ``layers``) or an index (``children``)."""

    media_type: str
    data: bytes = field(repr=False)
    digest: str
    config: Blob | None = None
    layers: tuple[Blob, ...] = ()
    children: tuple[Manifest, ...] = ()
    platform: Platform | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def hex(self) -> str:
        return self.digest.partition(":")[2]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES

    def own_blobs(self) -> list[Blob]:
        """Config and layers of this manifest (nothing for an index)."""
        return ([self.config] if self.config is not None else []) + list(self.layers)

    def blobs(self) -> list[Blob]:
        """Every blob this manifest references, recursively, each digest once."""
        seen: dict[str, Blob] = {}
        for manifest in self.manifests():
            for blob in manifest.own_blobs():
                seen.setdefault(blob.digest, blob)
        return list(seen.values())

    def manifests(self) -> list[Manifest]:
        """This manifest and, for an index, its children."""
        return [self, *self.children]

    def child(self, platform: Platform | str) -> Manifest:
        for c in self.children:
            if c.platform == platform or str(c.platform) == str(platform):
                return c
        raise KeyError(f"no child manifest for platform {platform}")

    def descriptor(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "size": self.size,
            "digest": self.digest,
        }
        if self.platform is not None:
            out["platform"] = self.platform.as_json()
        return out


@dataclass(frozen=True)
class Image:
    """What was (or will be) pushed: repository ``name``, ``tag`` (plus ``extra_tags``
    pointing at the same manifest) and the top-level ``manifest``."""

    name: str
    tag: str
    manifest: Manifest
    extra_tags: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def media_type(self) -> str:
        return self.manifest.media_type

    @property
    def tags(self) -> tuple[str, ...]:
        return (self.tag, *self.extra_tags)

    def blobs(self) -> list[Blob]:
        return self.manifest.blobs()

    def manifests(self) -> list[Manifest]:
        return self.manifest.manifests()

    def blob(self, digest: str) -> Blob:
        for b in self.blobs():
            if b.digest == digest:
                return b
        raise KeyError(digest)

    def largest_blob(self) -> Blob:
        return max(self.blobs(), key=lambda b: b.size)

    def ref(self, host: str) -> str:
        """``host/name:tag``, e.g. for skopeo's ``docker://`` transport."""
        return f"{host}/{self.name}:{self.tag}"

    def with_name(self, name: str, tag: str | None = None) -> Image:
        return Image(name, tag or self.tag, self.manifest, self.extra_tags)


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, indent=3, sort_keys=False).encode()


def make_layer(
    seed: str, size: int, kind: Kind = "oci", layer_format: LayerFormat = "tar+gzip"
) -> tuple[Blob, str]:
    """A layer blob and its diff ID (digest of the uncompressed tar)."""
    content = random_bytes(seed, size)
    if layer_format == "raw":
        media_type = OCI_LAYER_TAR if kind == "oci" else DOCKER_LAYER_TAR
        blob = Blob(sha256_digest(content), media_type, content, seed)
        return blob, blob.digest
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"data/{hashlib.sha256(seed.encode()).hexdigest()[:16]}.bin")
        info.size = size
        info.mtime = 0
        info.mode = 0o644
        info.uname = info.gname = "root"
        tar.addfile(info, io.BytesIO(content))
    tar_bytes = buf.getvalue()
    compressed = gzip.compress(tar_bytes, compresslevel=0, mtime=0)
    media_type = OCI_LAYER_GZIP if kind == "oci" else DOCKER_LAYER_GZIP
    return Blob(sha256_digest(compressed), media_type, compressed, seed), sha256_digest(tar_bytes)


def image_manifest(
    kind: Kind,
    seed: str,
    layer_sizes: Sequence[int] = DEFAULT_LAYER_SIZES,
    *,
    layer_format: LayerFormat = "tar+gzip",
    platform: Platform = LINUX_AMD64,
) -> Manifest:
    """A single-platform image: a Docker schema2 (``kind="docker"``) or OCI manifest."""
    layers: list[Blob] = []
    diff_ids: list[str] = []
    for i, size in enumerate(layer_sizes):
        blob, diff_id = make_layer(f"{seed}/layer{i}", size, kind, layer_format)
        layers.append(blob)
        diff_ids.append(diff_id)
    config_doc = {
        "architecture": platform.architecture,
        "os": platform.os,
        **({"variant": platform.variant} if platform.variant else {}),
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": [f"TEST_IMAGE_SEED={seed}"], "Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": "2024-01-01T00:00:00Z", "created_by": f"layer {i}"}
            for i in range(len(layers))
        ],
    }
    config_bytes = _json_bytes(config_doc)
    config = Blob(
        sha256_digest(config_bytes),
        OCI_CONFIG if kind == "oci" else DOCKER_CONFIG,
        config_bytes,
        seed + "/config",
    )
    media_type = OCI_MANIFEST if kind == "oci" else DOCKER_MANIFEST
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    data = _json_bytes(doc)
    return Manifest(
        media_type,
        data,
        sha256_digest(data),
        config=config,
        layers=tuple(layers),
        platform=platform,
    )


def index_manifest(
    kind: Kind,
    seed: str,
    platforms: Sequence[Platform] = (LINUX_AMD64, LINUX_ARM64),
    layer_sizes: Sequence[int] = DEFAULT_LAYER_SIZES,
    *,
    layer_format: LayerFormat = "tar+gzip",
) -> Manifest:
    """An OCI index (``kind="oci"``) or a Docker manifest list of one image per platform."""
    children = tuple(
        image_manifest(
            kind, f"{seed}/{platform}", layer_sizes, layer_format=layer_format, platform=platform
        )
        for platform in platforms
    )
    media_type = OCI_INDEX if kind == "oci" else DOCKER_MANIFEST_LIST
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [c.descriptor() for c in children],
    }
    data = _json_bytes(doc)
    return Manifest(media_type, data, sha256_digest(data), children=children)


def docker_image(
    name: str,
    tag: str,
    seed: str | None = None,
    layer_sizes: Sequence[int] = DEFAULT_LAYER_SIZES,
    *,
    layer_format: LayerFormat = "tar+gzip",
    extra_tags: Sequence[str] = (),
) -> Image:
    """A Docker schema2 image (``application/vnd.docker.distribution.manifest.v2+json``)."""
    seed = seed or f"{name}:{tag}"
    manifest = image_manifest("docker", seed, layer_sizes, layer_format=layer_format)
    return Image(name, tag, manifest, tuple(extra_tags))


def oci_image(
    name: str,
    tag: str,
    seed: str | None = None,
    layer_sizes: Sequence[int] = DEFAULT_LAYER_SIZES,
    *,
    layer_format: LayerFormat = "tar+gzip",
    extra_tags: Sequence[str] = (),
) -> Image:
    """An OCI image (``application/vnd.oci.image.manifest.v1+json``)."""
    seed = seed or f"{name}:{tag}"
    manifest = image_manifest("oci", seed, layer_sizes, layer_format=layer_format)
    return Image(name, tag, manifest, tuple(extra_tags))


def multi_platform_image(
    name: str,
    tag: str,
    seed: str | None = None,
    layer_sizes: Sequence[int] = DEFAULT_LAYER_SIZES,
    *,
    kind: Kind = "oci",
    platforms: Sequence[Platform] = (LINUX_AMD64, LINUX_ARM64),
    layer_format: LayerFormat = "tar+gzip",
    extra_tags: Sequence[str] = (),
) -> Image:
    """An OCI index (default) or Docker manifest list over one image per platform."""
    seed = seed or f"{name}:{tag}"
    manifest = index_manifest(kind, seed, platforms, layer_sizes, layer_format=layer_format)
    return Image(name, tag, manifest, tuple(extra_tags))


def standard_images() -> dict[str, Image]:
    """The images the integration tests push once per session, by role."""
    return {
        "schema2": docker_image(
            "library/alpine", "3.19", layer_sizes=(900_000, 150_000), extra_tags=("latest",)
        ),
        "oci": oci_image("team/app/server", "1.0", layer_sizes=(1_500_000, 200_000, 100_000)),
        "index": multi_platform_image("multi/arch", "latest", layer_sizes=(400_000, 120_000)),
        "docker_list": multi_platform_image(
            "multi/dockerlist", "latest", kind="docker", layer_sizes=(250_000,)
        ),
    }


# --- pushing ---------------------------------------------------------------------


class PushError(RuntimeError):
    pass


class RegistryPusher:
    """Uploads blobs and manifests to a registry at ``base_url`` with ``http.client``.

    Keeps one connection open and reconnects when the server closes it. Answers a
    ``401`` once per request: ``Basic`` with ``username``/``password``; ``Bearer`` with a
    token from the challenge's realm (for the challenge's scope, with those credentials
    if given), kept until the next challenge.
    """

    def __init__(
        self,
        base_url: str,
        timeout: float = 60.0,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.username = username
        self.password = password
        # The Authorization header to send; a 401 challenge replaces it (Basic with
        # the credentials, or a Bearer token fetched from the challenge's realm).
        self._authorization: str | None = f"Bearer {token}" if token else None
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> RegistryPusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> tuple[http.client.HTTPResponse, bytes]:
        resp, data = self._send(method, target, body, headers)
        if resp.status == 401 and self._answer_challenge(resp.getheader("WWW-Authenticate")):
            resp, data = self._send(method, target, body, headers)
        return resp, data

    def _answer_challenge(self, challenge: str | None) -> bool:
        """Set the Authorization a ``401`` asks for; ``False`` if there is none to try."""
        if not challenge:
            return False
        scheme, params = parse_challenge(challenge)
        if scheme == "basic" and self.username is not None:
            self._authorization = basic_auth(self.username, self.password or "")
            return True
        if scheme == "bearer" and "realm" in params:
            doc = fetch_token(params, username=self.username, password=self.password)
            self._authorization = "Bearer " + (doc.get("token") or doc["access_token"])
            return True
        return False

    def _send(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> tuple[http.client.HTTPResponse, bytes]:
        headers = dict(headers or {})
        if self._authorization is not None:
            headers["Authorization"] = self._authorization
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = connect(self.base_url, self.timeout)
            try:
                self._conn.request(method, target, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt == 2:
                    raise
                continue
            if resp.will_close:
                self.close()
            return resp, data
        raise AssertionError("unreachable")

    def _target(self, location: str) -> str:
        """A Location header (absolute or relative) as a request target on our server."""
        parts = urlsplit(location)
        base = urlsplit(self.base_url)
        if parts.netloc and parts.netloc != base.netloc:
            raise PushError(f"upload redirected to another host: {location}")
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def blob_exists(self, name: str, digest: str) -> bool:
        resp, _ = self._request("HEAD", f"/v2/{name}/blobs/{digest}")
        return resp.status == 200

    def push_blob(self, name: str, blob: Blob, *, skip_existing: bool = True) -> None:
        """Monolithic upload: ``POST .../blobs/uploads/``, then ``PUT <Location>&digest=``."""
        if skip_existing and self.blob_exists(name, blob.digest):
            return
        resp, body = self._request("POST", f"/v2/{name}/blobs/uploads/")
        location = resp.getheader("Location")
        if resp.status != 202 or not location:
            raise PushError(f"POST upload for {name}: {resp.status} {body[:500]!r}")
        target = self._target(location)
        target += ("&" if "?" in target else "?") + f"digest={blob.digest}"
        resp, body = self._request(
            "PUT", target, blob.data, {"Content-Type": "application/octet-stream"}
        )
        if resp.status != 201:
            raise PushError(f"PUT blob {blob.digest} to {name}: {resp.status} {body[:500]!r}")
        got = resp.getheader("Docker-Content-Digest")
        if got is not None and got != blob.digest:
            raise PushError(f"registry computed {got} for blob {blob.digest}")

    def push_manifest(self, name: str, reference: str, manifest: Manifest) -> None:
        resp, body = self._request(
            "PUT",
            f"/v2/{name}/manifests/{reference}",
            manifest.data,
            {"Content-Type": manifest.media_type},
        )
        if resp.status != 201:
            raise PushError(
                f"PUT manifest {name}:{reference} ({manifest.media_type}): "
                f"{resp.status} {body[:500]!r}"
            )
        got = resp.getheader("Docker-Content-Digest")
        if got is not None and got != manifest.digest:
            raise PushError(f"registry computed {got} for manifest {manifest.digest}")

    def push_image(self, image: Image, tags: Iterable[str] | None = None) -> Image:
        """Push blobs, child manifests (by digest), then the top manifest under each tag."""
        for blob in image.blobs():
            self.push_blob(image.name, blob)
        for child in image.manifest.children:
            self.push_manifest(image.name, child.digest, child)
        for tag in image.tags if tags is None else tags:
            self.push_manifest(image.name, tag, image.manifest)
        return image


def push_image(
    base_url: str,
    image: Image,
    *,
    username: str | None = None,
    password: str | None = None,
    token: str | None = None,
) -> Image:
    """Push ``image`` (all its tags) to the registry at ``base_url``; returns it.

    With ``username``/``password`` the pusher answers ``401`` challenges: Basic with
    them, Bearer with a token fetched from the realm with them; ``token`` is sent as a
    Bearer token from the first request."""
    with RegistryPusher(base_url, username=username, password=password, token=token) as pusher:
        return pusher.push_image(image)


def push_images(
    base_url: str,
    images: Iterable[Image],
    *,
    username: str | None = None,
    password: str | None = None,
    token: str | None = None,
) -> list[Image]:
    with RegistryPusher(base_url, username=username, password=password, token=token) as pusher:
        return [pusher.push_image(image) for image in images]


def push_blob(base_url: str, name: str, blob: Blob) -> Blob:
    """Upload one blob into repository ``name`` (no manifest refers to it)."""
    with RegistryPusher(base_url) as pusher:
        pusher.push_blob(name, blob, skip_existing=False)
    return blob
