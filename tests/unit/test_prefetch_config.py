"""``regmirror.prefetch``, ``prefetch_reserve`` and ``prefetch_concurrency``: parsed
and checked at start-up, one line naming the file and the key when wrong."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from regmirror.config import SCHEMA, ConfigError, PrefetchPolicy, Reserve, parse_config
from regmirror.config.prefetch import POLICY_KEYS

ROOT = Path(__file__).resolve().parents[2]


def config(regmirror: dict[str, Any], **top: Any) -> Any:
    return parse_config({**top, "regmirror": regmirror}, "mirror.yml")[0]


def test_the_issue_s_example_policy() -> None:
    c = config(
        {
            "prefetch": [
                {
                    "upstream": "docker.io",
                    "repositories": ["library/alpine", "myorg/*"],
                    "tags": ["3.*", "latest"],
                    "exclude": ["*-rc*"],
                    "interval": "15m",
                    "platforms": ["linux/amd64"],
                }
            ]
        }
    )
    assert c.prefetch == (
        PrefetchPolicy(
            name="docker.io/library/alpine",
            upstream="docker.io",
            repositories=("library/alpine", "myorg/*"),
            tags=("3.*", "latest"),
            exclude=("*-rc*",),
            interval=900.0,
            platforms=("linux/amd64",),
        ),
    )


def test_defaults() -> None:
    c = config({"prefetch": [{"repositories": ["alpine"]}]})
    (p,) = c.prefetch
    assert (p.upstream, p.tags, p.exclude, p.interval, p.platforms, p.reserve) == (
        "docker.io", ("latest",), (), 900.0, (), None
    )  # fmt: skip
    assert c.prefetch_reserve == Reserve(20.0, percent=True)
    assert c.prefetch_concurrency == 3
    assert parse_config({})[0].prefetch == ()


def test_an_alias_names_its_upstream_and_reserves_take_counts_or_shares() -> None:
    c = config(
        {
            "upstreams": [{"name": "ghcr.io", "url": "https://ghcr.io", "aliases": ["ghcr"]}],
            "prefetch": [
                {"name": "tools", "upstream": "ghcr", "repositories": ["o/i"], "reserve": 50},
                {"repositories": ["o/i"], "reserve": "10%"},
            ],
            "prefetch_reserve": 30,
        }
    )
    assert [p.upstream for p in c.prefetch] == ["ghcr.io", "docker.io"]
    assert [p.reserve for p in c.prefetch] == [Reserve(50, percent=False), Reserve(10.0)]
    assert c.prefetch_reserve == Reserve(30, percent=False)
    assert Reserve(10.0).requests(200) == 20 and Reserve(30, percent=False).requests(None) == 30


def test_two_policies_on_one_repository_get_distinct_names() -> None:
    c = config({"prefetch": [{"repositories": ["a/b"]}, {"repositories": ["a/b"]}]})
    assert [p.name for p in c.prefetch] == ["docker.io/a/b", "docker.io/a/b#1"]


@pytest.mark.parametrize(
    ("regmirror", "message"),
    [
        ({"prefetch": {"repositories": ["a"]}}, "regmirror.prefetch: expected a list"),
        ({"prefetch": [{"tags": ["x"]}]}, "regmirror.prefetch:[0].repositories: a policy"),
        ({"prefetch": [{"repositories": []}]}, "regmirror.prefetch:[0].repositories: a policy"),
        ({"prefetch": [{"repositories": ["Bad"]}]}, "regmirror.prefetch:[0].repositories: "),
        ({"prefetch": [{"repositories": ["a"], "tags": []}]}, "regmirror.prefetch:[0].tags: "),
        ({"prefetch": [{"repositories": ["a"], "tags": ["a b"]}]}, "[0].tags: expected a tag"),
        ({"prefetch": [{"repositories": ["a"], "exclude": "-x"}]}, "[0].exclude: expected a"),
        ({"prefetch": [{"repositories": ["a"], "interval": "0"}]}, "[0].interval: the interval"),
        ({"prefetch": [{"repositories": ["a"], "interval": "soon"}]}, "[0].interval: expected"),
        ({"prefetch": [{"repositories": ["a"], "platforms": ["amd64"]}]}, "[0].platforms: "),
        ({"prefetch": [{"repositories": ["a"], "reserve": "120%"}]}, "[0].reserve: expected"),
        ({"prefetch": [{"repositories": ["a"], "every": "1m"}]}, "[0].every: unknown key"),
        ({"prefetch": [{"repositories": ["a"], "upstream": "quay.io"}]}, "[0].upstream: no "),
        (
            {
                "prefetch": [
                    {"name": "x", "repositories": ["a"]},
                    {"name": "x", "repositories": ["b"]},
                ]
            },
            "regmirror.prefetch:[1].name: the name x is used twice",
        ),
        ({"prefetch_reserve": -1}, "regmirror.prefetch_reserve: expected a count"),
        ({"prefetch_concurrency": 0}, "regmirror.prefetch_concurrency: expected a positive"),
    ],
)
def test_a_wrong_policy_stops_start_up_with_the_file_and_the_key(
    regmirror: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        config(regmirror)
    text = str(raised.value)
    assert text.startswith("mirror.yml: ") and message in text
    assert "\n" not in text


def test_every_prefetch_key_is_documented_in_the_readme_and_etc_config() -> None:
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "etc" / "config.yml").read_text()
    keys = [k for k in SCHEMA if k.startswith("regmirror.prefetch")]
    assert len(keys) == 3
    for key in keys:
        assert f"| `{key}` |" in readme, key
        assert f"\n  {key.split('.')[1]}: " in example, key
    for key in POLICY_KEYS:
        assert f"| `{key}` |" in readme, key
        assert re.search(rf"^  #   {key} ", example, re.M), key
