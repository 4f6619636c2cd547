"""Fixtures for integration tests: a real upstream registry, real twistd, real skopeo.

* ``upstream`` (session): Debian's docker-registry with the standard images pushed once
  (``standard_images``: ``schema2`` library/alpine:3.19 (+ ``latest``), ``oci``
  team/app/server:1.0, ``index`` multi/arch:latest (OCI index, linux/amd64 + arm64),
  ``docker_list`` multi/dockerlist:latest (Docker manifest list)). Tests must not
  change what is pushed there; they push their own repositories when they need to.
* ``make_upstream``: private upstream registries (a test may stop or change them).
* ``upstream_proxy``: a ``CountingProxy`` in front of the session upstream, fresh per test.
* ``mirror``: regmirror with a fresh store, pointed at ``upstream_proxy``.
* ``make_mirror``: more mirrors, with any upstream URL, ``tag_freshness``, ``extra``
  or ``env`` (added to its environment).
* ``fresh_blob``: pushes a new random blob (unique to the test) into the session upstream.

Everything started here is stopped by PID at teardown, also when the test fails. A
missing docker-registry or skopeo is a failure, not a skip. When a test fails, the tails
of the logs of the servers still running are added to its report.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.support.images import Blob, Image, make_blob, push_blob, push_images, standard_images
from tests.support.mirror import Mirror
from tests.support.process import require_tool
from tests.support.proxy import CountingProxy
from tests.support.upstream import UpstreamRegistry

HERE = Path(__file__).resolve().parent

# Servers running right now, whose log tails go into the report of a failing test.
_LIVE: list[Mirror | UpstreamRegistry] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when in ("call", "setup") and item.path.is_relative_to(HERE):
        for server in list(_LIVE):
            if isinstance(server, Mirror):
                title, text = f"regmirror {server.url} (log tail)", server.log_tail(40)
            else:  # distribution's lines are long and mostly noise: a few suffice
                title, text = f"upstream registry {server.url} (log tail)", server.log_tail(8)
            report.sections.append((title, text))
    return report


@pytest.fixture(scope="session")
def integration_tools() -> dict[str, str]:
    """Paths of the programs the integration tests need; raises (fails) if one is missing."""
    return {name: require_tool(name) for name in ("docker-registry", "skopeo")}


def _unique(request: pytest.FixtureRequest) -> str:
    """A repository-name-safe token unique to the requesting test."""
    return re.sub(r"[^a-z0-9]+", "-", request.node.nodeid.lower())[-60:].strip("-")


def _start_upstream(base_dir: Path, push: bool) -> tuple[UpstreamRegistry, dict[str, Image]]:
    registry = UpstreamRegistry(base_dir)
    registry.start()
    _LIVE.append(registry)
    images = standard_images()
    if push:
        try:
            push_images(registry.url, images.values())
        except BaseException:
            _stop(registry)
            raise
    return registry, images


def _stop(server: Mirror | UpstreamRegistry) -> None:
    try:
        server.stop()
    finally:
        if server in _LIVE:
            _LIVE.remove(server)


@pytest.fixture(scope="session")
def _session_upstream(
    tmp_path_factory: pytest.TempPathFactory, integration_tools: dict[str, str]
) -> Iterator[tuple[UpstreamRegistry, dict[str, Image]]]:
    registry, images = _start_upstream(tmp_path_factory.mktemp("upstream"), push=True)
    try:
        yield registry, images
    finally:
        _stop(registry)


@pytest.fixture(scope="session")
def upstream(_session_upstream: tuple[UpstreamRegistry, dict[str, Image]]) -> UpstreamRegistry:
    """The shared upstream registry, standard images pushed. Do not stop it."""
    return _session_upstream[0]


@pytest.fixture(scope="session")
def images(_session_upstream: tuple[UpstreamRegistry, dict[str, Image]]) -> dict[str, Image]:
    """The standard images, as pushed to ``upstream`` (and to ``make_upstream()``)."""
    return _session_upstream[1]


class MakeUpstream(Protocol):
    def __call__(self, *, push_standard_images: bool = True) -> UpstreamRegistry: ...


@pytest.fixture
def make_upstream(
    tmp_path_factory: pytest.TempPathFactory, integration_tools: dict[str, str]
) -> Iterator[MakeUpstream]:
    """Start a private upstream registry (standard images pushed unless told otherwise)."""
    started: list[UpstreamRegistry] = []

    def make(*, push_standard_images: bool = True) -> UpstreamRegistry:
        registry, _ = _start_upstream(
            tmp_path_factory.mktemp("private-upstream"), push=push_standard_images
        )
        started.append(registry)
        return registry

    try:
        yield make
    finally:
        for registry in reversed(started):
            _stop(registry)


@pytest.fixture
def upstream_proxy(upstream: UpstreamRegistry) -> Iterator[CountingProxy]:
    """A counting proxy in front of the session upstream, for this test only."""
    proxy = CountingProxy.to_url(upstream.url)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@contextlib.contextmanager
def running_mirror(
    base_dir: Path,
    upstream_url: str,
    *,
    tag_freshness: str | float = "30s",
    extra: dict[str, Any] | None = None,
) -> Iterator[Mirror]:
    """A started regmirror for any fixture scope; stopped (by PID) on exit."""
    mirror = Mirror(base_dir, upstream_url, tag_freshness=tag_freshness, extra=extra)
    _LIVE.append(mirror)
    try:
        mirror.start()
        yield mirror
    finally:
        _stop(mirror)


class MakeMirror(Protocol):
    def __call__(
        self,
        upstream_url: str,
        *,
        tag_freshness: str | float = "30s",
        extra: dict[str, Any] | None = None,
        start: bool = True,
        env: dict[str, str] | None = None,
    ) -> Mirror: ...


@pytest.fixture
def make_mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeMirror]:
    """Start regmirror (fresh store) against ``upstream_url``; stopped at teardown."""
    created: list[Mirror] = []

    def make(
        upstream_url: str,
        *,
        tag_freshness: str | float = "30s",
        extra: dict[str, Any] | None = None,
        start: bool = True,
        env: dict[str, str] | None = None,
    ) -> Mirror:
        mirror = Mirror(
            tmp_path_factory.mktemp("mirror"),
            upstream_url,
            tag_freshness=tag_freshness,
            extra=extra,
            env=env,
        )
        created.append(mirror)
        _LIVE.append(mirror)
        if start:
            mirror.start()
        return mirror

    try:
        yield make
    finally:
        for mirror in reversed(created):
            _stop(mirror)


@pytest.fixture
def mirror(upstream_proxy: CountingProxy, make_mirror: MakeMirror) -> Mirror:
    """regmirror with an empty store, fetching from the session upstream through
    ``upstream_proxy`` (so the test can count what it fetched). The mirror is stopped
    before the proxy."""
    return make_mirror(upstream_proxy.url)


@pytest.fixture
def fresh_blob(
    upstream: UpstreamRegistry, request: pytest.FixtureRequest
) -> Callable[[int], tuple[str, Blob]]:
    """``fresh_blob(size)`` pushes ``size`` new random bytes into a repository of the
    session upstream that only this test uses; returns ``(repository, blob)``."""
    token = _unique(request)
    count = 0

    def make(size: int) -> tuple[str, Blob]:
        nonlocal count
        count += 1
        name = f"fresh/{token}/b{count}"
        blob = make_blob(f"{request.node.nodeid}#{count}", size)
        push_blob(upstream.url, name, blob)
        return name, blob

    return make
