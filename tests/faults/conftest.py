"""Fixtures of the fault suite: real processes on loopback, a fault proxy between them.

* ``fault_upstream`` (session): Debian's docker-registry, empty; tests push their own
  blobs into it with ``blobs``.
* ``fault_proxy``: a ``FaultProxy`` in front of it, fresh per test (what the mirror
  calls its upstream; it counts the requests that reach the registry).
* ``blobs(count, size)``: pushes ``count`` new random blobs, unique to the test, and
  returns them (the checker knows their bytes).
* ``start_mirror(**options)``: regmirror with a fresh store against ``fault_proxy``,
  stopped by PID at teardown. Its ``extra`` merges into the suite's defaults
  (``FAST``: timeouts of a second or two, so that faults show in CI time).

When a test fails, the tails of the logs of the mirrors still running go in its report.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.images import Blob, make_blob, push_blob
from tests.support.merge import deep_merge
from tests.support.mirror import Mirror
from tests.support.process import require_tool
from tests.support.upstream import UpstreamRegistry

HERE = Path(__file__).resolve().parent

# Short timeouts: a black hole costs seconds, not fifteen (yet a loaded CI machine
# does not trip them on a healthy upstream); the breaker opens late and cools down
# fast, so that the faults themselves are what a client meets.
FAST: dict[str, Any] = {
    "regmirror": {
        "upstream_connect_timeout": 2,
        "upstream_header_timeout": 4,
        "upstream_read_timeout": 5,
        "upstream_failures": 1000,
        "upstream_cooldown": 1,
        "fsync": False,
        "access_log": False,
    }
}

_LIVE: list[Mirror] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when in ("call", "setup") and item.path.is_relative_to(HERE):
        for mirror in list(_LIVE):
            report.sections.append((f"regmirror {mirror.url} (log tail)", mirror.log_tail(40)))
    return report


@pytest.fixture(scope="session")
def fault_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamRegistry]:
    require_tool("docker-registry")
    registry = UpstreamRegistry(tmp_path_factory.mktemp("fault-upstream"))
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()


@pytest.fixture
def fault_proxy(fault_upstream: UpstreamRegistry) -> Iterator[FaultProxy]:
    proxy = FaultProxy(fault_upstream.url)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def unique_token(request: pytest.FixtureRequest) -> str:
    """A repository-name-safe token unique to the requesting test."""
    return re.sub(r"[^a-z0-9]+", "-", request.node.nodeid.lower())[-50:].strip("-")


Blobs = Callable[..., tuple[str, list[Blob]]]


@pytest.fixture
def blobs(fault_upstream: UpstreamRegistry, request: pytest.FixtureRequest) -> Blobs:
    """``blobs(count, size)``: ``(repository, [Blob...])``, new random blobs pushed into
    a repository of the upstream that only this call uses."""
    token = unique_token(request)
    calls = 0

    def make(count: int, size: int) -> tuple[str, list[Blob]]:
        nonlocal calls
        calls += 1
        name = f"faults/{token}/r{calls}"
        made = [make_blob(f"{request.node.nodeid}#{calls}.{i}", size) for i in range(count)]
        for blob in made:
            push_blob(fault_upstream.url, name, blob)
        return name, made

    return make


StartMirror = Callable[..., Mirror]


@pytest.fixture
def start_mirror(
    fault_proxy: FaultProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartMirror]:
    created: list[Mirror] = []

    def start(
        *, extra: dict[str, Any] | None = None, base_dir: Path | None = None, **kwargs: Any
    ) -> Mirror:
        mirror = Mirror(
            base_dir or tmp_path_factory.mktemp("fault-mirror"),
            fault_proxy.url,
            log_level="info",
            extra=deep_merge(copy.deepcopy(FAST), extra or {}),
            **kwargs,
        )
        created.append(mirror)
        _LIVE.append(mirror)
        mirror.start()
        return mirror

    try:
        yield start
    finally:
        for mirror in reversed(created):
            try:
                mirror.stop()
            finally:
                _LIVE.remove(mirror)


def crashed(mirror: Mirror) -> int:
    """1 if the mirror's process is gone without having been told to stop, else 0."""
    return 0 if mirror.running else 1


def stored_blob_files(mirror: Mirror) -> list[Path]:
    blobs_dir = mirror.root / "blobs"
    if not blobs_dir.exists():
        return []
    return sorted(p for p in blobs_dir.rglob("*") if p.is_file())


def check_store(mirror: Mirror) -> list[str]:
    """Every file under ``blobs/`` that does not hash to its name (must be none)."""
    bad = []
    for path in stored_blob_files(mirror):
        if path.suffix == ".type":
            continue
        digest = f"{path.parent.parent.name}:{path.name}"
        if mirror.blob_sha256(digest) != digest:
            bad.append(digest)
    return bad
