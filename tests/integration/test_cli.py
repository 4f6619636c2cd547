"""The ``regmirror`` command line, run as a subprocess against a real regmirror (twistd)
and a real upstream registry (docker-registry), counted through a proxy."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import bcrypt
import yaml

from tests.integration.conftest import MakeMirror
from tests.support.certs import CA, tls_config
from tests.support.cli import CliResult, regmirror
from tests.support.images import Image, push_image
from tests.support.merge import deep_merge
from tests.support.mirror import Mirror
from tests.support.proxy import CountingProxy
from tests.support.rawhttp import request
from tests.support.skopeo import skopeo_copy, verify_dir
from tests.support.upstream import UpstreamRegistry
from tests.support.wait import poll_until

ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"


def ok(result: CliResult) -> dict:
    assert result.code == 0, f"exit {result.code}\n{result.stdout}\n{result.stderr}"
    data = result.json()
    assert data["ok"] is True
    return data


def image_bytes(image: Image) -> int:
    return sum(b.size for b in image.blobs()) + sum(m.size for m in image.manifests())


def wait_cached(mirror: Mirror, image: Image) -> None:
    """Until every blob is committed: a client has all the bytes a moment before the
    mirror renames the file into place."""
    poll_until(
        lambda: all(mirror.has_blob(b.digest) for b in image.blobs()), 10, what="blobs cached"
    )


def tag_path(mirror: Mirror, repository: str, tag: str) -> Path:
    upstream = mirror.upstream_url.removeprefix("http://")
    return mirror.root / "repositories" / upstream / repository / "_tags" / f"{tag}.json"


# -- check-config ---------------------------------------------------------------------


def test_check_config_shows_the_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text("contents-of-the-password-file\n")
    config = tmp_path / "config.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "version": 0.1,
                "storage": {"filesystem": {"rootdirectory": str(tmp_path / "store")}},
                "proxy": {
                    "remoteurl": "https://registry-1.docker.io",
                    "username": "mirror",
                    "password": "the-proxy-password",
                },
                "regmirror": {
                    "upstreams": [
                        {
                            "name": "ghcr.io",
                            "url": "https://ghcr.io",
                            "password_file": str(secret_file),
                        }
                    ]
                },
            }
        )
    )
    text = regmirror("check-config", str(config))
    assert text.code == 0, text.stderr
    as_json = regmirror("check-config", str(config), "--json")
    data = ok(as_json)
    for output in (text.stdout + text.stderr, as_json.stdout):
        assert "the-proxy-password" not in output
        assert "contents-of-the-password-file" not in output
    hub, ghcr = data["config"]["upstreams"]
    assert (hub["name"], hub["username"], hub["password"]) == ("docker.io", "mirror", "***")
    assert (ghcr["name"], ghcr["password"], ghcr["password_file"]) == (
        "ghcr.io",
        "",
        str(secret_file),
    )
    assert "password: '***'" in text.stdout
    assert data["config"]["root"] == str(tmp_path / "store")


def test_check_config_fails_with_the_file_and_key_of_the_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.yml"
    config.write_text("regmirror:\n  tag_freshnes: 30s\n")
    result = regmirror("check-config", str(config))
    assert result.code == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"regmirror: {config}: regmirror.tag_freshnes: unknown configuration key"
    ]
    # The file checks of start-up run too: a TLS certificate that is not there.
    config.write_text(
        yaml.safe_dump(
            {
                "http": {
                    "tls": {"certificate": str(tmp_path / "none.pem"), "key": str(tmp_path / "k")}
                }
            }
        )
    )
    result = regmirror("check-config", str(config), "--json")
    assert result.code == 2
    error = result.json()
    assert error["ok"] is False and error["error"].startswith(f"{config}: http.tls: ")
    assert regmirror("check-config", str(tmp_path / "missing.yml")).code == 2


# -- prefetch, ls ---------------------------------------------------------------------


def test_prefetch_warms_every_platform_then_a_pull_needs_no_upstream(
    mirror: Mirror, upstream_proxy: CountingProxy, images: dict[str, Image], tmp_path: Path
) -> None:
    image = images["index"]
    first = ok(regmirror("prefetch", "--mirror", mirror.url, "multi/arch:latest", "--json"))
    [result] = first["images"]
    assert result["digest"] == image.digest and result["error"] == ""
    assert result["manifests"] == 3 and result["blobs"] == len(image.blobs())
    assert first["fetched_bytes"] == image_bytes(image) and first["cached_bytes"] == 0
    wait_cached(mirror, image)
    assert all(mirror.blob_sha256(b.digest) == b.digest for b in image.blobs())

    again = ok(regmirror("prefetch", "--mirror", mirror.url, "multi/arch:latest", "--json"))
    assert (again["fetched_bytes"], again["cached_bytes"]) == (0, image_bytes(image))

    listed = ok(regmirror("ls", "-c", str(mirror.config_path), "--json"))["repositories"]
    [repo] = [r for r in listed if r["repository"] == "multi/arch"]
    assert repo["tags"] == {"latest": image.digest}
    assert (repo["manifests"], repo["blobs"]) == (3, len(image.blobs()))
    assert repo["size"] == image_bytes(image) and repo["last_used"]
    assert ok(regmirror("ls", "-c", str(mirror.config_path), "multi/arch", "--json"))[
        "repositories"
    ] == [repo]
    assert regmirror("ls", "-c", str(mirror.config_path), "not/cached").code == 1

    upstream_proxy.stop()  # the upstream is gone: the pull is served from the cache
    dest = tmp_path / "pulled"
    skopeo_copy(image.ref(mirror.host), dest, all_platforms=True)
    verify_dir(dest, image)


def test_prefetch_of_one_platform_fetches_only_its_blobs(
    mirror: Mirror, images: dict[str, Image]
) -> None:
    image = images["index"]
    arm = image.manifest.child("linux/arm64")
    amd = image.manifest.child("linux/amd64")
    data = ok(
        regmirror(
            "prefetch",
            "--mirror",
            mirror.url,
            "--platform",
            "linux/arm64",
            f"{image.name}:{image.tag}",
            "--json",
        )
    )
    assert data["images"][0]["manifests"] == 2
    poll_until(lambda: all(mirror.has_blob(b.digest) for b in arm.own_blobs()), 10)
    assert not any(mirror.has_blob(b.digest) for b in amd.own_blobs())
    failed = regmirror("prefetch", "--mirror", mirror.url, "no/such:image", "--json")
    assert failed.code == 1 and "no/such:image" in failed.json()["images"][0]["error"]
    assert regmirror("prefetch", "--mirror", mirror.url, "Bad/Name").code == 2
    unreachable = regmirror("prefetch", "--mirror", "http://127.0.0.1:9", "multi/arch")
    assert unreachable.code == 3


# -- purge ----------------------------------------------------------------------------


def test_purge_of_a_tag_and_of_a_digest_while_the_mirror_runs(
    mirror: Mirror, upstream_proxy: CountingProxy, images: dict[str, Image]
) -> None:
    image = images["schema2"]
    ok(regmirror("prefetch", "--mirror", mirror.url, "library/alpine:3.19", "--json"))
    wait_cached(mirror, image)
    config = str(mirror.config_path)
    assert tag_path(mirror, "library/alpine", "3.19").is_file()

    purged = ok(regmirror("purge", "-c", config, "library/alpine:3.19", "--json"))
    assert purged["via"] == "mirror" and purged["tags"] and purged["content"] == []
    assert not tag_path(mirror, "library/alpine", "3.19").exists()
    before = upstream_proxy.count_requests("GET", "/manifests/3.19")
    got = request(
        mirror.url, "GET", "/v2/library/alpine/manifests/3.19", headers={"Accept": ACCEPT}
    )
    assert got.status == 200 and got.body == image.manifest.data
    assert upstream_proxy.count_requests("GET", "/manifests/3.19") == before + 1

    blob = image.largest_blob()
    purged = ok(regmirror("purge", "-c", config, blob.digest, "--json"))
    assert purged["via"] == "mirror" and purged["content"] == [
        {"digest": blob.digest, "kind": "blob"}
    ]
    assert purged["freed"] == blob.size and not mirror.has_blob(blob.digest)
    before = upstream_proxy.count_requests("GET", f"/blobs/{blob.digest}")
    got = request(mirror.url, "GET", f"/v2/library/alpine/blobs/{blob.digest}")
    assert got.status == 200 and hashlib.sha256(got.body).hexdigest() == blob.hex
    assert upstream_proxy.count_requests("GET", f"/blobs/{blob.digest}") == before + 1

    # The admin API is on a socket only root and the mirror's user may use, not on the
    # listener the fleet reaches.
    assert stat.S_IMODE((mirror.root / "_state" / "admin.sock").stat().st_mode) == 0o600
    layer = image.manifest.config
    assert layer is not None and layer.digest != blob.digest
    public = request(
        mirror.url, "POST", "/purge", body=json.dumps({"digest": layer.digest}).encode()
    )
    assert public.status == 404 and mirror.has_blob(layer.digest)

    nothing = regmirror("purge", "-c", config, "sha256:" + "0" * 64, "--json")
    assert nothing.code == 1 and "nothing in the cache matches" in nothing.json()["error"]
    assert regmirror("purge", "-c", config, "library/alpine:nosuchtag").code == 1


def test_purge_and_fsck_repair_on_the_store_when_no_mirror_runs(
    mirror: Mirror, upstream: UpstreamRegistry, images: dict[str, Image]
) -> None:
    alpine = images["schema2"]
    copy = push_image(upstream.url, alpine.with_name("cli/purge/copy", "3.19"))
    for ref in ("library/alpine:3.19", "cli/purge/copy:3.19"):
        ok(regmirror("prefetch", "--mirror", mirror.url, ref, "--json"))
    wait_cached(mirror, alpine)
    mirror.stop()
    config = str(mirror.config_path)

    # The repository goes, the blobs the copy references too stay.
    purged = ok(regmirror("purge", "-c", config, "library/alpine", "--json"))
    assert purged["via"] == "store" and purged["repositories"]
    assert purged["content"] == []
    assert all(mirror.has_blob(b.digest) for b in alpine.blobs())
    listed = ok(regmirror("ls", "-c", config, "--json"))["repositories"]
    assert [r["repository"] for r in listed] == ["cli/purge/copy"]

    # A damaged blob is found, and quarantined without a mirror to tell.
    blob = copy.largest_blob()
    mirror.blob_path(blob.digest).write_bytes(b"garbage" * 100)
    found = regmirror("fsck", "-c", config, "--repair", "--json")
    assert found.code == 1
    data = found.json()
    assert [d["digest"] for d in data["damaged"]] == [blob.digest]
    assert data["repair"]["via"] == "store" and data["repair"]["quarantined"] == [blob.digest]
    assert (mirror.root / "_quarantine" / "sha256" / blob.hex).is_file()
    assert ok(regmirror("fsck", "-c", config, "--json"))["damaged"] == []

    purged = ok(regmirror("purge", "-c", config, "cli/purge/copy", "--json"))
    assert {c["digest"] for c in purged["content"]} == {
        *(b.digest for b in alpine.blobs() if b.digest != blob.digest),
        alpine.digest,
    }
    assert not any(mirror.has_blob(b.digest) for b in alpine.blobs())
    assert ok(regmirror("ls", "-c", config, "--json"))["repositories"] == []
    assert regmirror("purge", "-c", config, "cli/purge/copy").code == 1


# -- fsck -----------------------------------------------------------------------------


def test_fsck_finds_a_corrupted_blob_and_repair_makes_the_mirror_refetch_it(
    make_mirror: MakeMirror, upstream_proxy: CountingProxy, images: dict[str, Image]
) -> None:
    mirror = make_mirror(upstream_proxy.url)
    image = images["oci"]
    ok(regmirror("prefetch", "--mirror", mirror.url, f"{image.name}:{image.tag}", "--json"))
    wait_cached(mirror, image)
    config = str(mirror.config_path)
    assert ok(regmirror("fsck", "-c", config, "--json"))["checked"] == len(image.blobs()) + 1

    blob = image.largest_blob()
    with open(mirror.blob_path(blob.digest), "r+b") as f:
        f.seek(1000)
        f.write(b"\0garbage\0")
    found = regmirror("fsck", "-c", config, "--json")
    assert found.code == 1
    assert found.json()["damaged"] == [{"digest": blob.digest, "kind": "blob", "size": blob.size}]

    repaired = regmirror("fsck", "-c", config, "--repair", "--json")
    assert repaired.code == 1
    assert repaired.json()["repair"] == {
        "via": "mirror",
        "intact": [],
        "quarantined": [blob.digest],
        "missing": [],
    }
    before = upstream_proxy.count_requests("GET", f"/blobs/{blob.digest}")
    got = request(mirror.url, "GET", f"/v2/{image.name}/blobs/{blob.digest}")
    assert got.status == 200 and hashlib.sha256(got.body).hexdigest() == blob.hex
    assert upstream_proxy.count_requests("GET", f"/blobs/{blob.digest}") == before + 1
    poll_until(lambda: mirror.blob_sha256(blob.digest) == blob.digest, 10, what="refetched")
    assert ok(regmirror("fsck", "-c", config, "--json"))["damaged"] == []


def test_prefetch_through_a_mirror_with_tls_and_client_auth(
    make_mirror: MakeMirror, upstream: UpstreamRegistry, images: dict[str, Image], tmp_path: Path
) -> None:
    ca = CA("prefetch CA")
    ca_path = ca.write(tmp_path / "ca.crt")
    server = ca.issue("mirror").write(tmp_path, "server")
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"ci:{bcrypt.hashpw(b'ci-password', bcrypt.gensalt(5)).decode()}\n")
    extra = deep_merge(
        tls_config(server), {"auth": {"htpasswd": {"path": str(htpasswd), "realm": "m"}}}
    )
    mirror = make_mirror(upstream.url, extra=extra, start=False)
    mirror.ssl_context = ssl.create_default_context(cafile=str(ca_path))
    token = base64.b64encode(b"ci:ci-password").decode()
    mirror.ready_headers = {"Authorization": f"Basic {token}"}
    mirror.start()
    ref = f"{images['oci'].name}:{images['oci'].tag}"

    def prefetch(*args: str) -> CliResult:
        return regmirror("prefetch", "--mirror", mirror.url, *args, ref, "--json")

    assert prefetch("--user", "ci:ci-password").code == 3  # the CA is not trusted
    refused = prefetch("--ca", str(ca_path))
    assert refused.code == 1 and "401" in refused.json()["images"][0]["error"]
    data = ok(prefetch("--ca", str(ca_path), "--user", "ci:ci-password"))
    assert data["images"][0]["blobs"] == len(images["oci"].blobs())
    insecure = regmirror(
        "prefetch",
        "--mirror",
        mirror.url,
        "--insecure",
        "--user",
        "ci",
        ref,
        "--json",
        env={"REGMIRROR_PASSWORD": "ci-password"},
    )
    assert ok(insecure)["images"][0]["error"] == ""


# -- what a person sees ---------------------------------------------------------------


def test_on_a_terminal_prefetch_shows_a_progress_bar_and_a_summary(
    mirror: Mirror, images: dict[str, Image]
) -> None:
    image = images["oci"]
    ref = f"{image.name}:{image.tag}"
    command = shlex.join(
        [sys.executable, "-m", "regmirror.cli", "prefetch", "--mirror", mirror.url, ref]
    )
    # script(1) runs it on a pseudo-terminal (bsdutils, in every Debian), as a person would.
    proc = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", proc.stdout)
    total = sum(b.size for b in image.blobs()) / 1024 / 1024
    assert re.search(rf"{re.escape(ref)} .*━+.* {total:.1f}/{total:.1f} MiB", screen), screen
    assert "fetched from upstream, 0 B already cached" in screen
    wait_cached(mirror, image)

    for args in (["ls", "-c", str(mirror.config_path)], ["fsck", "-c", str(mirror.config_path)]):
        text = regmirror(*args)
        assert text.code == 0, text.stderr
        assert image.name in text.stdout if args[0] == "ls" else "0 damaged" in text.stdout
    said = regmirror("purge", "-c", str(mirror.config_path), image.name)
    assert said.code == 0 and said.stdout.startswith(
        f"purged {mirror.upstream_url[7:]}/{image.name}"
    )
