"""The values of the configuration, one small parser each (pure code): a parser takes
what YAML gave and returns the value, or raises ``ValueError`` saying what was expected."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from regmirror.config.model import RedisAddress

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d|w)")
_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3,
    "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0,
}  # fmt: skip
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)?\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}


def parse_duration(value: object) -> float:
    """``30s``, ``15m``, ``168h``, ``7d``, ``1h30m`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 15m, 168h or 7d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration like 30s, 15m, 168h or 7d")
    text = value.strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(f"expected a duration like 30s, 15m, 168h or 7d, got {value!r}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not text:
        raise ValueError("expected a duration like 30s, 15m, 168h or 7d, got ''")
    return total


def parse_size(value: object) -> int:
    """``50GiB``, ``500MB``, ``1T`` or a number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 512MiB or 50GiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("expected a size like 512MiB or 50GiB")
    match = _SIZE.match(value.strip())
    if match is None:
        raise ValueError(f"expected a size like 512MiB or 50GiB, got {value!r}")
    number, unit = match.group(1), (match.group(2) or "").lower()
    prefix = unit[:1] if unit[:1] in "kmgtp" and unit else ""
    if "i" in unit:
        multiplier = 1024 ** ("kmgtp".index(prefix) + 1)
    else:
        multiplier = _SIZE_UNITS[prefix]
    return int(float(number) * multiplier)


def string(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"expected a string, got {type(value).__name__}")


def boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {value!r}")


def count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"expected a non-negative integer, got {value!r}")


def positive(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"expected a positive integer, got {value!r}")


def choice(*choices: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        text = string(value).lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return check


def fraction(value: object) -> float:
    """A share of the quota: 0.9 or 90%."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"expected a fraction like 0.9 or 90%, got {value!r}") from None
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1:
        return float(value)
    raise ValueError(f"expected a fraction like 0.9 or 90%, got {value!r}")


def strings(value: object) -> tuple[str, ...]:
    """A list of strings (a single string is a list of one)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"expected a list of strings, got {value!r}")


def tls_version(value: object) -> str:
    """distribution's ``minimumtls``; anything below TLS 1.2 is raised to it."""
    text = string(value).lower()
    if text in ("tls1.0", "tls1.1", "tls1.2"):
        return "tls1.2"
    if text == "tls1.3":
        return text
    raise ValueError(f"expected tls1.2 or tls1.3, got {value!r}")


def registry_name(value: object) -> str:
    text = string(value)
    if not re.fullmatch(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?", text):
        raise ValueError(f"expected a registry name like ghcr.io or quay, got {value!r}")
    return text


def credential_helper(value: object) -> tuple[str, float]:
    if not isinstance(value, Mapping) or "command" not in value:
        raise ValueError("expected {command: ..., lifetime: ...}")
    unknown = set(value) - {"command", "lifetime"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r}")
    return string(value["command"]), parse_duration(value.get("lifetime", "5m"))


def mapping_list(
    value: object, keys: Mapping[str, Callable[[object], Any]], *, what: str, needs: str
) -> tuple[dict[str, Any], ...]:
    """A list of mappings (``regmirror.upstreams``, ``regmirror.prefetch``), each key
    parsed by its parser in ``keys``; errors start with ``[i].key``."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list of {what}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise ValueError(f"[{i}]: expected a mapping with {needs}")
        entry: dict[str, Any] = {}
        for key, raw in item.items():
            parser = keys.get(key)
            if parser is None:
                raise ValueError(f"[{i}].{key}: unknown key")
            try:
                entry[key] = parser(raw)
            except ValueError as e:
                raise ValueError(f"[{i}].{key}: {e}") from None
        out.append(entry)
    return tuple(out)


def metrics_path(value: object) -> str:
    text = string(value)
    if (text and not re.fullmatch(r"/[A-Za-z0-9_.-]+", text)) or text == "/v2":
        raise ValueError(f"expected one path segment like /metrics (or empty), got {value!r}")
    return text


def redis_url(value: object) -> str:
    """``regmirror.cluster.redis``: ``redis://[[user]:password@]host[:port][/db]`` or
    ``rediss://`` (TLS, the server's certificate verified); empty: no cluster."""
    text = string(value).strip()
    if not text:
        return ""
    redis_address(text)
    return text


def redis_address(text: str) -> RedisAddress:
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"expected a redis:// or rediss:// URL, got {text!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"expected a port number in {text!r}") from None
    if not parts.hostname:
        raise ValueError(f"expected a host in {text!r}")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"expected a database number after the host, got {path!r}")
    return RedisAddress(
        host=parts.hostname,
        port=port,
        db=int(path or 0),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=parts.scheme == "rediss",
    )


def key_prefix(value: object) -> str:
    """``regmirror.cluster.name``: the prefix of every Redis key and channel."""
    text = string(value)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", text):
        raise ValueError(f"expected a name of letters, digits, '.', '_' or '-', got {value!r}")
    return text


def url(value: object) -> str:
    text = string(value).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return text


# The keys regmirror implements: dotted path -> (parser, default). These defaults are


def listen_endpoint(addr: str, net: str = "tcp") -> str:
    """Turn distribution's ``http.addr`` into a Twisted server endpoint description."""
    if net == "unix":
        return "unix:" + addr.replace(":", r"\:")
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port or :port, got {addr!r}")
    host = host.strip("[]")
    if not host:
        return f"tcp:{port}"
    if ":" in host:
        return f"tcp6:{port}:interface={host.replace(':', chr(92) + ':')}"
    return f"tcp:{port}:interface={host}"
