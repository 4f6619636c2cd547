"""The CLI's pure parts: image references, repository routing, platforms, masking; and
its refusal to change a store that replicas or workers share."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from regmirror.cli.main import main as cli
from regmirror.cli.prefetch import Platform
from regmirror.cli.refs import ImageRef, parse_image, route
from regmirror.cli.showconfig import MASK, effective, masked
from regmirror.config import parse_config
from regmirror.domain.digest import Digest
from regmirror.storage.store import Store

HEX = "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected", "path", "query"),
    [
        ("library/alpine:3.19", ImageRef("", "library/alpine", "3.19"), "library/alpine", ""),
        ("alpine", ImageRef("", "alpine", "latest"), "alpine", ""),
        (
            "docker.io/library/alpine:3.19",
            ImageRef("docker.io", "library/alpine", "3.19"),
            "docker.io/library/alpine",
            "",
        ),
        (
            f"ghcr.io/owner/image@sha256:{HEX}",
            ImageRef("ghcr.io", "owner/image", "latest", Digest("sha256", HEX)),
            "ghcr.io/owner/image",
            "",
        ),
        (
            f"quay.io/a/b:1.0@sha256:{HEX}",
            ImageRef("quay.io", "a/b", "1.0", Digest("sha256", HEX)),
            "quay.io/a/b",
            "",
        ),
        ("localhost/x:1", ImageRef("localhost", "x", "1"), "localhost/x", ""),
        (
            "registry.example.com:5000/team/app:v2",
            ImageRef("registry.example.com:5000", "team/app", "v2"),
            "team/app",
            "?ns=registry.example.com%3A5000",
        ),
        ("team/app/server", ImageRef("", "team/app/server", "latest"), "team/app/server", ""),
    ],
)
def test_image_references_parse_as_docker_and_podman_read_them(
    text: str, expected: ImageRef, path: str, query: str
) -> None:
    ref = parse_image(text)
    assert ref == expected
    assert (ref.mirror_name, ref.query) == (path, query)
    assert ref.reference == (str(ref.digest) if ref.digest else ref.tag)


def test_the_string_of_a_reference_names_what_is_fetched() -> None:
    assert str(parse_image("alpine")) == "alpine:latest"
    assert str(parse_image(f"ghcr.io/o/i:1@sha256:{HEX}")) == f"ghcr.io/o/i@sha256:{HEX}"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "not an image reference"),
        (" alpine", "not an image reference"),
        ("Library/alpine", "not a repository name"),
        ("alpine:", "is not a tag"),
        ("alpine:bad/tag", "'alpine:bad' is not a registry host[:port]"),
        ("alpine@sha256:abc", "not a sha256 or sha512 digest"),
        ("alpine@md5:" + "a" * 32, "not a sha256 or sha512 digest"),
        ("ex ample.com/x", "is not a registry host[:port]"),
        ("a..b.com:99999999/x", "not a registry host[:port]"),
    ],
)
def test_a_bad_reference_is_refused_saying_why(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_image(text)


def _config() -> object:
    config, _ = parse_config(
        {
            "regmirror": {
                "upstreams": [
                    {"name": "ghcr.io", "url": "https://ghcr.io", "aliases": ["ghcr"]},
                    {"name": "registry.example.com", "url": "https://registry.example.com:8443"},
                ]
            }
        }
    )
    return config


@pytest.mark.parametrize(
    ("typed", "upstream", "repository"),
    [
        ("alpine", "docker.io", "library/alpine"),
        ("library/alpine", "docker.io", "library/alpine"),
        ("docker.io/alpine", "docker.io", "library/alpine"),
        ("registry-1.docker.io/library/alpine", "docker.io", "library/alpine"),
        ("ghcr.io/owner/image", "ghcr.io", "owner/image"),
        ("ghcr/owner/image", "ghcr.io", "owner/image"),
        ("registry.example.com/team/app", "registry.example.com", "team/app"),
        ("owner/image", "docker.io", "owner/image"),
    ],
)
def test_a_repository_routes_to_an_upstream_as_the_mirror_routes_it(
    typed: str, upstream: str, repository: str
) -> None:
    routed = route(_config(), typed)  # type: ignore[arg-type]
    assert (routed.upstream.name, routed.repository) == (upstream, repository)


def test_a_bad_repository_name_is_refused() -> None:
    with pytest.raises(ValueError, match="not a repository name"):
        route(_config(), "Ghcr.io/x")  # type: ignore[arg-type]


def test_platforms_match_os_architecture_and_a_variant_when_given() -> None:
    arm = {"os": "linux", "architecture": "arm", "variant": "v7"}
    assert Platform.parse("linux/arm").matches(arm)
    assert Platform.parse("linux/arm/v7").matches(arm)
    assert not Platform.parse("linux/arm/v6").matches(arm)
    assert not Platform.parse("linux/amd64").matches(arm)
    assert not Platform.parse("linux/amd64").matches(None)
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(ValueError):
            Platform.parse(bad)


def test_secrets_are_masked_at_any_depth_and_empty_ones_stay_empty() -> None:
    data = {
        "password": "hunter2",
        "upstreams": [{"name": "a", "password": "", "token": "t0k", "password_file": "/run/x"}],
        "nested": {"secret": "s", "username": "bob"},
    }
    assert masked(data) == {
        "password": MASK,
        "upstreams": [{"name": "a", "password": "", "token": MASK, "password_file": "/run/x"}],
        "nested": {"secret": MASK, "username": "bob"},
    }


def test_the_effective_config_never_holds_a_password() -> None:
    config, _ = parse_config(
        {
            "proxy": {"remoteurl": "https://r.example.com", "username": "u", "password": "p4ss"},
            "regmirror": {
                "upstreams": [
                    {"name": "q.example.com", "url": "https://q.example.com", "password": "x9"}
                ]
            },
        }
    )
    shown = effective(config)
    assert "p4ss" not in repr(shown) and "x9" not in repr(shown)
    assert [u["password"] for u in shown["upstreams"]] == [MASK, MASK]
    assert shown["upstreams"][0]["username"] == "u"
    assert isinstance(shown["root"], str)


# -- purge and fsck --repair refused where replicas or workers share the store --------


def shared_store(tmp_path: Path, regmirror: dict[str, object]) -> tuple[str, Path]:
    """A config file on a store holding one damaged blob (its bytes are not its
    digest's): what ``purge`` would remove and ``fsck --repair`` would quarantine."""
    store = Store(tmp_path / "data")
    store.prepare()
    digest = Digest.of(b"the layer")
    path = store.blob_path(digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the layer")
    config = tmp_path / "config.yml"
    config.write_text(
        json.dumps(
            {"storage": {"filesystem": {"rootdirectory": str(store.root)}}, "regmirror": regmirror}
        )
    )
    return str(config), path


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("regmirror", "line"),
    [
        (
            {"cluster": {"redis": "redis://127.0.0.1:1"}},
            "regmirror: purge/fsck --repair: not supported with regmirror.cluster yet "
            "(the replicas share the store)",
        ),
        (
            {"workers": 2},
            "regmirror: purge/fsck --repair: not supported with regmirror.workers yet "
            "(the workers share the store)",
        ),
    ],
)
def test_purge_and_fsck_repair_are_refused_on_a_shared_store_and_change_nothing(
    tmp_path: Path, regmirror: dict[str, object], line: str
) -> None:
    config, blob = shared_store(tmp_path, regmirror)
    before = tree(tmp_path / "data")
    digest = "sha256:" + blob.name
    for args in (["purge", "-c", config, digest], ["fsck", "-c", config, "--repair"]):
        result = CliRunner().invoke(cli, args)
        assert (result.exit_code, result.stdout, result.stderr) == (2, "", line + "\n")
        assert tree(tmp_path / "data") == before  # nothing removed, nothing quarantined
    # what only reads stays: fsck finds the damaged blob (exit 1), ls lists no repository
    found = CliRunner().invoke(cli, ["fsck", "-c", config, "--json"])
    assert found.exit_code == 1, found.output
    assert [d["digest"] for d in json.loads(found.stdout)["damaged"]] == [digest]
    listed = CliRunner().invoke(cli, ["ls", "-c", config, "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout)["repositories"] == []
    assert tree(tmp_path / "data") == before
