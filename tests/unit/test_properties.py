"""Property tests (hypothesis) of the router, the parsers and the whole request path.

Whatever a client sends: never a 500, never an exception (or an error event) in the
log, always a spec error code for bad input, and never a file touched outside the
storage root (nor inside it, for a request that was refused).
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from regmirror.api.router import route
from regmirror.config import Limits, parse_duration, parse_size
from regmirror.domain.digest import Digest
from regmirror.domain.errors import RegistryError
from regmirror.domain.media import Accept
from regmirror.domain.names import parse_reference, validate_name
from regmirror.domain.ranges import Unsatisfiable, parse_range
from regmirror.http.site import RegistrySite
from tests.unit.test_cache_web import Harness

SPEC_CODES = {
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
    "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED",
    "TOOMANYREQUESTS", "TAG_INVALID", "RANGE_INVALID", "PAGINATION_NUMBER_INVALID",
    "UNAVAILABLE",
}  # fmt: skip

METHODS = st.sampled_from([b"GET", b"HEAD", b"PUT", b"POST", b"DELETE", b"PATCH", b"OPTIONS"])
HEX = "0123456789abcdef"
LOWER = string.ascii_lowercase + string.digits

component = st.one_of(
    st.builds(
        lambda parts, sep: sep.join(parts),
        st.lists(st.text(alphabet=LOWER, min_size=1, max_size=5), min_size=1, max_size=3),
        st.sampled_from([".", "_", "__", "-", "---"]),
    ),
    st.text(alphabet=string.ascii_letters + string.digits + "._-%:@", max_size=12),
    st.sampled_from(["..", ".", "", "_catalog", "_uploads", "%2e%2e", "%00", "a%2Fb", "~"]),
)
name = st.lists(component, min_size=1, max_size=5).map("/".join)
digest_text = st.one_of(
    st.builds(lambda h: "sha256:" + h, st.text(alphabet=HEX, min_size=64, max_size=64)),
    st.builds(lambda h: "sha512:" + h, st.text(alphabet=HEX, min_size=128, max_size=128)),
    st.builds(lambda a, h: f"{a}:{h}", st.sampled_from(["sha256", "md5", "SHA256", ""]),
              st.text(alphabet=HEX + "G:", max_size=70)),
)  # fmt: skip
reference = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "_.-", min_size=1, max_size=130),
    digest_text,
    st.text(max_size=20),
)
path = st.one_of(
    st.builds(lambda n, r: f"/v2/{n}/manifests/{r}", name, reference),
    st.builds(lambda n, d: f"/v2/{n}/blobs/{d}", name, digest_text),
    st.builds(lambda n: f"/v2/{n}/tags/list", name),
    st.builds(lambda n, rest: f"/v2/{n}/blobs/uploads/{rest}", name, st.text(max_size=10)),
    st.sampled_from(["/v2/", "/v2", "/v2/_catalog", "/", "/v1/", "/v2//", "/v2/../etc"]),
    st.text(max_size=60).map(lambda t: "/v2/" + t),
)
range_header = st.one_of(
    st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(0, 2**70) | st.just(""),
              st.integers(0, 2**70) | st.just("")),
    st.text(max_size=30),
    st.sampled_from(["bytes=0-0,5-6", "bytes=-0", "bytes=--1", "items=0-1", "bytes = 1 - 2"]),
)  # fmt: skip
accept_header = st.one_of(
    st.lists(
        st.sampled_from(
            [
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.docker.distribution.manifest.v2+json",
                "*/*",
                "application/json; q=0.5",
                "text/html",
                "",
                ",,;;",
            ]
        ),
        max_size=4,
    ).map(", ".join),
    st.text(max_size=40),
)


def spec_error(error: RegistryError) -> None:
    assert error.code in SPEC_CODES, error.code
    assert 400 <= error.status < 600 and error.status != 500
    json.loads(error.body())


# -- pure parsers ------------------------------------------------------------------------


@settings(max_examples=2000, deadline=None)
@given(METHODS, st.one_of(path.map(str.encode), st.binary(max_size=80)))
def test_route_returns_a_route_or_a_spec_error(method: bytes, raw: bytes) -> None:
    try:
        r = route(method, raw)
    except RegistryError as e:
        spec_error(e)
        return
    assert r.kind in ("base", "catalog", "manifest", "blob", "tags")
    if r.name:
        assert validate_name(r.name) == r.name
        assert ".." not in r.name.split("/") and not r.name.startswith("/")
    if r.kind == "blob":
        assert isinstance(r.reference, Digest)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(name, st.text(max_size=300)))
def test_names_are_valid_or_name_invalid(text: str) -> None:
    try:
        validated = validate_name(text)
    except RegistryError as e:
        spec_error(e)
        assert e.code == "NAME_INVALID"
        return
    assert validated == text and len(text) <= 255
    for part in text.split("/"):
        assert part and part[0] not in "._-" and part not in (".", "..")
        assert set(part) <= set(string.ascii_lowercase + string.digits + "._-")


@settings(max_examples=2000, deadline=None)
@given(st.one_of(reference, digest_text))
def test_references_are_tags_digests_or_spec_errors(text: str) -> None:
    try:
        ref = parse_reference(text)
    except RegistryError as e:
        spec_error(e)
        assert e.code in ("TAG_INVALID", "DIGEST_INVALID")
        return
    if isinstance(ref, Digest):
        assert str(ref) == text and "/" not in ref.hex
    else:
        assert ref == text and "/" not in ref and len(ref) <= 128


@settings(max_examples=3000, deadline=None)
@given(range_header, st.integers(0, 2**40))
def test_ranges_lie_inside_the_blob(header: str, size: int) -> None:
    try:
        wanted = parse_range(header, size)
    except Unsatisfiable as e:
        spec_error(e)
        return
    if wanted is not None:
        first, last = wanted
        assert 0 <= first <= last < size


@settings(max_examples=1000, deadline=None)
@given(st.lists(accept_header, max_size=3))
def test_accept_headers_always_parse(headers: list[str]) -> None:
    accept = Accept.parse(headers)
    assert accept.types is None or all(isinstance(t, str) and t for t in accept.types)
    accept.header()


@settings(max_examples=2000, deadline=None)
@given(
    st.one_of(
        st.text(alphabet="0123456789.hmsdwµun", max_size=12),
        st.text(max_size=12),
        st.integers(-5, 10**6),
        st.floats(allow_nan=True),
        st.none(),
        st.booleans(),
    )
)
def test_durations_and_sizes_parse_or_raise_value_error(value: Any) -> None:
    for parse in (parse_duration, parse_size):
        try:
            result = parse(value)
        except ValueError:
            continue
        assert result >= 0 or result != result  # a float NaN is a number, not a crash


# -- the whole request path -----------------------------------------------------------


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root, _dirs, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            st_ = os.stat(p)
            out[p] = (st_.st_size, st_.st_mtime_ns)
    return out


class InlinePool:
    def callInThreadWithCallback(self, on_result: Any, f: Any, *a: Any, **kw: Any) -> None:
        try:
            result = f(*a, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Path, Harness]]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "outside.txt").write_text("do not touch")
        h = Harness(base / "store")
        # The catalog scans the store in a thread: run that inline here.
        h.clock.getThreadPool = InlinePool  # type: ignore[method-assign]
        h.clock.callFromThread = lambda f, *a, **kw: f(*a, **kw)  # type: ignore[attr-defined]
        h.manifest("team/app", "1.0")
        yield base, h


@pytest.fixture(scope="module")
def errors() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical) or "log_failure" in event:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def send(h: Harness, raw: bytes) -> bytes:
    site = RegistrySite(h.root, limits=Limits(), reactor=h.clock, access_log=False)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    h.pump()
    value = transport.value()
    channel.connectionLost(Exception("done"))  # type: ignore[arg-type]
    return bytes(value)


def status_and_body(response: bytes) -> tuple[int, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    METHODS,
    st.one_of(path.map(lambda p: p.encode("utf-8", "surrogatepass")), st.binary(max_size=60)),
    st.one_of(st.none(), range_header),
    st.one_of(st.none(), accept_header),
)
def test_no_request_gets_a_500_or_touches_files_it_should_not(
    world: tuple[Path, Harness],
    errors: list[dict[str, Any]],
    method: bytes,
    target: bytes,
    range_: str | None,
    accept: str | None,
) -> None:
    base, h = world
    target = target.replace(b" ", b"%20").replace(b"\r", b"").replace(b"\n", b"")
    if not target.startswith(b"/"):
        target = b"/" + target
    headers = b"Host: mirror.test\r\n"
    if range_ is not None:
        headers += b"Range: " + range_.encode("utf-8", "replace").replace(b"\r\n", b"") + b"\r\n"
    if accept is not None:
        headers += b"Accept: " + accept.encode("utf-8", "replace").replace(b"\r\n", b"") + b"\r\n"
    before = snapshot(base)
    response = send(h, method + b" " + target + b" HTTP/1.1\r\n" + headers + b"\r\n")
    after = snapshot(base)
    assert response, "no answer"
    status, body = status_and_body(response)
    assert (status != 500 and status < 500) or status == 503, response[:300]
    assert errors == [], errors[:1]
    outside = {p for p in set(before) | set(after) if not p.startswith(str(base / "store"))}
    assert outside == {str(base / "outside.txt")}
    assert before[str(base / "outside.txt")] == after[str(base / "outside.txt")]
    if status >= 400 and target.startswith(b"/v2"):
        if body and b"Content-Type: application/json" in response:
            codes = [e["code"] for e in json.loads(body)["errors"]]
            assert set(codes) <= SPEC_CODES, codes
        # A refused request changes nothing in the store.
        assert after == before, set(after) ^ set(before)
