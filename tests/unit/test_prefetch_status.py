"""Prefetch policies: what they match (pure code), the budget, and what they report
(status() and the metrics), on the harness of test_prefetch."""

from __future__ import annotations

import json
from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest

from regmirror.api.metrics import MirrorCollector
from regmirror.api.prefetch_metrics import PrefetchCollector
from regmirror.config import Reserve
from regmirror.mirror.prefetch.matching import budget, platform_matches, select_tags
from tests.unit.test_prefetch import INTERVAL, Env, env, policy

__all__ = ["env"]  # the fixture


def test_a_share_reserve_is_taken_of_the_upstream_limit() -> None:
    assert budget("20;w=21600", "100;w=21600", Reserve(20.0)).exhausted
    assert not budget("21;w=21600", "100;w=21600", Reserve(20.0)).exhausted
    assert budget("39", "200", Reserve(20.0)).reserve == 40
    assert budget("5", None, Reserve(5, percent=False)).exhausted
    # No rate limit seen (not Docker Hub), or a share of an unknown limit: no pause.
    assert not budget(None, None, Reserve(5, percent=False)).exhausted
    assert not budget("1", None, Reserve(20.0)).exhausted


# -- matching, status, metrics -------------------------------------------------------------


def test_tags_are_selected_by_pattern_less_the_excluded() -> None:
    listed = ["3.18", "3.19", "3.19-rc1", "3.2", "latest", "edge", "13.0"]
    assert select_tags(listed, ["3.*", "latest"], ["*-rc*"]) == ["3.18", "3.19", "3.2", "latest"]
    assert select_tags(listed, ["3.1?"], []) == ["3.18", "3.19"]
    assert select_tags(listed, ["*"], ["3.*", "1*"]) == ["latest", "edge"]


def test_platforms_match_with_or_without_a_variant() -> None:
    arm = {"os": "linux", "architecture": "arm64", "variant": "v8"}
    assert platform_matches(arm, ["linux/arm64"])
    assert platform_matches(arm, ["linux/arm64/v8"])
    assert not platform_matches(arm, ["linux/arm64/v9", "linux/amd64"])
    assert not platform_matches({"os": "unknown", "architecture": "unknown"}, ["linux/amd64"])
    assert platform_matches(None, [])


def test_status_is_json_with_each_policy_s_last_and_next_run(env: Env) -> None:
    _, blobs = env.image("team/app", "1.0", "a")
    env.registry.tag_lists["team/app"] = ["1.0"]
    env.clock.advance(1000)
    env.start(policy())
    assert env.service is not None
    status = json.loads(json.dumps(env.service.status()))
    (one,) = status["policies"]
    assert one["name"] == "p" and one["state"] == "idle" and one["upstream"] == "up"
    assert one["next_run"] == 1000 + INTERVAL
    assert one["last_run"]["started"] == 1000 and one["last_run"]["outcome"] == "ok"
    assert one["last_run"]["tags_matched"] == 1 and one["last_run"]["blobs_fetched"] == 3
    assert one["last_run"]["bytes_fetched"] == sum(len(env.registry.blobs[d]) for d in blobs)
    assert one["current_run"] is None and one["last_ok"] == 1000
    assert one["budget"] == {"remaining": None, "limit": None, "reserve": None}
    assert one["totals"]["runs"] == 1


def test_metrics_count_each_policy_s_runs_and_fetches(env: Env) -> None:
    _, blobs = env.image("team/app", "1.0", "a")
    env.registry.tag_lists["team/app"] = ["1.0"]
    env.start(policy())
    env.advance(INTERVAL)
    assert env.service is not None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrefetchCollector(env.service))
    text = generate_latest(registry).decode()
    size = sum(len(env.registry.blobs[d]) for d in blobs)
    assert 'regmirror_prefetch_runs_total{outcome="ok",policy="p"} 2.0' in text
    assert 'regmirror_prefetch_blobs_fetched_total{policy="p"} 3.0' in text
    assert f'regmirror_prefetch_bytes_fetched_total{{policy="p"}} {float(size)}' in text
    assert 'regmirror_prefetch_tags_checked_total{policy="p"} 2.0' in text
    assert 'regmirror_prefetch_tags_changed_total{policy="p"} 1.0' in text
    assert 'regmirror_prefetch_paused{policy="p"} 0.0' in text
    assert 'regmirror_prefetch_failures_total{policy="p"} 0.0' in text


def test_the_upstream_s_rate_limit_and_its_remaining_are_exported(env: Env) -> None:
    env.image("team/app", "1.0", "a")
    env.registry.tag_lists["team/app"] = ["1.0"]
    env.registry.ratelimit = (80, 100)
    env.start(policy())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MirrorCollector(env.mirrors, None, Counter()))
    text = generate_latest(registry).decode()
    assert 'regmirror_upstream_ratelimit_limit{upstream="up"} 100.0' in text
    assert 'regmirror_upstream_ratelimit_remaining{upstream="up"} 79.0' in text  # one GET
