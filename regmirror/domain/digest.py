"""Content digests: parsing, validation and incremental hashing (pure code)."""

from __future__ import annotations

import hashlib
import re

import attrs

from regmirror.domain.errors import DigestInvalid

_ALGORITHMS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+\Z")


@attrs.frozen(order=True, cache_hash=True)  # hashed several times per cached request
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``algorithm:hex``; anything but sha256/sha512 in canonical form is invalid."""
        algorithm, sep, hexpart = text.partition(":")
        if not sep:
            raise DigestInvalid("invalid digest", {"digest": text[:200]})
        length = _ALGORITHMS.get(algorithm)
        if length is None:
            raise DigestInvalid("unsupported digest algorithm", {"digest": text[:200]})
        if len(hexpart) != length or not _HEX.match(hexpart):
            raise DigestInvalid("invalid digest", {"digest": text[:200]})
        return cls(algorithm, hexpart)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"
