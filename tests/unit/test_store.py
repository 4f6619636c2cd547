"""The store: content becomes visible only by an atomic rename; crashes leave no trace."""

from __future__ import annotations

import json
import os
from pathlib import Path

from regmirror.domain.digest import Digest
from regmirror.domain.kinds import Kind
from regmirror.storage.store import Named, Store, Stored


def test_temp_files_are_invisible_until_committed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare()
    data = b"layer bytes"
    digest = Digest.of(data)
    temp = store.new_temp()
    os.write(temp.fd, data)
    os.close(temp.fd)
    assert store.open_blob(digest) is None
    assert temp.path.parent == store.tmp
    store.commit(temp.path, digest)
    opened = store.open_blob(digest)
    assert opened is not None
    fd, size = opened
    assert size == len(data) and os.pread(fd, 100, 0) == data
    os.close(fd)
    assert store.blob_path(digest) == tmp_path / "blobs" / "sha256" / digest.hex[:2] / digest.hex
    assert list(store.tmp.iterdir()) == []


def test_prepare_sweeps_leftover_temporary_files(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare()
    for _ in range(3):
        os.close(store.new_temp().fd)
    assert Store(tmp_path).prepare() == 3
    assert list(store.tmp.iterdir()) == []


def test_manifests_round_trip_with_media_type(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare()
    data = b'{"schemaVersion":2}'
    digest = Digest.of(data)
    store.write_manifest(digest, data, "application/vnd.oci.image.manifest.v1+json")
    assert store.read_manifest(digest) == (data, "application/vnd.oci.image.manifest.v1+json")


def test_a_damaged_manifest_file_is_not_served(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare()
    data = b'{"schemaVersion":2}'
    digest = Digest.of(data)
    store.write_manifest(digest, data, "application/json")
    store.blob_path(digest).write_bytes(b'{"schemaVersion":3}')
    assert store.read_manifest(digest) is None


def test_tags_tag_lists_and_catalog(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare()
    digest = Digest.of(b"m")
    store.write_tag("up", "team/app", "1.0", {"application/x": str(digest)})
    assert store.read_tag("up", "team/app", "1.0") == {"application/x": str(digest)}
    assert store.read_tag("up", "team/app", "2.0") == {}
    store.link_manifest("up", "team/app", digest)
    store.link_manifest("up", "library/alpine", digest)
    assert store.catalog("up") == ["library/alpine", "team/app"]
    store.write_tag_list("up", "team/app", ["1.0", "2.0"])
    assert store.read_tag_list("up", "team/app") == ["1.0", "2.0"]
    (store.repo_dir("up", "team/app") / "_taglist.json").write_text("{broken")
    assert store.read_tag_list("up", "team/app") is None


def test_repository_links_are_per_repository_and_kind(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare()
    digest = Digest.of(b"layer")
    assert not store.has_link("up", "team/app", digest, Kind.BLOB)
    store.link_blob("up", "team/app", digest)
    assert store.has_link("up", "team/app", digest, Kind.BLOB)
    assert not store.has_link("up", "team/app", digest, Kind.MANIFEST)
    assert not store.has_link("up", "team/other", digest, Kind.BLOB)
    assert not store.has_link("other", "team/app", digest, Kind.BLOB)


def test_scan_finds_blobs_and_manifests_with_what_they_reference(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare()
    blob = Digest.of(b"layer")
    store.blob_path(blob).parent.mkdir(parents=True)
    store.blob_path(blob).write_bytes(b"layer")
    data = json.dumps({"config": {"digest": str(blob)}, "layers": []}).encode()
    manifest = Digest.of(data)
    store.write_manifest(manifest, data, "application/vnd.oci.image.manifest.v1+json")
    os.close(store.new_temp().fd)  # in flight: not content
    found = {s.digest: s for s in store.scan()}
    assert set(found) == {blob, manifest}
    assert found[blob] == Stored(blob, Kind.BLOB, 5, found[blob].mtime)
    assert found[manifest].kind is Kind.MANIFEST
    assert found[manifest].size == len(data)
    assert found[manifest].refs == (blob,)


def test_names_list_content_without_stat_and_skip_what_is_not_a_digest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare()
    blob, big = Digest.of(b"layer"), Digest.of(b"layer", "sha512")
    for digest in (blob, big):
        store.blob_path(digest).parent.mkdir(parents=True, exist_ok=True)
        store.blob_path(digest).write_bytes(b"layer")
    data = b'{"layers": []}'
    manifest = Digest.of(data)
    store.write_manifest(manifest, data, "application/vnd.oci.image.manifest.v1+json")
    strays = [
        store.blobs / "sha256" / "ab" / ("AB" * 32),  # not canonical
        store.blobs / "sha256" / "ab" / "abc",  # too short
        store.blobs / "md5" / "ab" / Digest.of(b"x", "md5").hex,  # not an algorithm of ours
    ]
    for stray in strays:
        stray.parent.mkdir(parents=True, exist_ok=True)
        stray.write_bytes(b"x")
    (store.blobs / "sha256" / "ab" / ("ab" * 32)).mkdir()  # a directory is not content
    names = sorted(store.names())
    assert names == sorted(
        [
            Named(str(blob), "blob"),
            Named(str(big), "blob"),
            Named(str(manifest), "manifest"),
        ]
    )
    listed = {x.digest: x for x in store.listing()}
    assert listed[str(manifest)].size == len(data)
    assert store.stat_named(Named(str(blob), "blob")) == listed[str(blob)]
    os.unlink(store.blob_path(blob))
    assert store.stat_named(Named(str(blob), "blob")) is None
    assert store.manifest_refs(str(manifest)) == ()
    assert store.manifest_refs(str(blob)) == ()  # gone


def test_removed_content_takes_its_tags_and_repository_links(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare()
    gone_data, kept_data = b'{"schemaVersion":2,"n":1}', b'{"schemaVersion":2,"n":2}'
    gone, kept = Digest.of(gone_data), Digest.of(kept_data)
    for digest, data in ((gone, gone_data), (kept, kept_data)):
        store.write_manifest(digest, data, "application/json")
        store.link_manifest("up", "a", digest)
    store.write_tag("up", "a", "old", {"application/json": str(gone)})
    store.write_tag("up", "a", "new", {"application/json": str(kept)})
    assert store.remove([gone]) == len(gone_data)
    assert store.read_manifest(gone) is None
    assert not store.has_link("up", "a", gone, Kind.MANIFEST)
    assert store.read_tag("up", "a", "old") == {}
    assert store.read_manifest(kept) == (kept_data, "application/json")
    assert store.has_link("up", "a", kept, Kind.MANIFEST)
    assert store.read_tag("up", "a", "new") == {"application/json": str(kept)}
    assert store.remove([gone]) == 0
