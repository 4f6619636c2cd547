"""The test support code checked against the real upstream, without regmirror.

These pass on their own: if one fails, the mirror tests' failures say nothing.
Run them with ``pytest tests/integration/test_harness.py`` (or ``-k upstream_directly``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from tests.support.images import (
    ACCEPT_MANIFESTS,
    Image,
    image_manifest,
    make_blob,
    make_layer,
    push_blob,
    push_image,
    standard_images,
)
from tests.support.mirror import Mirror
from tests.support.ports import free_port
from tests.support.process import ManagedProcess, ToolMissingError, require_tool
from tests.support.proxy import CountingProxy
from tests.support.rawhttp import connect, request
from tests.support.skopeo import skopeo_copy, verify_dir
from tests.support.upstream import UpstreamRegistry, parse_logrus_line
from tests.support.wait import PollTimeoutError, poll_until


@pytest.mark.parametrize("role", ["schema2", "oci", "index", "docker_list"])
def test_skopeo_pulls_each_image_from_upstream_directly(
    upstream: UpstreamRegistry, images: dict[str, Image], role: str, tmp_path: Path
) -> None:
    image = images[role]
    dest = tmp_path / "all"
    skopeo_copy(image.ref(upstream.host), dest, all_platforms=True)
    check = verify_dir(dest, image)
    assert check.manifest == image.manifest
    assert check.blob_digests == {b.digest for b in image.blobs()}
    assert check.child_manifest_digests == {c.digest for c in image.manifest.children}
    if image.manifest.is_index:
        # Without --multi-arch all, skopeo copies the one image for this machine.
        single = tmp_path / "system"
        skopeo_copy(image.ref(upstream.host), single)
        check = verify_dir(single, image)
        assert check.manifest in image.manifest.children
        assert check.blob_digests == {b.digest for b in check.manifest.blobs()}


def test_skopeo_dir_copy_keeps_layers_compressed_upstream_directly(
    upstream: UpstreamRegistry, images: dict[str, Image], tmp_path: Path
) -> None:
    image = images["oci"]
    skopeo_copy(image.ref(upstream.host), tmp_path / "d")
    for layer in image.manifest.layers:
        data = (tmp_path / "d" / layer.hex).read_bytes()
        assert data == layer.data
        assert data[:2] == b"\x1f\x8b"  # still gzip: dir: does not decompress


def test_verify_dir_rejects_a_corrupted_or_missing_blob_upstream_directly(
    upstream: UpstreamRegistry, images: dict[str, Image], tmp_path: Path
) -> None:
    image = images["schema2"]
    dest = tmp_path / "d"
    skopeo_copy(image.ref(upstream.host), dest)
    layer = image.manifest.layers[0]
    path = dest / layer.hex
    original = path.read_bytes()
    path.write_bytes(bytes([original[0] ^ 1]) + original[1:])
    with pytest.raises(AssertionError, match="has sha256"):
        verify_dir(dest, image)
    path.unlink()
    with pytest.raises(AssertionError, match="missing blob"):
        verify_dir(dest, image)
    path.write_bytes(original)
    (dest / ("0" * 64)).write_bytes(b"stray")
    with pytest.raises(AssertionError, match="unexpected file"):
        verify_dir(dest, image)


def test_upstream_serves_pushed_manifests_and_blobs_upstream_directly(
    upstream: UpstreamRegistry, images: dict[str, Image]
) -> None:
    for image in images.values():
        for manifest in image.manifests():
            for ref in {manifest.digest, *(image.tags if manifest is image.manifest else ())}:
                resp = request(
                    upstream.url,
                    "GET",
                    f"/v2/{image.name}/manifests/{ref}",
                    headers={"Accept": ACCEPT_MANIFESTS},
                )
                assert resp.status == 200, (image.name, ref, resp.body)
                assert resp.body == manifest.data
                assert resp.header("Content-Type") == manifest.media_type
                assert resp.header("Docker-Content-Digest") == manifest.digest
        for blob in image.blobs():
            resp = request(upstream.url, "GET", f"/v2/{image.name}/blobs/{blob.digest}")
            assert resp.status == 200
            assert hashlib.sha256(resp.body).hexdigest() == blob.hex


def test_upstream_log_counts_requests_upstream_directly(
    upstream: UpstreamRegistry, images: dict[str, Image]
) -> None:
    blob = images["oci"].manifest.layers[1]
    path = f"/v2/team/app/server/blobs/{blob.digest}"
    before = upstream.count_requests("GET", path)
    for _ in range(3):
        assert request(upstream.url, "GET", path).status == 200
    assert request(upstream.url, "HEAD", path).status == 200
    upstream.wait_for_requests("GET", path, at_least=before + 3)
    upstream.wait_for_requests("HEAD", path, at_least=1)
    assert upstream.count_requests("GET", path) == before + 3
    entry = upstream.requests("GET", path)[-1]
    assert (entry.status, entry.written) == (200, blob.size)
    assert upstream.blob_data_path(blob.digest).read_bytes() == blob.data


def test_logrus_line_parsing_handles_quoted_values() -> None:
    line = (
        'time="2026-01-01T00:00:00Z" level=error msg="response completed with error" '
        'err.code="manifest unknown" http.request.method=HEAD '
        'http.request.uri="/v2/a/manifests/sha256:00" http.response.status=404 vars.name=a '
        'err.detail="say \\"hi\\""'
    )
    fields = parse_logrus_line(line)
    assert fields["msg"] == "response completed with error"
    assert fields["http.request.method"] == "HEAD"
    assert fields["http.request.uri"] == "/v2/a/manifests/sha256:00"
    assert fields["http.response.status"] == "404"
    assert fields["err.detail"] == 'say "hi"'


def test_counting_proxy_counts_bytes_and_requests_upstream_directly(
    upstream: UpstreamRegistry, images: dict[str, Image], tmp_path: Path
) -> None:
    image = images["index"]
    with CountingProxy.to_url(upstream.url) as proxy:
        skopeo_copy(image.ref(proxy.host), tmp_path / "d", all_platforms=True)
        verify_dir(tmp_path / "d", image)
        for blob in image.blobs():
            assert proxy.count_requests("GET", f"/blobs/{blob.digest}") == 1
        for child in image.manifest.children:
            assert proxy.count_requests("GET", f"/manifests/{child.digest}") == 1
        total = sum(b.size for b in image.blobs())
        assert total <= proxy.bytes_down < total + 200_000
        assert proxy.connections >= len(image.blobs())
        manifest_get = next(r for r in proxy.requests if r.target.endswith("/manifests/latest"))
        assert "application/vnd.oci.image.index.v1+json" in manifest_get.headers["accept"]
    assert proxy.active_connections == 0


def test_counting_proxy_hold_and_rate_limit_upstream_directly(
    upstream: UpstreamRegistry,
) -> None:
    blob = make_blob("harness/proxy-hold", 3_000_000)
    push_blob(upstream.url, "harness/proxy", blob)
    with CountingProxy.to_url(upstream.url) as proxy:
        proxy.hold_downstream_after(1_000_000)
        conn = connect(proxy.url, timeout=30)
        conn.request("GET", f"/v2/harness/proxy/blobs/{blob.digest}")
        resp = conn.getresponse()
        first = resp.read(500_000)
        poll_until(lambda: proxy.holding, 10, what="the proxy to reach its hold point")
        assert proxy.bytes_down == 1_000_000
        proxy.set_rate_limit(50_000_000)
        proxy.release()
        rest = resp.read()
        conn.close()
        assert first + rest == blob.data
        assert proxy.bytes_down > blob.size


def test_counting_proxy_refused_upstream_closes_client_upstream_directly() -> None:
    with CountingProxy("127.0.0.1", free_port()) as proxy:
        with pytest.raises((ConnectionError, OSError)):
            request(proxy.url, "GET", "/v2/", timeout=5)
        poll_until(lambda: proxy.failed_connects == 1, 5, what="a failed upstream connect")


def test_pushed_images_are_deterministic_and_layers_are_valid_tar_gz() -> None:
    a, b = standard_images(), standard_images()
    assert {k: v.digest for k, v in a.items()} == {k: v.digest for k, v in b.items()}
    layer, diff_id = make_layer("harness/layer", 50_000, "oci")
    tar_bytes = gzip.decompress(layer.data)
    assert "sha256:" + hashlib.sha256(tar_bytes).hexdigest() == diff_id
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        (member,) = tar.getmembers()
        f = tar.extractfile(member)
        assert f is not None and len(f.read()) == 50_000
    raw = image_manifest("docker", "harness/raw", (1234,), layer_format="raw")
    assert raw.layers[0].size == 1234


def test_a_second_registry_can_be_stopped_and_restarted_upstream_directly(
    tmp_path: Path, integration_tools: dict[str, str]
) -> None:
    image = standard_images()["oci"].with_name("harness/restart")
    with UpstreamRegistry(tmp_path / "up") as registry:
        push_image(registry.url, image)
        pid = registry.pid
        registry.restart()
        assert registry.pid != pid
        resp = request(
            registry.url,
            "GET",
            f"/v2/{image.name}/manifests/{image.tag}",
            headers={"Accept": ACCEPT_MANIFESTS},
        )
        assert resp.status == 200 and resp.body == image.manifest.data
        registry.stop()
        assert not registry.running
        with pytest.raises(OSError):
            request(registry.url, "GET", "/v2/", timeout=2)


def test_missing_tool_is_an_error_not_a_skip() -> None:
    with pytest.raises(ToolMissingError, match="not installed"):
        require_tool("definitely-not-a-real-tool-regmirror")


def test_poll_until_reports_what_it_waited_for() -> None:
    with pytest.raises(PollTimeoutError, match=r"the impossible.*last value: 0"):
        poll_until(lambda: 0, 0.2, what="the impossible", describe=lambda: "state")
    event = threading.Event()
    threading.Timer(0.1, event.set).start()
    assert poll_until(event.is_set, 5, what="the timer")


class _StaticMirror(Mirror):
    """Mirror's process handling, run against Python's http.server instead of twistd."""

    def argv(self) -> list[str]:
        docroot = self.base_dir / "www"
        (docroot / "v2").mkdir(parents=True, exist_ok=True)
        (docroot / "v2" / "index.html").write_text("{}")
        return [
            sys.executable,
            "-m",
            "http.server",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(docroot),
        ]


def test_mirror_process_handling_with_a_stand_in_server(tmp_path: Path) -> None:
    mirror = _StaticMirror(tmp_path / "m", "http://127.0.0.1:1", extra={"regmirror": {"x": 1}})
    try:
        mirror.start()
        assert mirror.config()["regmirror"] == {"tag_freshness": "30s", "x": 1}
        assert "remoteurl: http://127.0.0.1:1" in mirror.config_path.read_text()
        assert request(mirror.url, "GET", "/v2/").status == 200
        pid = mirror.pid
        mirror.restart()
        assert mirror.pid != pid
        assert request(mirror.url, "GET", "/v2/").status == 200
        assert mirror.kill9() == -9
        assert not mirror.running
        mirror.start()
        assert mirror.stop() is not None
    finally:
        mirror.stop()
    assert "GET /v2/" in mirror.log_text()
    assert mirror.blob_path("sha256:abcdef") == mirror.root / "blobs/sha256/ab/abcdef"


def test_mirror_start_failure_reports_exit_status_and_log_tail(tmp_path: Path) -> None:
    class Failing(Mirror):
        def argv(self) -> list[str]:
            return [sys.executable, "-c", "import sys; sys.exit('config is broken: 42')"]

    mirror = Failing(tmp_path / "m", "http://127.0.0.1:1")
    with pytest.raises(RuntimeError, match=r"(?s)exited with status 1.*config is broken: 42"):
        mirror.start()
    assert not mirror.running


def test_managed_process_stop_falls_back_to_sigkill(tmp_path: Path) -> None:
    ignore_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    ignore_term += "print('ready', flush=True)\nwhile True: time.sleep(1)"
    proc = ManagedProcess(
        [sys.executable, "-c", ignore_term],
        stdout_path=tmp_path / "out",
        stderr_path=tmp_path / "err",
    )
    proc.start()
    try:
        poll_until(lambda: "ready" in (tmp_path / "out").read_text(), 10, what="child ready")
        assert proc.stop(timeout=0.5) == -9
    finally:
        proc.kill9()
