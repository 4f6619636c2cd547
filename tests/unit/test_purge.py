"""Purges and quarantines on a real store in a temporary directory: what a plan
removes, the reaper's rule (nothing in use), and the admin API that serves them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed

from regmirror.api.admin import admin_resource
from regmirror.domain.digest import Digest
from regmirror.domain.kinds import Kind
from regmirror.expiry.purge import Purger, Target, plan
from regmirror.storage.repositories import RepoKey, Repositories
from regmirror.storage.store import Store

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
UP = "registry.example.com"


def put_blob(store: Store, data: bytes) -> Digest:
    digest = Digest.of(data)
    temp = store.new_temp()
    os.write(temp.fd, data)
    os.close(temp.fd)
    store.commit(temp.path, digest)
    return digest


def put_image(store: Store, repo: str, tag: str, *layers: bytes) -> tuple[Digest, list[Digest]]:
    blobs = [put_blob(store, data) for data in layers]
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"digest": str(blobs[0]), "size": len(layers[0])},
        "layers": [
            {"digest": str(b), "size": len(d)} for b, d in zip(blobs[1:], layers[1:], strict=True)
        ],
    }
    data = json.dumps(doc).encode()
    digest = Digest.of(data)
    store.write_manifest(digest, data, MANIFEST)
    store.link_manifest(UP, repo, digest)
    store.write_tag(UP, repo, tag, {MANIFEST: str(digest)})
    return digest, blobs


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store")
    s.prepare()
    return s


class Recorder:
    def __init__(self) -> None:
        self.dropped: list[Digest] = []
        self.removed: list[tuple[Kind, Digest]] = []
        self.tags: list[tuple[str, str, str]] = []
        self.busy: set[Digest] = set()

    def purger(self, store: Store) -> Purger:
        return Purger(
            store,
            run_in_thread=lambda f, *a: succeed(f(*a)),
            in_use=self.busy.__contains__,
            drop=self.dropped.append,
            on_removed=lambda kind, digest: self.removed.append((kind, digest)),
            on_tag_removed=lambda *tag: self.tags.append(tag),
        )


def result_of(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred did not fire"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def test_purging_a_tag_removes_its_link_and_leaves_the_content(store: Store) -> None:
    manifest, blobs = put_image(store, "team/app", "1.0", b"config", b"layer")
    recorder = Recorder()
    outcome = result_of(
        Deferred.fromCoroutine(recorder.purger(store).purge(Target(UP, "team/app", "1.0")))
    )
    assert outcome.plan.tags == ((RepoKey(UP, "team/app"), "1.0"),) and outcome.plan.content == ()
    assert store.read_tag(UP, "team/app", "1.0") == {}
    assert all(store.blob_size(d) is not None for d in [manifest, *blobs])
    assert recorder.tags == [(UP, "team/app", "1.0")] and recorder.dropped == []
    assert not plan(store, Target(UP, "team/app", "1.0")).matched
    assert not plan(store, Target(UP, "no/such", "1.0")).matched


def test_purging_a_repository_keeps_what_another_repository_references(store: Store) -> None:
    kept, kept_blobs = put_image(store, "team/base", "1", b"base-config", b"shared-layer")
    gone, gone_blobs = put_image(
        store, "team/app", "2", b"app-config", b"shared-layer", b"own-layer"
    )
    sizes = {d: store.blob_size(d) or 0 for d in [gone, *gone_blobs]}
    recorder = Recorder()
    outcome = result_of(
        Deferred.fromCoroutine(recorder.purger(store).purge(Target(UP, "team/app")))
    )
    removed = {d for d, _ in outcome.plan.content}
    assert removed == {gone, gone_blobs[0], gone_blobs[2]}
    assert gone_blobs[1] == kept_blobs[1] and store.blob_size(kept_blobs[1]) is not None
    assert all(store.blob_size(d) is None for d in removed)
    assert outcome.freed == sum(sizes[d] for d in removed)
    assert Repositories(store).keys() == [RepoKey(UP, "team/base")]
    assert not store.repo_dir(UP, "team/app").exists()
    assert sorted(recorder.dropped) == sorted(removed)
    assert (Kind.MANIFEST, gone) in recorder.removed
    assert store.read_manifest(kept) is not None


def test_purging_a_repository_leaves_one_nested_in_it(store: Store) -> None:
    put_image(store, "team", "1", b"outer-config")
    put_image(store, "team/inner", "1", b"inner-config")
    result_of(Deferred.fromCoroutine(Recorder().purger(store).purge(Target(UP, "team"))))
    assert Repositories(store).keys() == [RepoKey(UP, "team/inner")]


def test_purging_a_digest_removes_it_everywhere_with_its_tags(store: Store) -> None:
    manifest, _ = put_image(store, "team/app", "1", b"config-a")
    store.link_manifest(UP, "team/other", manifest)
    store.write_tag(UP, "team/other", "x", {MANIFEST: str(manifest)})
    recorder = Recorder()
    outcome = result_of(
        Deferred.fromCoroutine(recorder.purger(store).purge(Target(digest=manifest)))
    )
    assert outcome.plan.content == ((manifest, Kind.MANIFEST),)
    assert store.blob_size(manifest) is None
    assert store.read_tag(UP, "team/other", "x") == {} and store.read_tag(UP, "team/app", "1") == {}
    assert not store.has_link(UP, "team/other", manifest, Kind.MANIFEST)


def test_nothing_is_removed_while_any_of_it_is_read(store: Store) -> None:
    manifest, blobs = put_image(store, "team/app", "1", b"config", b"layer")
    recorder = Recorder()
    recorder.busy.add(blobs[1])
    outcome = result_of(
        Deferred.fromCoroutine(recorder.purger(store).purge(Target(UP, "team/app")))
    )
    assert outcome.busy == (blobs[1],) and outcome.freed == 0
    assert all(store.blob_size(d) is not None for d in [manifest, *blobs])
    assert store.read_tag(UP, "team/app", "1") and recorder.dropped == recorder.removed == []


def test_quarantine_moves_only_damaged_content_aside(store: Store) -> None:
    _, (config, layer) = put_image(store, "team/app", "1", b"config", b"layer")
    store.blob_path(layer).write_bytes(b"not the layer")
    missing = Digest.of(b"never stored")
    recorder = Recorder()
    repair = result_of(
        Deferred.fromCoroutine(recorder.purger(store).quarantine([layer, config, missing]))
    )
    assert repair.as_json() == {
        "intact": [str(config)],
        "quarantined": [str(layer)],
        "missing": [str(missing)],
    }
    assert store.blob_size(layer) is None
    assert (store.quarantine / "sha256" / layer.hex).read_bytes() == b"not the layer"
    assert recorder.dropped == [layer] and recorder.removed == [(Kind.BLOB, layer)]


def post(client: StubTreq, path: str, body: Any) -> tuple[int, Any]:
    response = result_of(client.post(f"http://admin{path}", data=json.dumps(body).encode()))
    return response.code, json.loads(result_of(response.content()))


def test_the_admin_api_answers_purges_in_the_spec_error_format(store: Store) -> None:
    _, blobs = put_image(store, "team/app", "1", b"config", b"layer")
    recorder = Recorder()
    client = StubTreq(admin_resource(recorder.purger(store), str(store.root)))
    assert post(client, "/purge", {"upstream": UP, "repository": "no/such"})[0] == 404
    code, body = post(client, "/purge", {"digest": "sha256:nope"})
    assert code == 400 and body["errors"][0]["code"] == "INVALID"
    recorder.busy.add(blobs[0])
    code, body = post(client, "/purge", {"digest": str(blobs[0])})
    assert code == 409 and body["errors"][0]["detail"]["busy"] == [str(blobs[0])]
    recorder.busy.clear()
    code, body = post(client, "/purge", {"digest": str(blobs[0])})
    assert code == 200 and body["content"] == [{"digest": str(blobs[0]), "kind": "blob"}]
    code, body = post(client, "/quarantine", {"digests": [str(blobs[1])]})
    assert code == 200 and body["intact"] == [str(blobs[1])]
    assert post(client, "/nothing", {})[0] == 404
    pong = result_of(client.get("http://admin/"))
    assert json.loads(result_of(pong.content()))["root"] == str(store.root)
