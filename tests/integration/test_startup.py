"""Start-up as an operator meets it: twistd, the plugin's options, config errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.mirror import REPO_ROOT, TWISTD_MAIN, Mirror
from tests.support.rawhttp import connect
from tests.support.upstream import UpstreamRegistry

TWISTD = [sys.executable, "-c", TWISTD_MAIN]


def twistd(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TWISTD, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_twistd_help_documents_the_config_option() -> None:
    done = twistd("regmirror", "--help")
    assert done.returncode == 0, done.stderr
    assert "-c, --config=" in done.stdout
    assert "etc/config.yml" in done.stdout


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("bogus: 1\n", "bogus: unknown configuration key"),
        ("proxy:\n  remoteurl: ftp://example\n", "proxy.remoteurl: expected an http"),
        ("regmirror:\n  tag_freshness: soon\n", "regmirror.tag_freshness: expected a duration"),
        ("http: [\n", "invalid YAML"),
    ],
)
def test_bad_config_stops_startup_with_one_line_naming_file_and_key(
    tmp_path: Path, text: str, key: str
) -> None:
    config = tmp_path / "config.yml"
    config.write_text(text + f"storage:\n  filesystem:\n    rootdirectory: {tmp_path}/store\n")
    if text.startswith("http: ["):
        config.write_text(text)
    done = twistd("--pidfile=", "-n", "regmirror", "-c", str(config))
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"regmirror: {config}: ")
    assert key in lines[0]
    assert not (tmp_path / "store").exists()  # nothing was started


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    done = twistd("--pidfile=", "-n", "regmirror", "-c", str(tmp_path / "nope.yml"))
    assert done.returncode != 0
    assert done.stderr.strip() == (
        f"regmirror: {tmp_path / 'nope.yml'}: cannot read the configuration file: "
        "No such file or directory"
    )


def test_a_registry2_proxy_config_starts_with_one_warning(
    tmp_path: Path, upstream: UpstreamRegistry
) -> None:
    extra = {
        "storage": {"cache": {"blobdescriptor": "inmemory"}, "delete": {"enabled": True}},
        "http": {"headers": {"X-Content-Type-Options": ["nosniff"]}},
        "health": {"storagedriver": {"enabled": True, "interval": "10s", "threshold": 3}},
        "regmirror": None,
    }
    with Mirror(tmp_path / "m", upstream.url, extra=extra) as mirror:
        conn = connect(mirror.url)
        conn.request("GET", "/v2/")
        assert conn.getresponse().status == 200
        warnings = [
            line
            for line in mirror.log_text().splitlines()
            if "not implemented by regmirror" in line
        ]
    assert len(warnings) == 1
    for key in ("health", "http.headers", "storage.cache", "storage.delete"):
        assert key in warnings[0]


def test_the_mirror_starts_with_no_upstream_at_all(tmp_path: Path) -> None:
    # Nothing listens on the upstream port: start-up must not depend on it.
    with Mirror(tmp_path / "m", "http://127.0.0.1:9") as mirror:
        conn = connect(mirror.url)
        conn.request("GET", "/v2/library/alpine/manifests/latest")
        response = conn.getresponse()
        body = response.read()
        assert response.status == 503
        assert b'"UNAVAILABLE"' in body
