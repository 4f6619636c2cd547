"""What the store holds, as one enum instead of strings (values are what the reaper's
state database stores)."""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    BLOB = "blob"
    MANIFEST = "manifest"
