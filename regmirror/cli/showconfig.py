"""``regmirror check-config``: validate a file exactly as start-up does, and show the
effective configuration with its secrets masked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import yaml

from regmirror.app.listeners import check_files
from regmirror.cli.output import Exit, Failed
from regmirror.config import Config, ConfigError, load_config

MASK = "***"
# Values never shown: a password given in the file (password_env and password_file
# are shown, as the names they are; a password file's contents are never read here).
SECRET_KEYS = frozenset({"password", "token", "secret"})


def check(path: str) -> tuple[Config, list[str]]:
    """``load_config`` and the file checks of twistd's ``Options.postOptions``;
    ``Failed`` (exit 2) with its one-line error."""
    try:
        config, warnings = load_config(path)
        check_files(config)
    except ConfigError as e:
        raise Failed(Exit.USAGE, str(e)) from None
    return config, warnings


def masked(value: Any) -> Any:
    """``value`` with every secret replaced by ``***`` (an empty one stays empty)."""
    if isinstance(value, dict):
        return {
            k: (MASK if value[k] else value[k]) if k in SECRET_KEYS else masked(value[k])
            for k in value
        }
    if isinstance(value, list | tuple):
        return [masked(v) for v in value]
    return value


def effective(config: Config) -> dict[str, Any]:
    """The validated configuration as plain data (durations in seconds, sizes in
    bytes), secrets masked."""

    def plain(_: Any, __: Any, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    return dict(masked(attrs.asdict(config, value_serializer=plain)))


def as_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
