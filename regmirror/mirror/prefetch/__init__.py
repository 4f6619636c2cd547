"""Prefetch policies (``regmirror.prefetch``): matching tags kept warm in the cache.

- ``matching``: which repositories, tags and platforms a policy takes; the rate-limit
  budget (pure code)
- ``warm``: one tag through the mirror's own paths, as a client pull would
- ``service``: ``PrefetchService``, a ``PolicyRunner`` per policy on its own loop
"""

from regmirror.mirror.prefetch.service import PolicyRunner, PrefetchService

__all__ = ["PolicyRunner", "PrefetchService"]
