"""``--profile DIR``: py-spy flame graphs of regmirror while it is being measured.

A miss of a target is explained with a profile of the run that missed it: with
``--profile DIR`` the scenarios wrap regmirror's measurements (cold and cached blob
GETs, the manifest load runs at 1 and 2 processes, the 32-client fan-outs, the cached
downloads) in ``py-spy record --subprocesses --nonblocking`` of its process tree and
write ``DIR/<scenario>-<what>.svg``. Sampling costs the mirror CPU: the numbers of a
profiled run are not the ones to report.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def py_spy_path() -> str | None:
    """py-spy on PATH, or beside the running Python (the project's venv)."""
    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.is_file() else None


@contextmanager
def py_spy_record(pid: int, out: Path, rate: int = 100) -> Iterator[Path]:
    """Sample ``pid`` (and its children) until the block ends; a flame graph in ``out``."""
    exe = py_spy_path()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [exe, "record", "-p", str(pid), "-o", str(out), "-f", "flamegraph"]
    argv += ["-r", str(rate), "--subprocesses", "--nonblocking"]
    log = out.with_suffix(".log").open("wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        yield out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes the file on Ctrl-C
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


def profile_name(*parts: object) -> str:
    """A file name from a scenario's words: ``4 GET 1 process`` -> ``4-get-1-process``."""
    text = "-".join(str(p) for p in parts).lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")
