"""Pagination of ``tags/list`` and ``_catalog`` (pure code): ``n``/``last`` as the
distribution spec defines them, the ``Link`` header we send, and the one we follow
from an upstream's tag list."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlencode


def paginate(
    items: list[str], n: int | None, last: str | None, path: str
) -> tuple[list[str], str | None]:
    """The page after ``last`` of at most ``n`` items, and the ``Link`` header to the
    next page (None on the last one). ``items`` are sorted."""
    if last is not None:
        items = [i for i in items if i > last]
    if n is None or len(items) <= n:
        return items, None
    page = items[:n]
    query = urlencode({"n": n, "last": page[-1]}) if page else urlencode({"n": n})
    return page, f'<{path}?{query}>; rel="next"'


def tag_list_page(
    name: str, tags: list[str], n: int | None, last: str | None
) -> tuple[bytes, str | None]:
    """The ``tags/list`` body for ``name`` (lexical order, each tag once) and its Link."""
    page, link = paginate(sorted(set(tags)), n, last, f"/v2/{name}/tags/list")
    return json.dumps({"name": name, "tags": page}).encode(), link


def catalog_page(names: list[str], n: int | None, last: str | None) -> tuple[bytes, str | None]:
    """The ``_catalog`` body (lexical order, each name once) and its Link."""
    page, link = paginate(sorted(set(names)), n, last, "/v2/_catalog")
    return json.dumps({"repositories": page}).encode(), link


def next_page_query(link: str | None) -> list[tuple[str, str]] | None:
    """The ``n``/``last`` parameters of the next page named by an upstream's ``Link``
    header: the query is all we take from it (never its host or path), None when there
    is no next page."""
    if not link or "<" not in link:
        return None
    target = link.split("<", 1)[1].split(">", 1)[0]
    query = target.split("?", 1)[1] if "?" in target else ""
    params = [(k, v) for k, v in parse_qsl(query) if k in ("n", "last")]
    return params or None
