"""A followed fetch (``RemoteFetch``) and another replica's copy of the same blob.

A replica cut off from Redis fetches alone and commits its own copy while the cluster's
holder is still writing the file that followers read. Found by the fault suite
(tests/faults/cluster/test_partition.py): the followers took that copy for the holder's
commit, sent past what the file they read held, and cut their clients.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from regmirror.domain.digest import Digest
from regmirror.fetch.blobfetch import State
from regmirror.fetch.remote import Progress, RemoteFetch
from regmirror.storage.store import Store

DATA = os.urandom(4096)
DIGEST = Digest.parse("sha256:" + hashlib.sha256(DATA).hexdigest())


def _following(tmp_path: Path) -> tuple[Store, RemoteFetch, Path]:
    store = Store(tmp_path / "store")
    temp = store.root / "_tmp" / "r1" / "fetch"
    temp.parent.mkdir(parents=True)
    temp.write_bytes(DATA[:1000])  # the holder has written 1000 bytes so far
    progress = Progress(State.RUNNING, 1000, 1000, len(DATA))
    return store, RemoteFetch(store, DIGEST, "r1", temp, progress), temp


def _commit_copy(store: Store) -> None:
    path = store.blob_path(DIGEST)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(DATA)


def test_another_replicas_copy_in_the_store_does_not_end_a_followed_fetch(
    tmp_path: Path,
) -> None:
    store, fetch, temp = _following(tmp_path)
    _commit_copy(store)
    fetch.look_on_disk(1.0)
    assert fetch.state is State.RUNNING
    assert fetch.readable() == 1000  # what the file followed holds, not the copy's size
    with open(temp, "ab") as f:  # the holder goes on, verifies, renames its own file
        f.write(DATA[1000:])
    fetch.look_on_disk(2.0)
    assert fetch.readable() == len(DATA) - 1  # never the last byte before the commit
    store.commit(temp, DIGEST)
    fetch.look_on_disk(3.0)
    assert fetch.state is State.COMMITTED
    assert fetch.readable() == len(DATA)


def test_a_holder_gone_with_another_copy_in_the_store_cuts_rather_than_comes_up_short(
    tmp_path: Path,
) -> None:
    store, fetch, _ = _following(tmp_path)
    _commit_copy(store)
    fetch.holder_gone()
    assert fetch.failed  # the file its readers hold is partial: cut, never short


def test_a_holder_that_reported_the_digest_verified_may_end_with_any_copy(
    tmp_path: Path,
) -> None:
    store, fetch, temp = _following(tmp_path)
    temp.write_bytes(DATA)
    fetch.update(Progress(State.VERIFIED, len(DATA), len(DATA), len(DATA)))
    _commit_copy(store)
    fetch.look_on_disk(1.0)
    assert fetch.state is State.COMMITTED
