"""The configuration loader: distribution's format, our extensions, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from regmirror.config import (
    ConfigError,
    listen_endpoint,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)

ROOT = Path(__file__).resolve().parents[2]


def test_etc_config_is_the_embedded_default() -> None:
    from_file, warnings = load_config(str(ROOT / "etc" / "config.yml"))
    default, _ = parse_config({})
    assert warnings == []
    assert from_file == type(default)(**{**_fields(default), "source": from_file.source})


def _fields(config: object) -> dict[str, object]:
    import attrs

    return attrs.asdict(config, recurse=False)  # type: ignore[arg-type]


def test_defaults_mirror_docker_hub_on_port_5000() -> None:
    config, _ = parse_config({})
    assert config.upstream.url == "https://registry-1.docker.io"
    assert config.upstream.name == "docker.io"
    assert config.upstream.docker_hub
    assert config.listen == "tcp:5000"
    assert str(config.root) == "data"
    assert config.tag_freshness == 30.0
    assert config.ttl == 7 * 86400


def test_a_registry2_proxy_config_is_accepted_with_one_warning() -> None:
    data = {
        "version": 0.1,
        "log": {"fields": {"service": "registry"}},
        "storage": {
            "cache": {"blobdescriptor": "inmemory"},
            "filesystem": {"rootdirectory": "/var/lib/registry"},
        },
        "http": {"addr": ":5000", "headers": {"X-Content-Type-Options": ["nosniff"]}},
        "health": {"storagedriver": {"enabled": True}},
        "proxy": {
            "remoteurl": "https://registry-1.docker.io",
            "username": "u",
            "password": "p",
            "ttl": "72h",
        },
    }
    config, warnings = parse_config(data, "registry.yml")
    assert config.upstream.username == "u"
    assert config.ttl == 72 * 3600
    assert len(warnings) == 1
    for key in ("health", "http.headers", "log.fields", "storage.cache"):
        assert key in warnings[0]


def test_password_is_not_in_repr() -> None:
    config, _ = parse_config({"proxy": {"password": "s3cret"}})
    assert "s3cret" not in repr(config)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"proxy": {"remoteurl": "ftp://x"}}, "c.yml: proxy.remoteurl: expected an http"),
        ({"bogus": 1}, "c.yml: bogus: unknown configuration key"),
        ({"regmirror": {"tag_fresh": "1s"}}, "c.yml: regmirror.tag_fresh: unknown"),
        (
            {"regmirror": {"tag_freshness": "soon"}},
            "c.yml: regmirror.tag_freshness: expected a duration",
        ),
        ({"regmirror": {"fsync": "yes"}}, "c.yml: regmirror.fsync: expected true or false"),
        ({"http": {"addr": "nonsense"}}, "c.yml: http.addr: expected host:port"),
        ({"log": {"level": "loud"}}, "c.yml: log.level: expected one of"),
        ([1, 2], "c.yml: the top level must be a mapping"),
    ],
)
def test_bad_configs_stop_with_one_line_naming_file_and_key(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "c.yml")
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yml: cannot read"):
        load_config(str(tmp_path / "nope.yml"))
    bad = tmp_path / "bad.yml"
    bad.write_text("http:\n  addr: [\n")
    with pytest.raises(ConfigError, match=r"bad.yml: invalid YAML \(line \d+\)"):
        load_config(str(bad))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("168h", 604800),
        ("7d", 604800),
        ("1h30m", 5400),
        ("0", 0),
        (45, 45),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("50GiB", 50 * 2**30),
        ("512MB", 512 * 10**6),
        ("64MiB", 64 * 2**20),
        (1024, 1024),
        ("1k", 1000),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("addr", "endpoint"),
    [
        (":5000", "tcp:5000"),
        ("127.0.0.1:5001", "tcp:5001:interface=127.0.0.1"),
        ("[::1]:5000", r"tcp6:5000:interface=\:\:1"),
    ],
)
def test_listen_addresses(addr: str, endpoint: str) -> None:
    assert listen_endpoint(addr) == endpoint


def test_log_level_filters_regmirror_events() -> None:
    from twisted.logger import globalLogPublisher

    from regmirror import logs

    seen: list[str] = []

    def observer(event: dict[str, object]) -> None:
        if event.get("log_namespace") == "test.levels":
            seen.append(str(event["log_format"]))

    globalLogPublisher.addObserver(observer)
    try:
        log = logs.get_logger("test.levels")
        logs.set_level("debug")
        log.debug("d1")
        logs.set_level("warn")
        log.info("i1")
        log.warn("w1")
    finally:
        logs.set_level("info")
        globalLogPublisher.removeObserver(observer)
    assert seen == ["d1", "w1"]
