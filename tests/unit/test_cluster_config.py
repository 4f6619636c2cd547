"""regmirror.cluster: the Redis URL, the key prefix and the lease, checked at start-up
with one line naming the key; without it, no cluster at all."""

from __future__ import annotations

import pytest

from regmirror.app.cluster import replica_name
from regmirror.config import ConfigError, parse_config
from regmirror.config.model import RedisAddress


def cluster(**keys: object) -> dict[str, object]:
    return {"regmirror": {"cluster": keys}}


def test_without_a_redis_url_there_is_no_cluster() -> None:
    assert parse_config({})[0].cluster is None
    assert parse_config(cluster(name="other"))[0].cluster is None


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://127.0.0.1", RedisAddress("127.0.0.1")),
        ("redis://redis.internal:6380/2", RedisAddress("redis.internal", 6380, 2)),
        ("redis://:s%40cret@h/1", RedisAddress("h", 6379, 1, None, "s@cret")),
        ("rediss://mirror:pw@h:6390", RedisAddress("h", 6390, 0, "mirror", "pw", tls=True)),
    ],
)
def test_redis_urls_say_host_port_db_credentials_and_tls(url: str, address: RedisAddress) -> None:
    config = parse_config(cluster(redis=url))[0]
    assert config.cluster is not None
    assert config.cluster.redis == address
    assert config.cluster.name == "regmirror" and config.cluster.lease == 15.0
    assert "s@cret" not in repr(config.cluster) and "pw" not in repr(config.cluster)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"redis": "http://h"}, "regmirror.cluster.redis: expected a redis:// or rediss:// URL"),
        ({"redis": "redis://h:port"}, "regmirror.cluster.redis: expected a port number"),
        ({"redis": "redis://h/zero"}, "regmirror.cluster.redis: expected a database number"),
        ({"redis": "redis://h", "name": "a b"}, "regmirror.cluster.name: expected a name"),
        ({"redis": "redis://h", "lease": "0s"}, "regmirror.cluster.lease: expected 1s to 5m"),
        ({"redis": "redis://h", "leases": 1}, "regmirror.cluster.leases: unknown"),
    ],
)
def test_a_bad_cluster_key_is_one_line_naming_it(keys: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(cluster(**keys), "c.yml")
    assert str(raised.value).startswith(f"c.yml: {message}")


def test_a_replica_is_named_for_its_host_and_port_unless_named() -> None:
    config = parse_config({"http": {"addr": ":5001"}, **cluster(redis="redis://h")})[0]
    assert replica_name(config).endswith("-5001")
    assert replica_name(config, worker=2).endswith("-5001-w2")
    named = parse_config(cluster(redis="redis://h", replica="east/1"))[0]
    assert replica_name(named) == "east-1"
