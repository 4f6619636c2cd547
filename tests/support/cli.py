"""The ``regmirror`` command line run as an operator runs it: a subprocess, with the
test's Python (``python -m regmirror.cli``), from the repository root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        try:
            return json.loads(self.stdout)
        except ValueError:
            raise AssertionError(
                f"not JSON (exit {self.code}):\n{self.stdout}\n--- stderr ---\n{self.stderr}"
            ) from None


def regmirror(
    *args: str, timeout: float = 120.0, env: Mapping[str, str] | None = None
) -> CliResult:
    """Run ``regmirror ARGS`` (``env`` added to the test's environment)."""
    proc = subprocess.run(
        [sys.executable, "-m", "regmirror.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=REPO_ROOT,
        env={**os.environ, **env} if env else None,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)
