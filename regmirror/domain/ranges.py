"""HTTP Range parsing for blob requests (pure code)."""

from __future__ import annotations

import re

from regmirror.domain.errors import RangeInvalid

_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*\Z")


class Unsatisfiable(RangeInvalid):
    """The range lies outside the blob: 416 with ``Content-Range: bytes */size``."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Return the inclusive (first, last) byte positions asked for, or None for the whole blob.

    Only a single range is supported; multiple ranges and malformed headers are ignored
    (served as the whole blob, as RFC 9110 allows). Raises ``Unsatisfiable`` when the
    range does not overlap the blob.
    """
    if header is None:
        return None
    match = _RANGE.match(header)
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text and not last_text:
        return None
    if not first_text:
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            raise Unsatisfiable("range not satisfiable", {"range": header[:100], "size": size})
        return max(0, size - suffix), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if last_text and last < first:
        return None
    if first >= size:
        raise Unsatisfiable("range not satisfiable", {"range": header[:100], "size": size})
    return first, min(last, size - 1)
