"""``regmirror.prefetch`` and ``regmirror.prefetch_reserve``: parsed here (pure code),
the upstream names resolved by ``regmirror.config.load`` once the upstreams are known."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from regmirror.config.model import PrefetchPolicy, Reserve, UpstreamConfig
from regmirror.config.parsers import (
    mapping_list,
    parse_duration,
    registry_name,
    string,
    strings,
)
from regmirror.domain.errors import RegistryError
from regmirror.domain.names import validate_name, validate_tag

GLOB = re.compile(r"[*?\[]")
_REPOSITORY_PATTERN = re.compile(r"[a-z0-9._/*?\[\]!-]+\Z")
_TAG_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+\Z")
_PLATFORM = re.compile(r"[a-z0-9_.-]+/[a-z0-9_.-]+(?:/[a-z0-9_.-]+)?\Z")


def reserve(value: object) -> Reserve:
    """A count of requests (``20``) or a share of the upstream's limit (``"20%"``)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return Reserve(float(value), percent=False)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            try:
                share = float(text[:-1])
            except ValueError:
                share = -1.0
            if 0 <= share <= 100:
                return Reserve(share, percent=True)
        elif text.isdigit():
            return Reserve(float(text), percent=False)
    raise ValueError(f"expected a count of requests like 20 or a share like 20%, got {value!r}")


def _patterns(check: Callable[[str], str]) -> Callable[[object], tuple[str, ...]]:
    def parse(value: object) -> tuple[str, ...]:
        return tuple(check(item) for item in strings(value))

    return parse


def _repository(text: str) -> str:
    if not _REPOSITORY_PATTERN.match(text) or (not GLOB.search(text) and not _valid_name(text)):
        raise ValueError(f"expected a repository name or pattern like myorg/*, got {text!r}")
    return text


def _valid_name(text: str) -> bool:
    try:
        validate_name(text)
    except RegistryError:
        return False
    return True


def _tag(text: str) -> str:
    if GLOB.search(text):
        if _TAG_PATTERN.match(text):
            return text
    else:
        try:
            return validate_tag(text)
        except RegistryError:
            pass
    raise ValueError(f"expected a tag or a pattern like 3.*, got {text!r}")


def _platform(text: str) -> str:
    if not _PLATFORM.match(text):
        raise ValueError(f"expected os/architecture[/variant] like linux/amd64, got {text!r}")
    return text


def _interval(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("the interval must be longer than 0")
    return seconds


POLICY_KEYS: dict[str, Callable[[object], Any]] = {
    "name": string,
    "upstream": registry_name,
    "repositories": _patterns(_repository),
    "tags": _patterns(_tag),
    "exclude": _patterns(_tag),
    "interval": _interval,
    "platforms": _patterns(_platform),
    "reserve": reserve,
}


def policy_list(value: object) -> tuple[dict[str, Any], ...]:
    """``regmirror.prefetch``: a list of mappings, checked key by key."""
    entries = mapping_list(
        value, POLICY_KEYS, what="prefetch policies", needs="repositories and tags"
    )
    for i, entry in enumerate(entries):
        if not entry.get("repositories"):
            raise ValueError(f"[{i}].repositories: a policy needs at least one repository")
        if "tags" in entry and not entry["tags"]:
            raise ValueError(f"[{i}].tags: a policy needs at least one tag pattern")
    return entries


def build_policies(
    entries: Sequence[Mapping[str, Any]], upstreams: Sequence[UpstreamConfig]
) -> tuple[PrefetchPolicy, ...]:
    """The policies, each naming an upstream by its name (an alias or none given: the
    default). Raises ``ValueError`` starting with ``[i].key`` for a wrong entry."""
    names: dict[str, str] = {}
    for config in upstreams:
        for label in (config.name, *config.aliases):
            names[label] = config.name
    out: list[PrefetchPolicy] = []
    for i, entry in enumerate(entries):
        label = entry.get("upstream", upstreams[0].name)
        upstream = names.get(label)
        if upstream is None:
            known = ", ".join(u.name for u in upstreams)
            raise ValueError(f"[{i}].upstream: no upstream is named {label} (upstreams: {known})")
        name = entry.get("name") or f"{upstream}/{entry['repositories'][0]}"
        if any(p.name == name for p in out):
            if entry.get("name"):
                raise ValueError(f"[{i}].name: the name {name} is used twice")
            name = f"{name}#{i}"
        out.append(
            PrefetchPolicy(
                name=name,
                upstream=upstream,
                repositories=entry["repositories"],
                tags=entry.get("tags", ("latest",)),
                exclude=entry.get("exclude", ()),
                interval=entry.get("interval", 900.0),
                platforms=entry.get("platforms", ()),
                reserve=entry.get("reserve"),
            )
        )
    return tuple(out)


def concurrency(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"expected a positive integer, got {value!r}")
