"""Re-hashing what the store holds, and putting damaged content aside (``regmirror
fsck``): blocking, call in a thread.

Content whose bytes no longer match its digest (a disk error, a hand edit) is moved to
``ROOT/_quarantine/<algorithm>/<hex>`` (with a manifest's ``.type``), by ``rename`` in
the same file system: it is no longer served, the next request fetches it again, and
an operator can still look at what was there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from enum import StrEnum

from regmirror.domain.digest import Digest
from regmirror.storage.store import Store

CHUNK = 1024 * 1024


class Verdict(StrEnum):
    INTACT = "intact"
    DAMAGED = "damaged"
    MISSING = "missing"


def verify(
    store: Store, digest: Digest, on_bytes: Callable[[int], object] = lambda n: None
) -> Verdict:
    """Hash the stored file of ``digest`` in chunks (``on_bytes`` is told each one's
    length)."""
    hasher = digest.hasher()
    try:
        with open(store.blob_path(digest), "rb") as f:
            while chunk := f.read(CHUNK):
                hasher.update(chunk)
                on_bytes(len(chunk))
    except FileNotFoundError:
        return Verdict.MISSING
    return Verdict.INTACT if hasher.hexdigest() == digest.hex else Verdict.DAMAGED


def quarantine_path(store: Store, digest: Digest) -> str:
    return os.path.join(store.quarantine, digest.algorithm, digest.hex)


def quarantine(store: Store, digest: Digest) -> bool:
    """Move the stored file of ``digest`` (and its ``.type``) aside; False if it is not
    there."""
    source = store.blob_path(digest)
    target = quarantine_path(store, digest)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.rename(source, target)
    except FileNotFoundError:
        return False
    try:
        os.rename(f"{source}.type", f"{target}.type")
    except FileNotFoundError:
        pass
    return True
