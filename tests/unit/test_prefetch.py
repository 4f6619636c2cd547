"""Prefetch policies on a clock: the mirror's Cache over an in-memory upstream
(regmirror.testing.FakeRegistry behind StubTreq), the PrefetchService's loops driven by
task.Clock."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from regmirror.config import PrefetchPolicy, Reserve, UpstreamConfig
from regmirror.domain.digest import Digest
from regmirror.domain.media import ANY
from regmirror.fetch.inflight import LocalInFlight
from regmirror.mirror.cache import Cache
from regmirror.mirror.manifests import ManifestLRU
from regmirror.mirror.mirrors import Mirrors
from regmirror.mirror.prefetch import PolicyRunner, PrefetchService
from regmirror.storage.store import Store
from regmirror.testing import FakeRegistry
from regmirror.upstream.client import Upstream
from regmirror.upstream.remote import RemoteRegistry

OCI = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
INTERVAL = 60.0
SHARE = Reserve(20.0)


class _InlinePool:
    """A thread pool that runs the work at once (the store's directory walks)."""

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, object], None], f: Callable[..., Any], *a: Any
    ) -> None:
        try:
            result = f(*a)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class Reactor(Clock):
    def getThreadPool(self) -> Any:
        return _InlinePool()

    def callFromThread(self, f: Callable[..., Any], *args: object, **kwargs: object) -> None:
        f(*args, **kwargs)


class Env:
    """One upstream ("up", or Docker Hub with ``hub``), its cache, and a prefetch
    service over it."""

    def __init__(self, tmp_path: Path, *, hub: bool = False, freshness: float = 30.0) -> None:
        self.clock = Reactor()
        self.registry = FakeRegistry()
        self.stub = StubTreq(self.registry)
        name = "docker.io" if hub else "up"
        config = UpstreamConfig(name=name, url="http://upstream.test", username="",
                                password="", docker_hub=hub)  # fmt: skip
        self.store = Store(tmp_path)
        self.store.prepare()
        remote = RemoteRegistry(
            Upstream(self.clock, config, client=self.stub),  # type: ignore[arg-type]
            self.clock,
        )
        self.cache = Cache(
            self.clock,
            self.store,
            remote,
            inflight=LocalInFlight(),
            lru=ManifestLRU(),
            tag_freshness=freshness,
            fsync=False,
        )
        self.mirrors = Mirrors([self.cache])
        self.service: PrefetchService | None = None

    def start(self, *policies: PrefetchPolicy, reserve: Reserve = SHARE) -> None:
        self.service = PrefetchService(
            self.clock, self.mirrors, policies, reserve=reserve, concurrency=2
        )
        self.service.startService()
        self.pump()

    @property
    def runner(self) -> PolicyRunner:
        assert self.service is not None
        return self.service.runners[0]

    def pump(self) -> None:
        for _ in range(50):
            self.stub.flush()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.pump()

    def stop(self) -> None:
        if self.service is not None:
            self.service.stopService()

    # -- upstream content ------------------------------------------------------------

    def image(
        self, name: str, tag: str | None, seed: str, layers: int = 2
    ) -> tuple[str, list[str]]:
        """An OCI image of ``layers`` layers (and a config) under ``tag``; its digest and
        its blobs."""
        blobs = [
            self.registry.add_blob(f"{seed}/blob{i}".encode() * 100) for i in range(layers + 1)
        ]
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": blobs[0], "size": 1},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": d, "size": 1} for d in blobs[1:]],
        }  # fmt: skip
        data = json.dumps(doc).encode()
        return self.registry.add_manifest(name, tag, data, OCI), blobs

    def index(self, name: str, tag: str, seed: str) -> dict[str, tuple[str, list[str]]]:
        """An OCI index of linux/amd64 and linux/arm64/v8 images, by platform."""
        children = {
            platform: self.image(name, None, f"{seed}/{platform}")
            for platform in ("linux/amd64", "linux/arm64/v8")
        }
        entries = []
        for platform, (digest, _) in children.items():
            os_, arch, *variant = platform.split("/")
            spec = {"os": os_, "architecture": arch, **({"variant": variant[0]} if variant else {})}
            entries.append({"mediaType": OCI, "digest": digest, "size": 1, "platform": spec})
        data = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": entries}).encode()
        self.registry.add_manifest(name, tag, data, INDEX)
        return children

    def has_blob(self, digest: str) -> bool:
        return self.cache.has_blob(Digest.parse(digest))

    def blob_gets(self, digest: str) -> int:
        return self.registry.requests[("GET", f"/v2/{self.path_name}/blobs/{digest}")]

    path_name = "team/app"


def policy(**kwargs: Any) -> PrefetchPolicy:
    values: dict[str, Any] = {
        "name": "p",
        "upstream": "up",
        "repositories": ("team/app",),
        "tags": ("1.*",),
        "interval": INTERVAL,
    }
    values.update(kwargs)
    return PrefetchPolicy(**values)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.stop()


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def logged(events: list[dict[str, Any]], what: str) -> int:
    return sum(
        1
        for e in events
        if e.get("log_namespace", "").startswith("regmirror.mirror.prefetch")
        and e.get("what") == what
    )


# -- the schedule --------------------------------------------------------------------


def test_matching_tags_are_fetched_at_start_and_excluded_ones_never(env: Env) -> None:
    _, blobs10 = env.image("team/app", "1.0", "a")
    _, blobs11 = env.image("team/app", "1.1", "b")
    _, blobs_rc = env.image("team/app", "1.2-rc1", "c")
    _, blobs20 = env.image("team/app", "2.0", "d")
    env.registry.tag_lists["team/app"] = ["1.0", "1.1", "1.2-rc1", "2.0"]
    env.start(policy(exclude=("*-rc*",)))
    for digest in blobs10 + blobs11:
        assert env.blob_gets(digest) == 1
        assert env.has_blob(digest)  # committed, verified
    for digest in blobs_rc + blobs20:
        assert env.blob_gets(digest) == 0
    assert env.registry.count("GET", "/manifests/1.2-rc1") == 0
    assert env.registry.count("GET", "/manifests/2.0") == 0
    last = env.runner.last
    assert last is not None and last.outcome == "ok"
    assert (last.tags_matched, last.tags_checked, last.tags_changed) == (2, 2, 2)
    assert last.blobs_fetched == 6 and last.manifests_fetched == 2


def test_the_next_run_comes_one_interval_later_and_fetches_nothing_cached(env: Env) -> None:
    _, blobs = env.image("team/app", "1.0", "a")
    env.registry.tag_lists["team/app"] = ["1.0"]
    env.start(policy())
    assert env.registry.count("GET", "/tags/list") == 1
    assert env.runner.next_run == INTERVAL
    env.advance(INTERVAL - 1)
    assert env.registry.count("GET", "/tags/list") == 1
    env.advance(1)
    assert env.registry.count("GET", "/tags/list") == 2
    # Past its freshness window the tag was revalidated with one HEAD, and nothing
    # else went upstream: the same digest, its blobs cached.
    assert env.registry.count("HEAD", "/manifests/1.0") == 1
    assert env.registry.count("GET", "/manifests/") == 1
    assert all(env.blob_gets(d) == 1 for d in blobs)
    last = env.runner.last
    assert last is not None and (last.tags_changed, last.blobs_fetched) == (0, 0)
    assert env.runner.totals["runs"] == 2


def test_a_new_digest_under_a_tag_fetches_only_the_changed_content(env: Env) -> None:
    _, old = env.image("team/app", "1.0", "a", layers=2)
    env.registry.tag_lists["team/app"] = ["1.0"]
    env.start(policy())
    # The new image shares its config and first layer with the old one.
    shared = old[:2]
    new_layer = env.registry.add_blob(b"new layer" * 100)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": shared[0], "size": 1},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d,
                    "size": 1} for d in (shared[1], new_layer)],
    }  # fmt: skip
    new = env.registry.add_manifest("team/app", "1.0", json.dumps(doc).encode(), OCI)
    env.advance(INTERVAL)
    assert env.blob_gets(new_layer) == 1
    assert all(env.blob_gets(d) == 1 for d in old)
    manifest = env.cache.cached_tag("team/app", "1.0", ANY)
    assert manifest is not None and str(manifest.digest) == new
    last = env.runner.last
    assert last is not None and (last.tags_changed, last.blobs_fetched) == (1, 1)


def test_an_index_is_walked_for_the_policy_platforms_only(env: Env) -> None:
    children = env.index("team/app", "1.0", "idx")
    env.registry.tag_lists["team/app"] = ["1.0"]
    env.start(policy(platforms=("linux/amd64",)))
    amd64, amd64_blobs = children["linux/amd64"]
    arm64, arm64_blobs = children["linux/arm64/v8"]
    assert env.registry.count("GET", f"/manifests/{amd64}") == 1
    assert env.registry.count("GET", f"/manifests/{arm64}") == 0
    assert all(env.blob_gets(d) == 1 for d in amd64_blobs)
    assert all(env.blob_gets(d) == 0 for d in arm64_blobs)
    last = env.runner.last
    assert last is not None and last.manifests_fetched == 2  # the index and one child


def test_no_platforms_means_every_platform(env: Env) -> None:
    children = env.index("team/app", "1.0", "idx")
    env.registry.tag_lists["team/app"] = ["1.0"]
    env.start(policy())
    for _, blobs in children.values():
        assert all(env.blob_gets(d) == 1 for d in blobs)


def test_named_tags_are_not_listed(env: Env) -> None:
    _, blobs = env.image("team/app", "latest", "a")
    env.start(policy(tags=("latest", "missing")))
    assert env.registry.count("GET", "/tags/list") == 0
    assert all(env.blob_gets(d) == 1 for d in blobs)
    last = env.runner.last
    assert last is not None and last.failures == 1  # "missing": unknown upstream
    assert last.outcome == "failed"


def test_a_pattern_repository_matches_the_repositories_already_cached(env: Env) -> None:
    for name in ("team/app", "team/other", "team/never-pulled", "solo/x"):
        env.image(name, "1.0", name)
        env.registry.tag_lists[name] = ["1.0"]
    for name in ("team/app", "team/other", "solo/x"):  # pulled by a client before
        Deferred.fromCoroutine(env.cache.manifest(name, "1.0", ANY))
    env.pump()
    env.start(policy(repositories=("team/*",)))
    assert env.registry.count("GET", "/v2/team/app/tags/list") == 1
    assert env.registry.count("GET", "/v2/team/other/tags/list") == 1
    assert env.registry.count("GET", "/v2/team/never-pulled/") == 0
    assert env.registry.count("GET", "/v2/solo/x/tags/list") == 0
    assert env.registry.count("GET", "/v2/team/other/blobs/") == 3


def test_docker_hub_official_names_get_library(tmp_path: Path) -> None:
    env = Env(tmp_path, hub=True)
    try:
        _, blobs = env.image("library/alpine", "latest", "a")
        env.start(policy(upstream="docker.io", repositories=("alpine",), tags=("latest",)))
        assert all(
            env.registry.requests[("GET", f"/v2/library/alpine/blobs/{d}")] == 1 for d in blobs
        )
    finally:
        env.stop()


# -- failures never stop the loop ------------------------------------------------------


def test_a_failing_blob_is_counted_and_the_other_tags_are_still_warmed(env: Env) -> None:
    _, bad = env.image("team/app", "1.0", "a")
    _, good = env.image("team/app", "1.1", "b")
    env.registry.tag_lists["team/app"] = ["1.0", "1.1"]
    env.registry.served_blobs[bad[1]] = b"not these bytes" * 100  # a digest mismatch
    env.start(policy())
    assert not env.has_blob(bad[1])
    assert all(env.has_blob(d) for d in good)
    last = env.runner.last
    assert last is not None and last.outcome == "failed" and last.failures == 1
    del env.registry.served_blobs[bad[1]]
    env.advance(INTERVAL)
    assert env.has_blob(bad[1])
    assert env.runner.last is not None and env.runner.last.outcome == "ok"


def test_an_upstream_down_fails_the_run_and_the_next_one_still_comes(env: Env) -> None:
    env.image("team/app", "1.0", "a")
    env.registry.tag_lists["team/app"] = ["1.0"]
    env.registry.down = True
    env.start(policy())
    assert env.runner.last is not None and env.runner.last.outcome == "failed"
    env.registry.down = False
    env.advance(INTERVAL)
    assert env.runner.last is not None and env.runner.last.outcome == "ok"


def test_a_run_that_raises_is_logged_and_the_loop_goes_on(
    env: Env, events: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    env.image("team/app", "1.0", "a")
    env.registry.tag_lists["team/app"] = ["1.0"]
    service = PrefetchService(env.clock, env.mirrors, [policy()], reserve=Reserve(20.0))
    env.service = service

    async def broken() -> list[str]:
        raise RuntimeError("boom")

    monkeypatch.setattr(env.runner, "_repositories", broken)
    service.startService()
    env.pump()
    assert env.runner.last is not None and env.runner.last.outcome == "error"
    assert any(e.get("log_failure") is not None for e in events)
    monkeypatch.undo()
    env.advance(INTERVAL)
    assert env.runner.last is not None and env.runner.last.outcome == "ok"
    assert env.runner.totals["runs"] == 2 and env.runner.state == "idle"


# -- the rate-limit budget -------------------------------------------------------------


def test_prefetching_pauses_at_the_reserve_and_resumes_above_it(
    env: Env, events: list[dict[str, Any]]
) -> None:
    for tag in ("1.0", "1.1", "1.2"):
        env.image("team/app", tag, tag)
    env.registry.tag_lists["team/app"] = ["1.0", "1.1", "1.2"]
    env.registry.ratelimit = (5, 100)  # each manifest GET takes one
    env.start(policy(), reserve=Reserve(3, percent=False))
    # 5 left: 1.0 (-> 4), 1.1 (-> 3), then 3 is the reserve: 1.2 waits.
    assert env.registry.count("GET", "/manifests/1.2") == 0
    assert env.runner.paused and env.runner.state == "paused"
    assert env.runner.last is not None and env.runner.last.outcome == "paused"
    assert logged(events, "paused") == 1
    env.advance(INTERVAL)  # still at the reserve: one HEAD, no GET
    assert env.registry.count("GET", "/manifests/1.2") == 0
    assert env.registry.count("HEAD", "/manifests/") == 1
    assert logged(events, "paused") == 1 and logged(events, "resumed") == 0
    env.registry.ratelimit = (100, 100)  # the window passed
    env.advance(INTERVAL)
    assert env.registry.count("GET", "/manifests/1.2") == 1
    assert not env.runner.paused and env.runner.last.outcome == "ok"
    assert logged(events, "resumed") == 1 and logged(events, "paused") == 1
    assert env.runner.totals["pauses"] == 1 and env.runner.totals["runs_paused"] == 2
