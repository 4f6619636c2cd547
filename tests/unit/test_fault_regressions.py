"""Bugs the fault suite (tests/faults) found, pinned down without sockets."""

from __future__ import annotations

from pathlib import Path

import pytest
import treq
from twisted.trial.unittest import SynchronousTestCase

from regmirror.domain.digest import Digest
from tests.unit.test_cache_web import Harness


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_a_range_of_a_fetch_in_flight_waits_for_the_digest_and_breaks_if_it_fails(
    h: Harness,
) -> None:
    data = bytes(range(256)) * 1000
    digest = h.upstream.add_blob(data)
    h.upstream.served_blobs[digest] = data[:-1] + b"\x00"  # wrong, found at the end only
    h.upstream.hold_blobs = True
    d = h.client.get(f"http://mirror.test/v2/a/blobs/{digest}", headers={"range": "bytes=10-19"})
    h.pump()
    h.upstream.release(chunk=100_000)  # the range's bytes have arrived, unverified
    h.pump()
    t = SynchronousTestCase()
    response = t.successResultOf(d)
    assert response.code == 206
    body = treq.content(response)
    h.pump()
    t.assertNoResult(body)  # not complete before the digest is known
    h.upstream.release()
    h.pump()
    t.failureResultOf(body)  # the digest did not match: cut, never complete
    assert not h.store.blob_path(Digest.parse(digest)).exists()


def test_a_range_of_a_fetch_in_flight_completes_once_verified(h: Harness) -> None:
    data = bytes(range(256)) * 1000
    digest = h.upstream.add_blob(data)
    h.upstream.hold_blobs = True
    d = h.client.get(f"http://mirror.test/v2/a/blobs/{digest}", headers={"range": "bytes=10-19"})
    h.pump()
    h.upstream.release(chunk=100_000)
    h.pump()
    t = SynchronousTestCase()
    body = treq.content(t.successResultOf(d))
    h.pump()
    t.assertNoResult(body)
    h.upstream.release()
    h.pump()
    assert t.successResultOf(body) == data[10:20]


def test_a_fetch_starting_on_a_full_disk_is_passed_through_not_stored(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bytes(range(256)) * 1000
    digest = h.upstream.add_blob(data)
    monkeypatch.setattr(h.store, "has_room", lambda size: False)
    response, body = h.request("GET", f"/v2/a/blobs/{digest}")
    assert response.code == 200 and body == data
    assert not h.store.blob_path(Digest.parse(digest)).exists()
    assert list(h.store.tmp.iterdir()) == []
