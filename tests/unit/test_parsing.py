"""Names, references, digests, ranges and routes: the spec's grammar, before any path."""

from __future__ import annotations

import pytest

from regmirror.api.router import route
from regmirror.domain.digest import Digest
from regmirror.domain.errors import DigestInvalid, NameInvalid, TagInvalid, Unsupported
from regmirror.domain.names import normalize_docker_hub, parse_reference, validate_name
from regmirror.domain.ranges import Unsatisfiable, parse_range

HEX = "a" * 64


@pytest.mark.parametrize(
    "name",
    ["alpine", "library/alpine", "team/app/server", "a.b-c__d/e_f", "x" * 255, "a1/b2"],
)
def test_valid_names_are_accepted(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "UPPER",
        "a/../b",
        "..",
        "/abs",
        "a//b",
        "a/",
        "-a",
        "a-",
        "a\x00b",
        "a%00b",
        "a" * 256,
        "_tags",
        "a/_manifests",
        "a b",
    ],
)
def test_invalid_names_are_name_invalid(name: str) -> None:
    with pytest.raises(NameInvalid):
        validate_name(name)


def test_tags_and_digests_are_told_apart() -> None:
    assert parse_reference("3.19") == "3.19"
    assert parse_reference(f"sha256:{HEX}") == Digest("sha256", HEX)


@pytest.mark.parametrize("tag", [".hidden", "-x", "a" * 129, "a/b", "", "ä"])
def test_invalid_tags_are_tag_invalid(tag: str) -> None:
    with pytest.raises(TagInvalid):
        parse_reference(tag)


@pytest.mark.parametrize(
    "text",
    [
        "sha256:xyz",
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "md5:" + "a" * 32,
        "sha512:" + "a" * 64,
        "sha256",
        "sha256:../" + "a" * 61,
    ],
)
def test_invalid_digests_are_digest_invalid(text: str) -> None:
    with pytest.raises(DigestInvalid):
        Digest.parse(text)


def test_sha512_digests_are_accepted() -> None:
    assert Digest.parse("sha512:" + "b" * 128).algorithm == "sha512"


def test_digest_of_bytes_matches_parse() -> None:
    d = Digest.of(b"hello")
    assert Digest.parse(str(d)) == d
    assert d.hex == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"


def test_docker_hub_official_images_get_library_prefix() -> None:
    assert normalize_docker_hub("alpine") == "library/alpine"
    assert normalize_docker_hub("team/app") == "team/app"


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 100, None),
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=90-", 100, (90, 99)),
        ("bytes=-10", 100, (90, 99)),
        ("bytes=-1000", 100, (0, 99)),
        ("bytes=50-1000", 100, (50, 99)),
        ("bytes=9-0", 100, None),
        ("bytes=0-1,5-6", 100, None),
        ("items=0-1", 100, None),
        ("bytes=-", 100, None),
    ],
)
def test_range_header_parsing(
    header: str | None, size: int, expected: tuple[int, int] | None
) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"), [("bytes=100-", 100), ("bytes=-0", 100), ("bytes=0-", 0)]
)
def test_unsatisfiable_ranges(header: str, size: int) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, size)


def test_routes_for_the_read_side() -> None:
    assert route(b"GET", b"/v2/").kind == "base"
    assert route(b"GET", b"/v2/_catalog").kind == "catalog"
    r = route(b"GET", b"/v2/team/app/server/manifests/1.0")
    assert (r.kind, r.name, r.reference) == ("manifest", "team/app/server", "1.0")
    r = route(b"HEAD", f"/v2/a/manifests/b/blobs/sha256:{HEX}".encode())
    assert (r.kind, r.name) == ("blob", "a/manifests/b")
    assert route(b"GET", b"/v2/x/tags/list").kind == "tags"


@pytest.mark.parametrize("method", [b"PUT", b"POST", b"DELETE", b"PATCH"])
def test_writes_are_unsupported_with_405(method: bytes) -> None:
    for path in (
        b"/v2/a/manifests/t",
        f"/v2/a/blobs/sha256:{HEX}".encode(),
        b"/v2/a/blobs/uploads/",
    ):
        with pytest.raises(Unsupported) as info:
            route(method, path)
        assert info.value.status == 405


def test_blob_route_requires_a_digest() -> None:
    with pytest.raises(DigestInvalid):
        route(b"GET", b"/v2/a/blobs/latest")


@pytest.mark.parametrize(
    "path",
    [b"/v2/UPPER/manifests/x", b"/v2/a/../b/manifests/x", b"/v2/a%00/manifests/x", b"//v2/a"],
)
def test_bad_paths_never_reach_the_store(path: bytes) -> None:
    with pytest.raises((NameInvalid, Unsupported)):
        route(b"GET", path)
