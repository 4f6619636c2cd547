"""Where the bytes of a blob come from: the one typed answer of ``blob()``.

The API dispatches on it (``match``): a committed file, a fetch in flight followed as
its temporary file grows, or an upstream response passed through to one client.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from treq.response import _Response

from regmirror.domain.digest import Digest
from regmirror.fetch.blobfetch import FetchView


def _noop() -> None:
    pass


@attrs.frozen
class CommittedBlob:
    """A verified blob on disk: an open descriptor and its size; ``release`` when done.
    ``fetched``: it was not in the cache when asked for (this request waited for its
    fetch)."""

    fd: int
    size: int
    release: Callable[[], None] = _noop
    fetched: bool = False


@attrs.frozen
class FollowedFetch:
    """A fetch in flight of known size: a descriptor of its temporary file, read as it
    grows (the last byte only once the digest matched); ``release`` when done."""

    fetch: FetchView
    fd: int
    size: int
    release: Callable[[], None] = _noop


@attrs.frozen
class PassThrough:
    """An upstream response for a blob too large to cache: streamed to one client."""

    response: _Response
    digest: Digest
    size: int


BlobSource = CommittedBlob | FollowedFetch | PassThrough
