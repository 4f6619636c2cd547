"""Deep merge of configuration mappings (``extra=`` arguments of the servers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``extra`` into ``base`` recursively (mappings merge, other values replace);
    a value of ``None`` in ``extra`` deletes the key. Returns ``base``."""
    for key, value in extra.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = dict(value) if isinstance(value, Mapping) else value
    return base
