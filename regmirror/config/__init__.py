"""Configuration: a drop-in for the distribution registry's config.yml, plus ``regmirror:``.

Pure code: ``parse_config`` turns a mapping into a frozen ``Config`` or raises
``ConfigError`` with one line naming the file and the key.

- ``parsers``: one parser per kind of value (durations, sizes, URLs, names, ...)
- ``schema``: the keys (``SCHEMA``: parser and default; ``DISTRIBUTION_KEYS``: accepted,
  not implemented)
- ``model``: the frozen classes (``Config`` and its parts; those only ``Config`` refers
  to, ``AccessConfig`` and ``AuthConfig``, are imported from here)
- ``load``: ``parse_config``, ``load_config``
"""

from regmirror.config.load import ConfigError, load_config, parse_config
from regmirror.config.model import (
    Config,
    Limits,
    PrefetchPolicy,
    Reserve,
    TLSConfig,
    UpstreamConfig,
)
from regmirror.config.parsers import listen_endpoint, parse_duration, parse_size
from regmirror.config.schema import DISTRIBUTION_KEYS, SCHEMA

__all__ = [
    "DISTRIBUTION_KEYS",
    "SCHEMA",
    "Config",
    "ConfigError",
    "Limits",
    "PrefetchPolicy",
    "Reserve",
    "TLSConfig",
    "UpstreamConfig",
    "listen_endpoint",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]
