"""What the mirror tells the expiry layer: the seam between them.

The mirror records use and additions, reserves room for fetches in flight and asks for
an eviction when the disk is full; it never sees the reaper's heap, entries or state.
``regmirror.expiry.ledger.Ledger`` is the implementation a running mirror is given
(always: with ``proxy.ttl: 0`` and no quota it still keeps the ledger, which then
expires and evicts nothing). ``NoUsage`` is for a mirror built without an expiry layer
at all, as some unit tests build it: it records nothing and fits everything, so the
mirror never checks for a missing reaper.
"""

from __future__ import annotations

from typing import Protocol

from regmirror.domain.digest import Digest
from regmirror.domain.kinds import Kind


class Usage(Protocol):
    def used(self, digest: Digest) -> None:
        """A client was served ``digest`` (its expiry moves)."""

    def added(self, kind: Kind, digest: Digest, size: int, refs: tuple[Digest, ...] = ()) -> None:
        """Verified content was committed (a manifest with what it references)."""

    def reserve(self, digest: Digest, size: int) -> bool:
        """Count a fetch in flight; False when it cannot fit even after eviction."""

    def release(self, digest: Digest) -> None:
        """The fetch of ``digest`` ended (committed or not)."""

    def evict(self) -> object:
        """Make room now (a full disk); returns when it is done, or at once."""


class NoUsage:
    """Usage that records nothing and fits everything."""

    def used(self, digest: Digest) -> None:
        pass

    def added(self, kind: Kind, digest: Digest, size: int, refs: tuple[Digest, ...] = ()) -> None:
        pass

    def reserve(self, digest: Digest, size: int) -> bool:
        return True

    def release(self, digest: Digest) -> None:
        pass

    def evict(self) -> None:
        pass
