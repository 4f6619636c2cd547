"""The mirror authenticates to its upstreams: Basic credentials from every source,
Bearer tokens from a token server (per scope, reused, renewed), credentials kept to
their own host (token realms elsewhere, blob redirects), and never shown to anyone.

The upstreams are distribution registries: one with htpasswd auth, one with token auth
trusting ``TokenServer`` (tests/support/tokenserver.py), one redirecting blob reads to
a ``BlobHost`` on 127.0.0.2. Images are pushed into them with credentials.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.blobhost import BlobHost, redirect_config
from tests.support.credentials import CredentialHelper, write_docker_config
from tests.support.images import ACCEPT_MANIFESTS, oci_image, push_images
from tests.support.mirror import Mirror
from tests.support.proxy import CountingProxy
from tests.support.rawhttp import Response, assert_registry_error, request
from tests.support.regauth import htpasswd_config, write_htpasswd
from tests.support.skopeo import SkopeoError, skopeo_copy, verify_dir
from tests.support.tokenserver import TokenServer
from tests.support.upstream import UpstreamRegistry
from tests.support.wait import poll_until

if TYPE_CHECKING:
    from tests.integration.conftest import MakeMirror

USER = "mirror-robot"
# Distinctive, so that finding it in a log or a body means it leaked.
PASSWORD = "Tr0ub4dor-3-upstream-secret"
WRONG_PASSWORD = "n0t-the-r1ght-one-either"

APP = oci_image("team/app", "1.0", seed="private team/app 1.0", layer_sizes=(60_000, 20_000))
APP2 = oci_image("team/app", "2.0", seed="private team/app 2.0", layer_sizes=(30_000,))
IMG = oci_image("owner/img", "1.0", seed="token owner/img 1.0", layer_sizes=(50_000, 10_000))
IMG2 = oci_image("owner/img", "2.0", seed="token owner/img 2.0", layer_sizes=(40_000,))
OTHER = oci_image("other/img", "1.0", seed="token other/img 1.0", layer_sizes=(20_000,))


def secrets_of(*passwords: str, tokens: Iterable[str] = ()) -> list[str]:
    """Everything that must never appear in a log or a body: the passwords, the Basic
    header values made of them, the tokens."""
    out = []
    for password in passwords:
        out.append(password)
        out.append(base64.b64encode(f"{USER}:{password}".encode()).decode())
    out += list(tokens)
    return out


def assert_no_secret(where: str, text: str | bytes, secrets: Iterable[str]) -> None:
    data = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    for secret in secrets:
        assert secret not in data, f"a credential ({secret[:6]}...) appears in {where}"


def get(mirror: Mirror, target: str) -> Response:
    return request(mirror.url, "GET", target, headers={"Accept": ACCEPT_MANIFESTS})


# --- Basic ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_upstream(
    tmp_path_factory: pytest.TempPathFactory, integration_tools: dict[str, str]
) -> Iterator[UpstreamRegistry]:
    """A registry with htpasswd auth holding APP and APP2 (tests must not stop it)."""
    base = tmp_path_factory.mktemp("basic-upstream")
    htpasswd = write_htpasswd(base / "htpasswd", {USER: PASSWORD})
    registry = UpstreamRegistry(base / "registry", extra_config=htpasswd_config(htpasswd))
    registry.start()
    try:
        push_images(registry.url, [APP, APP2], username=USER, password=PASSWORD)
        yield registry
    finally:
        registry.stop()


@dataclass
class Setup:
    """How one credential source is configured: regmirror's config, its environment,
    and the repository prefix under which the private upstream is reached."""

    extra: dict[str, Any]
    env: dict[str, str]
    prefix: str  # "" (the default upstream) or "private.test/" or an alias
    helper: CredentialHelper | None = None


ENV_VAR = "REGMIRROR_TEST_UPSTREAM_PASSWORD"


def _setup(source: str, private: UpstreamRegistry, default_url: str, tmp_path: Path) -> Setup:
    """Credentials for the private registry from ``source``. ``inline`` is
    ``proxy.username``/``password``; ``password_file`` and ``docker_config`` configure
    an extra upstream ``private.test`` (alias ``private``) beside an anonymous default;
    the others an entry of ``regmirror.upstreams`` named like the default upstream."""
    if source == "inline":
        proxy = {"remoteurl": private.url, "username": USER, "password": PASSWORD}
        return Setup({"proxy": proxy}, {}, "")
    entry: dict[str, Any]
    env: dict[str, str] = {}
    helper = None
    if source == "password_env":
        entry, env = {"username": USER, "password_env": ENV_VAR}, {ENV_VAR: PASSWORD}
    elif source == "password_file":  # as Kubernetes and systemd mount them
        path = tmp_path / "secrets" / "upstream-password"
        path.parent.mkdir()
        path.write_text(PASSWORD + "\n")
        path.chmod(0o600)
        entry = {"username": USER, "password_file": str(path)}
    elif source == "docker_config":  # {"auth": base64(user:password)}, as docker login writes
        path = write_docker_config(tmp_path / "config.json", {private.host: (USER, PASSWORD)})
        entry = {"docker_config": str(path)}
    elif source == "docker_config_fields":  # {"username": ..., "password": ...}
        auths = {private.host: (USER, PASSWORD)}
        path = write_docker_config(tmp_path / "config.json", auths, form="fields")
        entry = {"docker_config": str(path)}
    elif source == "credential_helper":
        helper = CredentialHelper(tmp_path / "bin", USER, PASSWORD)
        entry = {"credential_helper": {"command": str(helper.path), "lifetime": "5m"}}
    else:
        raise AssertionError(source)
    if source in ("password_file", "docker_config"):
        upstream = {"name": "private.test", "aliases": ["private"], "url": private.url}
        prefix = "private.test/" if source == "password_file" else "private/"
        proxy = {"remoteurl": default_url}
    else:
        upstream, prefix, proxy = {"name": private.host}, "", {"remoteurl": private.url}
    extra = {"proxy": proxy, "regmirror": {"upstreams": [{**upstream, **entry}]}}
    return Setup(extra, env, prefix, helper)


@pytest.mark.parametrize(
    "source",
    [
        "inline",
        "password_env",
        "password_file",
        "docker_config",
        "docker_config_fields",
        "credential_helper",
    ],
)
def test_pulls_from_a_basic_auth_upstream_with_each_credential_source(
    source: str,
    basic_upstream: UpstreamRegistry,
    upstream: UpstreamRegistry,
    make_mirror: MakeMirror,
    tmp_path: Path,
) -> None:
    setup = _setup(source, basic_upstream, upstream.url, tmp_path)
    mirror = make_mirror(basic_upstream.url, extra=setup.extra, env=setup.env)
    for i, image in enumerate((APP, APP2)):
        dest = tmp_path / f"d{i}"
        skopeo_copy(f"{mirror.host}/{setup.prefix}{image.name}:{image.tag}", dest)
        verify_dir(dest, image)
    if setup.helper is not None:
        # Run once (the server named on stdin), then cached for its lifetime.
        calls = setup.helper.get_calls()
        assert len(calls) == 1, calls
        assert basic_upstream.host in calls[0]
    assert_no_secret(f"the log ({source})", mirror.log_text(), secrets_of(PASSWORD))


def test_a_basic_auth_upstream_without_or_with_wrong_credentials_is_a_clear_401(
    basic_upstream: UpstreamRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    target = f"/v2/{APP.name}/manifests/{APP.tag}"
    anonymous = make_mirror(basic_upstream.url)
    wrong = make_mirror(
        basic_upstream.url, extra={"proxy": {"username": USER, "password": WRONG_PASSWORD}}
    )
    for mirror, expected in (
        (anonymous, r"(?i)authenticat"),
        (wrong, r"(?i)credentials"),
    ):
        resp = get(mirror, target)
        error = assert_registry_error(resp, 401, "UNAUTHORIZED")
        assert re.search(expected, error["message"]), error
        assert_no_secret("the 401 body", resp.body, secrets_of(WRONG_PASSWORD))
        with pytest.raises(SkopeoError, match=r"(?i)unauthorized|401"):
            skopeo_copy(APP.ref(mirror.host), tmp_path / "d")
        blob = APP.manifest.layers[0]
        resp = request(mirror.url, "GET", f"/v2/{APP.name}/blobs/{blob.digest}")
        assert_registry_error(resp, 401, "UNAUTHORIZED")
        assert not mirror.has_blob(blob.digest)
    assert_no_secret("the log", wrong.log_text(), secrets_of(WRONG_PASSWORD))


# --- Bearer --------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenUpstream:
    tokens: TokenServer
    registry: UpstreamRegistry


@pytest.fixture(scope="module")
def token_upstream(
    tmp_path_factory: pytest.TempPathFactory, integration_tools: dict[str, str]
) -> Iterator[TokenUpstream]:
    """A registry with token auth (anonymous pulls allowed, USER may push) holding IMG,
    IMG2 and OTHER. Tests may change ``tokens.expires_in`` (restoring it) and ``reset()``
    its records; they must not stop either server."""
    base = tmp_path_factory.mktemp("token-upstream")
    with TokenServer(base / "tokens", users={USER: PASSWORD}) as tokens:
        registry = UpstreamRegistry(base / "registry", extra_config=tokens.registry_config())
        with registry:
            push_images(registry.url, [IMG, IMG2, OTHER], username=USER, password=PASSWORD)
            yield TokenUpstream(tokens, registry)


def test_bearer_tokens_are_fetched_per_scope_with_credentials_and_reused(
    token_upstream: TokenUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    tokens = token_upstream.tokens
    tokens.reset()
    with CountingProxy.to_url(token_upstream.registry.url) as proxy:
        mirror = make_mirror(proxy.url, extra={"proxy": {"username": USER, "password": PASSWORD}})
        for i, image in enumerate((IMG, IMG2, OTHER)):
            skopeo_copy(image.ref(mirror.host), tmp_path / f"d{i}")
            verify_dir(tmp_path / f"d{i}", image)
        registry_requests = proxy.requests
    # One token per repository scope, however many requests used it.
    assert tokens.count_requests("repository:owner/img:pull") == 1, tokens.requests
    assert tokens.count_requests("repository:other/img:pull") == 1, tokens.requests
    assert tokens.count_requests() <= 3, tokens.requests  # (+ one for /v2/ at most)
    # The realm is the upstream's own site: the mirror's credentials went there.
    assert {r.user for r in tokens.requests} == {USER}
    with_token = [
        r for r in registry_requests if r.headers.get("authorization", "")[:7] == "Bearer "
    ]
    assert len(with_token) >= 3 * tokens.count_requests(), registry_requests
    issued = set(tokens.tokens())
    assert {r.headers["authorization"][7:] for r in with_token} <= issued
    assert_no_secret("the log", mirror.log_text(), secrets_of(PASSWORD, tokens=issued))


def test_bearer_tokens_are_renewed_after_they_expire(
    token_upstream: TokenUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    tokens = token_upstream.tokens
    tokens.reset()
    tokens.expires_in = 2
    try:
        mirror = make_mirror(
            token_upstream.registry.url, extra={"proxy": {"username": USER, "password": PASSWORD}}
        )
        skopeo_copy(IMG.ref(mirror.host), tmp_path / "d1")
        first = tokens.count_requests("repository:owner/img:pull")
        assert first >= 1
        expiry = max(t.expires_at for t in tokens.issued)
        # (distribution would still accept the token for 60 s: only the mirror's own
        # accounting of expires_in can make it ask again)
        poll_until(lambda: time.monotonic() > expiry + 0.1, 10, what="the tokens to expire")
        skopeo_copy(IMG2.ref(mirror.host), tmp_path / "d2")
        verify_dir(tmp_path / "d2", IMG2)
        assert tokens.count_requests("repository:owner/img:pull") > first, tokens.requests
    finally:
        tokens.expires_in = 300


def test_anonymous_bearer_tokens_without_credentials(
    token_upstream: TokenUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    tokens = token_upstream.tokens
    tokens.reset()
    mirror = make_mirror(token_upstream.registry.url)
    skopeo_copy(IMG.ref(mirror.host), tmp_path / "d")
    verify_dir(tmp_path / "d", IMG)
    assert tokens.count_requests("repository:owner/img:pull") == 1, tokens.requests
    assert not any(r.had_authorization for r in tokens.requests)


def test_credentials_are_not_sent_to_a_token_realm_on_another_host(
    make_mirror: MakeMirror, tmp_path: Path, integration_tools: dict[str, str]
) -> None:
    """A registry on 127.0.0.1 whose realm is on 127.0.0.2: the mirror asks anonymously
    (and warns), as distribution learned to do in 3.1."""
    with TokenServer(tmp_path / "tokens", users={USER: PASSWORD}, host="127.0.0.2") as tokens:
        registry = UpstreamRegistry(tmp_path / "registry", extra_config=tokens.registry_config())
        with registry:
            push_images(registry.url, [IMG], username=USER, password=PASSWORD)
            tokens.reset()
            mirror = make_mirror(
                registry.url, extra={"proxy": {"username": USER, "password": PASSWORD}}
            )
            skopeo_copy(IMG.ref(mirror.host), tmp_path / "d")
            verify_dir(tmp_path / "d", IMG)
            assert tokens.count_requests("repository:owner/img:pull") >= 1
            assert not any(r.had_authorization for r in tokens.requests), tokens.requests
            log = mirror.log_text()
            warnings = [
                line for line in log.splitlines() if "realm" in line and "127.0.0.2" in line
            ]
            assert warnings, log[-3000:]
            assert_no_secret("the log", log, secrets_of(PASSWORD, tokens=tokens.tokens()))


# --- redirects -----------------------------------------------------------------------


def test_blob_redirects_are_followed_without_the_credentials(
    make_mirror: MakeMirror, tmp_path: Path, integration_tools: dict[str, str]
) -> None:
    """The registry (Basic auth) answers blob reads with a 307 to blob storage on
    another host; the mirror follows it, and that host never sees ``Authorization``."""
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {USER: PASSWORD})
    registry = UpstreamRegistry(tmp_path / "registry")
    with BlobHost(registry.root) as blob_host:
        registry.extra_config = {**htpasswd_config(htpasswd), **redirect_config(blob_host.url)}
        with registry, CountingProxy.to_url(registry.url) as proxy:
            push_images(registry.url, [APP], username=USER, password=PASSWORD)
            mirror = make_mirror(
                proxy.url, extra={"proxy": {"username": USER, "password": PASSWORD}}
            )
            skopeo_copy(APP.ref(mirror.host), tmp_path / "d")
            verify_dir(tmp_path / "d", APP)
            for blob in APP.blobs():
                assert blob_host.count_requests("GET", blob.hex) >= 1, blob.digest
                asked = [r for r in proxy.requests if r.target.endswith(blob.digest)]
                assert any(r.headers.get("authorization") for r in asked), asked
            assert blob_host.requests_with_authorization() == []
            assert_no_secret("the log", mirror.log_text(), secrets_of(PASSWORD))


# --- never shown ---------------------------------------------------------------------


def test_credentials_never_appear_in_logs_or_error_bodies(
    basic_upstream: UpstreamRegistry,
    token_upstream: TokenUpstream,
    make_mirror: MakeMirror,
    tmp_path: Path,
) -> None:
    """Debug logging, successes and every kind of failure: neither the passwords, nor
    the Basic header values, nor the tokens show up anywhere a person can read."""
    tokens = token_upstream.tokens
    tokens.reset()
    secret_file = tmp_path / "password"
    secret_file.write_text(PASSWORD)
    mirror = make_mirror(
        basic_upstream.url,
        extra={
            "proxy": {"username": USER, "password": PASSWORD},
            "regmirror": {
                "upstreams": [
                    {
                        "name": "token.test",
                        "url": token_upstream.registry.url,
                        "username": USER,
                        "password_file": str(secret_file),
                    },
                    {
                        "name": "wrong.test",
                        "url": basic_upstream.url,
                        "username": USER,
                        "password": WRONG_PASSWORD,
                    },
                    {
                        "name": "noenv.test",
                        "url": basic_upstream.url,
                        "username": USER,
                        "password_env": "REGMIRROR_TEST_UNSET_VARIABLE",
                    },
                ]
            },
        },
    )
    skopeo_copy(APP.ref(mirror.host), tmp_path / "a")
    skopeo_copy(f"{mirror.host}/token.test/{IMG.name}:{IMG.tag}", tmp_path / "b")
    bodies: list[bytes] = []
    for target in (
        "/v2/team/missing/manifests/1.0",  # 404 from the Basic upstream
        f"/v2/team/app/blobs/sha256:{'0' * 64}",
        "/v2/token.test/owner/missing/manifests/1.0",  # 404 behind a token
        f"/v2/wrong.test/{APP.name}/manifests/{APP.tag}",  # credentials refused
        f"/v2/noenv.test/{APP.name}/manifests/{APP.tag}",  # credentials missing
        f"/v2/{APP.name}/manifests/{APP.tag}?ns=nowhere.test",
    ):
        resp = get(mirror, target)
        assert resp.status >= 400, (target, resp.status)
        bodies.append(resp.body)
        assert_registry_error(resp, resp.status)
    secrets = secrets_of(PASSWORD, WRONG_PASSWORD, tokens=tokens.tokens())
    assert tokens.tokens(), "no token was issued: the token flow was not exercised"
    for body in bodies:
        assert_no_secret("an error body", body, secrets)
    assert_no_secret("the log", mirror.log_text(), secrets)
