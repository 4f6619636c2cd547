"""Coordination of a cluster of replicas over one shared store: the Redis they agree
through (``regmirror.coord.redis``). Usable by fetch, expiry, mirror and the layers above
them; it imports only domain, config and logs."""
