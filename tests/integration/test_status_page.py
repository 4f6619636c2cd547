"""The status page in a real browser: Debian's headless Chromium, driven by Playwright,
against regmirror started by twistd, while it fetches cold blobs from the real upstream
registry through a proxy that caps the rate (so the fetches last a few seconds).

The page must show a progress bar for each digest in flight, see it advance, and drop
it once the fetch is done. The screenshot taken mid-fetch goes to the test's temporary
directory, and to docs/status-page.png (the README's picture) only when
``REGMIRROR_UPDATE_SCREENSHOT=1`` is set, so that a test run leaves the tree as it was.
"""

from __future__ import annotations

import hashlib
import os
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.integration.conftest import MakeMirror
from tests.support.images import Blob
from tests.support.mirror import REPO_ROOT, Mirror
from tests.support.proxy import CountingProxy
from tests.support.wait import poll_until

CHROMIUM = "/usr/bin/chromium"  # Debian's chromium (scripts/ensure-debs); never downloaded
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DOCS_SCREENSHOT = REPO_ROOT / "docs" / "status-page.png"
RATE = 2 * 1024 * 1024  # bytes/s from the upstream, all connections together
MiB = 1024 * 1024


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
    with sync_playwright() as playwright:
        # Playwright's launch gives the browser a new, temporary user-data-dir.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class Download(threading.Thread):
    """A client pulling one blob through the mirror, in a thread."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.data: bytes | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=60) as response:
                self.data = response.read()
        except BaseException as e:
            self.error = e


def bytes_shown(page: Page, digest: str) -> int:
    """The bytes the page's progress bar for ``digest`` says arrived (0: no bar)."""
    bar = page.locator(f'progress[data-digest="{digest}"]')
    if bar.count() == 0:
        return 0
    return int(bar.get_attribute("data-bytes") or 0)


def test_a_cold_fetch_shows_a_progress_bar_that_advances_until_it_is_done(
    make_mirror: MakeMirror,
    upstream_proxy: CountingProxy,
    fresh_blob: Callable[[int], tuple[str, Blob]],
    browser: Browser,
    tmp_path: Path,
) -> None:
    mirror = make_mirror(upstream_proxy.url, extra={"regmirror": {"max_size": "64MiB"}})
    # Some traffic first, for the counters: a small blob fetched, then served from cache.
    warm_name, warm = fresh_blob(3 * MiB)
    for _ in range(3):
        with urllib.request.urlopen(f"{mirror.url}/v2/{warm_name}/blobs/{warm.digest}") as r:
            assert r.read() == warm.data
    big_name, big = fresh_blob(12 * MiB)
    other_name, other = fresh_blob(6 * MiB)
    upstream_proxy.set_rate_limit(RATE)

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(mirror.url + "/")
    poll_until(lambda: page.locator("#ready.ok").count(), 10, what="the page to show ready")
    poll_until(
        lambda: "3.0 MiB in 1 entry of a 64.0 MiB quota" in page.inner_text("#store-text"),
        10,
        what="the store's size against its quota",
    )
    fill = page.locator("#store-bar .fill").evaluate("e => parseFloat(e.style.width)")
    assert 4 < fill < 5  # 3 MiB of 64 MiB

    downloads = [
        Download(f"{mirror.url}/v2/{big_name}/blobs/{big.digest}"),
        Download(f"{mirror.url}/v2/{big_name}/blobs/{big.digest}"),  # joins the same fetch
        Download(f"{mirror.url}/v2/{other_name}/blobs/{other.digest}"),
    ]
    for download in downloads:
        download.start()

    first = poll_until(
        lambda: bytes_shown(page, big.digest),
        15,
        what=f"a progress bar for {big.digest} with bytes in it",
        describe=lambda: mirror.log_tail(20),
    )
    advanced = poll_until(
        lambda: (n := bytes_shown(page, big.digest)) > first and n,
        15,
        what=f"the progress bar of {big.digest} to advance past {first} bytes",
    )
    assert first < advanced < big.size
    row = page.locator(f'tr[data-digest="{big.digest}"]')
    assert row.locator(".repository").inner_text() == f"{mirror_upstream(mirror)}/{big_name}"
    assert row.locator("progress").get_attribute("data-size") == str(big.size)
    poll_until(
        lambda: row.locator(".clients").inner_text() == "2",
        10,
        what="both clients of the shared fetch to be shown",
    )
    poll_until(lambda: bytes_shown(page, other.digest), 10, what="the second fetch's bar")
    poll_until(
        lambda: row.locator(".rate").inner_text().endswith("/s"),
        10,
        what="a rate for the fetch",
    )
    shot = tmp_path / "status-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000  # a rendered page, not an empty image
    if os.environ.get("REGMIRROR_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.write_bytes(shot.read_bytes())

    for download in downloads:
        download.join(60)
        assert download.error is None and download.data is not None
    assert hashlib.sha256(downloads[0].data).hexdigest() == big.digest.split(":")[1]
    assert downloads[1].data == downloads[0].data and downloads[2].data == other.data
    poll_until(
        lambda: page.locator("tr[data-digest]").count() == 0,
        10,
        what="the finished fetches to leave the page",
    )
    assert mirror.has_blob(big.digest) and mirror.has_blob(other.digest)
    assert upstream_proxy.count_requests("GET", f"/blobs/{big.digest}") == 1
    poll_until(
        lambda: "3 of" not in page.locator("#fetch-count").inner_text(),
        5,
        what="the fetch count to clear",
    )
    assert problems == []
    assert requested and all(url.startswith(mirror.url + "/") for url in requested), requested


def mirror_upstream(mirror: Mirror) -> str:
    """The name regmirror gives its only upstream: ``host:port`` of its URL."""
    return mirror.upstream_url.split("://", 1)[1]
