"""What the operator's pages read of a reaper (``/metrics``, ``/status.json``,
``/readyz``), whichever one runs: a ``Reaper`` (one process: its ``Ledger``) or a
``ClusterReaper`` (a cluster: the figures as Redis last said, this replica's
reservations)."""

from __future__ import annotations

from typing import Protocol


class ReaperView(Protocol):
    @property
    def ready(self) -> bool:
        """The state is loaded: the reaper knows what the store holds."""
        ...

    @property
    def usage(self) -> int:
        """Bytes of verified content in the store."""
        ...

    @property
    def entry_count(self) -> int:
        """Blobs and manifests in the store."""
        ...

    @property
    def reserved(self) -> int:
        """Bytes announced by the fetches in flight (of this process)."""
        ...

    @property
    def max_size(self) -> int:
        """The quota in bytes (0: none)."""
        ...

    @property
    def high(self) -> int:
        """The high watermark in bytes: above it, least recently used content goes."""
        ...

    @property
    def low(self) -> int:
        """The low watermark in bytes: eviction stops below it."""
        ...

    @property
    def stats(self) -> dict[str, int]:
        """Entries removed (``expired``, ``evicted``) and bytes ``freed``."""
        ...
